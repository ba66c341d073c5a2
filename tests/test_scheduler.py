"""Scheduler on a virtual clock with given stage costs: deterministic by construction."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgraph.runtime.stream import SimulatedClock
from streamgraph.runtime.stream import Question, StreamRunner
from streamgraph.runtime.scheduler import TIME_EPS, CostModel, FairEDF, Scheduler
from streamgraph.runtime.simulate import SimulatedSession
from streamgraph.runtime.sources import Frame

BUDGETS = [16, 32, 64]
DEADLINE_MS = 300.0
FPS = 10.0                                   # a frame every 100 ms


def costs(scale: float) -> dict:
    """Full budget (64) costs 0.1*scale s; the smallest bucket 0.05*scale... per frame."""
    return {"preprocess": 0.005 * scale, "encode": 0.035 * scale, "reduce": 0.0,
            "prefill": {16: 0.01 * scale, 32: 0.03 * scale, 64: 0.06 * scale}}


def frames(n: int, fps: float = FPS, offset: float = 0.0) -> list[Frame]:
    img = np.zeros((2, 2, 3), np.uint8)
    return [Frame(image=img, timestamp=offset + k / fps, index=k, source_index=k) for k in range(n)]


def run(policy: str, scale: float, n: int = 200, questions=None, jitter=0.0, cost_scale=None, clock=None):
    clock = clock or SimulatedClock()
    s = SimulatedSession(Scheduler(policy, DEADLINE_MS, 500.0, budgets=BUDGETS), costs(scale), clock=clock,
                         jitter=jitter, seed=1, cost_scale=cost_scale)
    s.calibrate()
    runner = StreamRunner([(s, frames(n))], questions=questions)
    (rep,) = runner.run()
    return rep, runner


def in_deadline(rep) -> int:
    return sum(1 for f in rep.frames if f.decision == "run" and f.deadline_met)


@pytest.mark.parametrize("policy", ["drop_late", "latest_only", "degrade", "fifo"])
def test_under_capacity_nothing_dropped_or_degraded(policy):
    rep, runner = run(policy, scale=0.5)                 # full budget: 50 ms per 100 ms frame
    assert rep.summary["dropped"] == 0 and rep.summary["processed"] == 200
    assert all(f.budget == 64 and f.deadline_met for f in rep.frames)
    assert runner.max_queue[0] == 1


def test_double_overload_degrade_beats_drop_late_and_everything_but_fifo_is_bounded():
    # full budget costs 200 ms per frame, frames come every 100 ms: 2x this executor's capacity
    results = {p: run(p, scale=2.0, n=300) for p in ("drop_late", "latest_only", "degrade", "fifo")}
    for policy, (rep, runner) in results.items():
        s = rep.summary
        assert s["processed"] + s["dropped"] == s["sampled"] == 300, policy
    deg, drop = results["degrade"][0], results["drop_late"][0]
    assert in_deadline(deg) > in_deadline(drop) * 1.5
    assert deg.summary["dropped"] <= 0.05 * 300          # keeps up by shrinking the budget
    assert {f.budget for f in deg.frames if f.decision == "run"} < {16, 32, 64} | {0}
    assert any(f.budget < 64 for f in deg.frames if f.decision == "run")
    for policy in ("drop_late", "latest_only", "degrade"):
        rep, runner = results[policy]
        lat = [f.latency_ms for f in rep.frames if f.decision == "run"]
        assert runner.max_queue[0] <= 4, policy                  # bounded queue
        assert max(lat) <= DEADLINE_MS + 1e-6 or policy == "latest_only", policy
        assert max(lat[-50:]) <= 2 * max(lat[:50]) + 1e-6, policy  # latency does not grow
    fifo, fifo_runner = results["fifo"]
    lat = [f.latency_ms for f in fifo.frames]
    assert lat[-1] > 10 * lat[0] and fifo_runner.max_queue[0] > 100   # the baseline falls behind
    assert in_deadline(fifo) < in_deadline(drop)


def test_latest_only_keeps_the_newest_frame():
    rep, _ = run("latest_only", scale=2.5, n=50)        # 250 ms per frame, one every 100 ms
    ran = [f for f in rep.frames if f.decision == "run"]
    dropped = [f for f in rep.frames if f.decision == "drop"]
    assert dropped and all(f.reason == "superseded by a newer frame" for f in dropped)
    # each run frame (after the first) is the newest that had arrived when the executor freed
    for prev, cur in zip(ran, ran[1:]):
        newest = min(int(prev.end * FPS + 1e-6), 49) / FPS
        assert cur.capture == pytest.approx(max(newest, prev.capture + 1 / FPS))


def test_edf_order_across_streams():
    clock = SimulatedClock()
    mk = lambda d: SimulatedSession(Scheduler("fifo", d, 500.0, budgets=[8]),  # noqa: E731
                                    {"encode": 0.04, "prefill": {8: 0.01}}, clock=clock)
    a, b = mk(1000.0), mk(200.0)                        # b has the tighter deadline
    runner = StreamRunner([(a, frames(5, fps=2)), (b, frames(5, fps=2, offset=0.0))])
    runner.run()
    # at each instant both streams have a frame captured at the same time: b's deadline is
    # earlier, so b's frame runs first every time
    assert runner.order == [(s, k) for k in range(5) for s in (1, 0)]
    c = SimulatedSession(Scheduler("fifo", 300.0, 500.0, budgets=[8]), {"encode": 0.3, "prefill": {8: 0.0}},
                         clock=SimulatedClock())
    # deadlines computed from capture: an older frame of a looser stream can precede
    deadlines = [f.deadline for f in StreamRunner([(c, frames(4))]).run()[0].frames]
    assert deadlines == sorted(deadlines)


def test_question_meets_ttft_when_frames_are_pending():
    q = Question(at=3.0, text="what now?")
    rep, runner = run("fifo", scale=1.5, n=100, questions=[q])   # fifo backlog grows: frames pending
    qr = rep.questions[0]
    assert qr.asked_at == 3.0 and qr.ttft_met and qr.ttft_ms <= 500.0
    pending_at_question = [f for f in rep.frames if f.capture <= 3.0 and (f.start or 0) > 3.0]
    assert len(pending_at_question) >= 3                 # frames were waiting, the question went first
    assert q.answer == "xxxx"


def test_frames_arriving_during_an_answer_go_through_the_policy():
    q = Question(at=2.0, text="q", max_new_tokens=60)       # 50 ms + 59 * 10 ms of decoding
    rep, _ = run("drop_late", scale=0.5, n=60, questions=[q])
    during = [f for f in rep.frames if 2.0 < f.capture < 2.5]
    assert during and all(f.decision == "drop" for f in during[:3])
    assert all("deadline" in f.reason for f in during if f.decision == "drop")


def test_each_miss_names_the_stage_that_overran():
    spike = lambda i: 6.0 if i == 20 else 1.0           # noqa: E731  frame 20: every stage 6x slower
    c = {"preprocess": 0.001, "encode": 0.01, "prefill": {64: 0.06}}
    clock = SimulatedClock()
    s = SimulatedSession(Scheduler("drop_late", DEADLINE_MS, 500.0, budgets=[64]), c, clock=clock, cost_scale=spike)
    s.calibrate()
    (rep,) = StreamRunner([(s, frames(40))]).run()
    misses = [f for f in rep.frames if f.deadline_met is False]
    assert misses and all(f.overran == "prefill" for f in misses)
    # a frame that misses because it waited names the queue
    c2 = {"encode": 0.01, "prefill": {64: 0.05}}
    s2 = SimulatedSession(Scheduler("fifo", 100.0, 500.0, budgets=[64]), c2, clock=SimulatedClock())
    s2.calibrate()
    (rep2,) = StreamRunner([(s2, frames(30, fps=25))]).run()
    assert {f.overran for f in rep2.frames if f.deadline_met is False} == {"queue"}


def test_cost_model_ewma():
    cm = CostModel(alpha=0.5)
    assert cm.predict_frame(16) is None
    cm.update("encode", 0.1)
    cm.update("prefill", 0.2, 16)
    cm.update("prefill", 0.4, 16)
    assert cm.predict("prefill", 16) == pytest.approx(0.3)
    assert cm.predict("prefill", 32) is None and cm.predict_frame(16) == pytest.approx(0.4)


def test_deterministic():
    a, _ = run("degrade", scale=2.0, n=100, jitter=0.2)
    b, _ = run("degrade", scale=2.0, n=100, jitter=0.2)
    assert [(f.decision, f.budget, f.end) for f in a.frames] == [(f.decision, f.budget, f.end) for f in b.frames]


def _identical_streams(policy: str, n_streams: int, load: float, n_frames: int = 200, phase_s: float = 0.0):
    """``n_streams`` identical cameras at FPS sharing one executor; a full-budget frame costs
    ``load / (n_streams * FPS)`` s, so the offered work is ``load`` x capacity. Stream i's frames
    are captured ``i * phase_s`` after stream 0's."""
    clock = SimulatedClock()
    c = load / (n_streams * FPS)
    sessions = []
    for _ in range(n_streams):
        s = SimulatedSession(Scheduler(policy, DEADLINE_MS, 500.0, budgets=BUDGETS),
                             {"encode": 0.5 * c, "prefill": {16: 0.1 * c, 32: 0.25 * c, 64: 0.5 * c}}, clock=clock)
        s.calibrate()
        sessions.append(s)
    runner = StreamRunner([(s, frames(n_frames, offset=i * phase_s)) for i, s in enumerate(sessions)])
    return runner.run(), c


@pytest.mark.parametrize("n_streams", [3, 8])
@pytest.mark.parametrize("policy", ["drop_late", "degrade", "latest_only"])
@pytest.mark.parametrize("phase_ms", [0.0, 3.0])
def test_identical_streams_at_overload_are_served_equally(policy, n_streams, phase_ms):
    reps, c = _identical_streams(policy, n_streams, load=1.2, phase_s=phase_ms / 1000.0)
    served = [r.summary["processed"] for r in reps]
    mean = sum(served) / n_streams
    assert all(abs(s - mean) <= 0.1 * mean for s in served), served
    # fairness costs no throughput: the executor is busy all the time, so the streams together
    # get at least the frames it can run at full budget in the span of the stream (the reference)
    span = max(f.end for r in reps for f in r.frames if f.end) - min(f.capture for r in reps for f in r.frames)
    assert sum(served) >= 0.95 * span / c
    for r in reps:
        assert r.summary["processed"] + r.summary["dropped"] == 200
        if policy != "latest_only":
            assert all(f.deadline_met for f in r.frames if f.decision == "run")


def test_streams_under_capacity_meet_every_deadline_with_different_deadlines_and_phases():
    # EDF's guarantee (Liu & Layland): utilisation <= 1 and deadlines >= periods -> no miss
    clock = SimulatedClock()
    c = 0.9 / (4 * FPS)
    sessions = []
    for d in (100.0, 150.0, 200.0, 300.0):
        s = SimulatedSession(Scheduler("drop_late", d, 500.0, budgets=[64]), {"encode": c / 2, "prefill": {64: c / 2}},
                             clock=clock)
        s.calibrate()
        sessions.append(s)
    reps = StreamRunner([(s, frames(100, offset=0.013 * i)) for i, s in enumerate(sessions)]).run()
    for r in reps:
        assert r.summary["dropped"] == 0 and all(f.deadline_met for f in r.frames)


_head = st.tuples(st.floats(0.0, 0.5), st.floats(0.001, 0.2), st.floats(0.0, 1.0))   # deadline, cost, kept


@settings(max_examples=150, deadline=None)
@given(st.lists(_head, min_size=1, max_size=5), st.floats(0.0, 0.2))
def test_fair_edf_is_edf_when_feasible_and_fair_when_not(heads, now):
    picker = FairEDF(len(heads))
    picker.kept = [k for _, _, k in heads]
    hs = [(i, d, c, d - c + TIME_EPS) for i, (d, c, _) in enumerate(heads)]   # latest start, as drop_late
    got = picker.pick(hs, now)

    def feasible(order):                         # brute force: every head starts in time, back to back
        t = now
        for _, _, c, latest in order:
            if t > latest:
                return False
            t += c
        return True

    if any(feasible(p) for p in itertools.permutations(hs)):
        assert hs[got][1] == min(d for _, d, _, _ in hs)          # EDF
    else:
        can = [h for h in hs if now <= h[3]]
        if can:
            assert hs[got] in can and picker.kept[got] == min(picker.kept[h[0]] for h in can)
        else:
            assert hs[got][1] == min(d for _, d, _, _ in hs)


def test_fair_edf_record_is_a_moving_share_of_frames_kept():
    picker = FairEDF(2, memory_frames=4)
    ref = 1.0
    for ran in (True, False, False, True, False):
        picker.record(1, ran)
        ref = 0.75 * ref + 0.25 * ran
    assert picker.kept == [1.0, pytest.approx(ref)]
    with pytest.raises(ValueError):
        picker.pick([], 0.0)
