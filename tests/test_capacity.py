"""`streamgraph capacity`: the prediction against brute force (issue #11).

The CPU-time answer is checked against the runtime itself: n identical streams in phase run
through the real StreamRunner over SimulatedSession executors on a simulated clock with known
costs (runtime/simulate.py); the predicted n must be the largest n whose simulated run keeps at
most 1 % of frames late, dropped or degraded (and p99 within the deadline). The memory answer
is checked against a brute-force count and the runtime's own allocations; the CLI against its
one-line errors and a memory-bound run. No wall-clock asserts.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from streamgraph.runtime import capacity
from streamgraph.runtime.stream import SimulatedClock
from streamgraph.runtime.stream import StreamRunner
from streamgraph.runtime.scheduler import TIME_EPS, Scheduler
from streamgraph.runtime.simulate import SimulatedSession
from streamgraph.runtime.sources import Frame

MISS = capacity.MISS_RATE


def simulate(n: int, costs: dict, fps: float, deadline_ms: float, policy: str, periods: int,
             budgets=None, jitter: float = 0.0, cost_scale=None) -> dict:
    """n identical streams in phase on one executor with the given stage costs (s)."""
    clock = SimulatedClock()
    image = np.zeros((1, 1, 3), np.uint8)
    frames = [Frame(image=image, timestamp=k / fps, index=k, source_index=k) for k in range(periods)]
    sessions = []
    for i in range(n):
        s = SimulatedSession(Scheduler(policy, deadline_ms, 1000.0, budgets=budgets), costs, clock=clock,
                             jitter=jitter, seed=i, cost_scale=cost_scale)
        s.calibrate()
        sessions.append(s)
    StreamRunner([(s, frames) for s in sessions]).run()
    full = sessions[0].scheduler.full_budget or 0
    recs = [f for s in sessions for f in s.frames]
    failed = sum(1 for f in recs if f.decision != "run" or f.end > f.deadline + TIME_EPS or f.budget < full)
    lat = [f.latency_ms for f in recs if f.decision == "run"]
    p99 = float(np.percentile(lat, 99)) if lat else math.inf
    share = failed / len(recs)
    return {"share": share, "p99_ms": p99, "meets": share <= MISS and p99 <= deadline_ms + 1000 * TIME_EPS}


def full_cost(costs: dict, budget=None) -> float:
    return sum(c[budget] if isinstance(c, dict) else c for c in costs.values())


CASES = [
    # stage costs (s), fps, deadline ms, policy, budgets
    ({"preprocess": 0.002, "encode": 0.020, "prefill": 0.031}, 2.0, 250.0, "fifo", None),        # deadline binds
    ({"encode": 0.020, "prefill": 0.031}, 2.0, 250.0, "drop_late", None),
    ({"encode": 0.015, "reduce": {8: 0.001, 16: 0.002}, "prefill": {8: 0.010, 16: 0.033}}, 2.0, 400.0, "degrade", [8, 16]),
    ({"encode": 0.030, "prefill": 0.041}, 4.0, 900.0, "fifo", None),                            # the period binds (D > P)
    ({"encode": 0.030, "prefill": 0.041}, 4.0, 900.0, "drop_late", None),
    ({"encode": 0.090}, 1.0, 1000.0, "latest_only", None),
]


@pytest.mark.parametrize("costs, fps, deadline_ms, policy, budgets", CASES)
def test_prediction_is_the_largest_n_the_simulated_run_serves(costs, fps, deadline_ms, policy, budgets):
    full = budgets[-1] if budgets else None
    ans = capacity.predict_cpu([full_cost(costs, full)], fps, deadline_ms / 1000.0)
    assert 1 <= ans.streams < 20
    meets = {n: simulate(n, costs, fps, deadline_ms, policy, 60, budgets)["meets"] for n in range(1, ans.streams + 3)}
    assert max(n for n, ok in meets.items() if ok) == ans.streams, meets
    assert all(meets[n] for n in range(1, ans.streams + 1)), meets
    expected_binds = "deadline" if deadline_ms / 1000.0 <= 1.0 / fps else "frame period"
    assert ans.binds == expected_binds


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cost_ms=st.floats(5.0, 200.0), fps=st.floats(0.5, 10.0), deadline_ms=st.floats(30.0, 2000.0),
       policy=st.sampled_from(["fifo", "drop_late", "degrade", "latest_only"]))
def test_prediction_matches_simulation_at_the_boundary(cost_ms, fps, deadline_ms, policy):
    c, d, period = cost_ms / 1000.0, deadline_ms / 1000.0, 1.0 / fps
    ans = capacity.predict_cpu([c], fps, d)
    n = ans.streams
    assume(1 <= n <= 12)
    # away from ties, and past utilisation 1 by a margin the finite run can see
    assume(abs(n * c - min(d, period)) > 1e-4 and abs((n + 1) * c - min(d, period)) > 1e-4)
    if ans.binds == "frame period":
        assume((n + 1) * c * fps > 1.05 and d < 3 * period)
    costs = {"encode": 0.4 * c, "prefill": 0.6 * c}
    assert simulate(n, costs, fps, deadline_ms, policy, 100)["meets"]
    assert not simulate(n + 1, costs, fps, deadline_ms, policy, 100)["meets"]


def jittered(costs: dict, jitter: float, size: int, seed: int) -> np.ndarray:
    """Frame costs drawn as SimulatedSession draws them (each stage x max(0.1, 1 + j N(0,1)))."""
    rng = np.random.default_rng(seed)
    return sum(c * np.maximum(0.1, 1.0 + jitter * rng.standard_normal(size)) for c in costs.values())


@pytest.mark.parametrize("policy", ["fifo", "drop_late"])
def test_a_cost_distribution_not_its_mean(policy):
    """With jitter the mean cost would allow 6 streams (6 x 40 ms <= 250 ms) but the 6th frame
    of a burst is late about 1 time in 4: the model, fed samples of the distribution, says 5, and
    so does the simulated run."""
    costs, fps, deadline_ms = {"encode": 0.016, "prefill": 0.024}, 2.0, 250.0
    samples = jittered(costs, 0.2, 20000, seed=99)
    ans = capacity.predict_cpu(samples, fps, deadline_ms / 1000.0)
    mean_answer = int(deadline_ms / 1000.0 // full_cost(costs))
    assert ans.streams == 5 and mean_answer == 6
    assert ans.fail_fraction <= MISS / 4 and ans.fail_fraction_next >= 2 * MISS     # a clear boundary
    assert simulate(5, costs, fps, deadline_ms, policy, 200, jitter=0.2)["meets"]
    assert not simulate(6, costs, fps, deadline_ms, policy, 200, jitter=0.2)["meets"]


DEGRADE_COSTS = {"encode": 0.016, "prefill": {8: 0.008, 16: 0.024}}     # 40 ms at full budget, 24 at 8


def _policy(overload: str) -> capacity.PolicyModel:
    return capacity.PolicyModel(overload, ratios=[0.024 / 0.040, 1.0], alpha=0.3)


@pytest.mark.parametrize("policy", ["fifo", "drop_late", "degrade"])
def test_policy_replay_matches_the_scheduler(policy):
    """drop_late and degrade decide from each stream's own cost prediction (an EWMA of its
    past frames), not from the cost to come: the replayed decisions give the share of frames
    late, dropped or degraded that the real scheduler gives on the simulated clock."""
    x = jittered({"encode": 0.016, "prefill": 0.024}, 0.2, 20000, seed=7)
    for n in (4, 5, 6, 7):
        model = capacity.predict_at(x, n, 2.0, 0.230, policy=_policy(policy))["late"]
        sim = simulate(n, DEGRADE_COSTS, 2.0, 230.0, policy, 300, budgets=[8, 16], jitter=0.2)["share"]
        assert abs(model - sim) <= 0.005 + 0.15 * sim, (n, model, sim)


def test_degrade_sheds_quality_before_fifo_misses():
    """With noisy costs degrade degrades frames on predictions before any would be late: at
    D = 222 ms, 5 streams keep fifo's lateness under 1 % but not degrade's full budget; the
    model predicts 4 for degrade, the largest n the simulated run serves at full budget."""
    x = jittered({"encode": 0.016, "prefill": 0.024}, 0.2, 20000, seed=7)
    ans = capacity.predict_cpu(x, 2.0, 0.222, policy=_policy("degrade"))
    assert ans.streams == 4 and ans.fail_fraction_next >= 2 * MISS
    sims = {n: simulate(n, DEGRADE_COSTS, 2.0, 222.0, "degrade", 300, budgets=[8, 16], jitter=0.2) for n in (4, 5)}
    assert sims[4]["meets"] and not sims[5]["meets"]
    fifo5 = simulate(5, DEGRADE_COSTS, 2.0, 222.0, "fifo", 300, budgets=[8, 16], jitter=0.2)["share"]
    assert fifo5 < sims[5]["share"]
    assert capacity.predict_at(x, 5, 2.0, 0.222)["late"] < ans.fail_fraction_next


def test_slow_phases_slow_whole_bursts():
    """The machine is 2x slower for a tenth of the time, in long phases: whole bursts run slow
    (here every 10th burst, SimulatedSession's cost_scale). The probe's samples in measured order
    (a slow phase of 1000 frames in 10000) and the block bootstrap give the simulated answer,
    13 streams (14 would end 2 of 14 frames late in one burst out of ten: 1.4 %); the same
    samples shuffled (slow frames scattered) would predict many more."""
    c, fps, deadline_ms = 0.010, 2.0, 250.0
    ordered = np.full(10000, c)
    ordered[4000:5000] = 2 * c
    ans = capacity.predict_cpu(ordered, fps, deadline_ms / 1000.0)
    shuffled = capacity.predict_cpu(np.random.default_rng(0).permutation(ordered), fps, deadline_ms / 1000.0)
    slow = lambda k: 2.0 if k % 10 == 3 else 1.0  # noqa: E731
    meets = {n: simulate(n, {"encode": c}, fps, deadline_ms, "fifo", 100, cost_scale=slow)["meets"]
             for n in (12, 13, 14, 15)}
    assert meets == {12: True, 13: True, 14: False, 15: False}
    assert ans.streams == 13
    assert shuffled.streams >= 17


def test_runner_overhead_that_grows_with_n():
    """o(n) = 1 ms x n per frame: in the simulation a stage of that cost."""
    c, fps, deadline_ms = 0.010, 2.0, 250.0
    over = lambda n: 0.001 * n  # noqa: E731
    ans = capacity.predict_cpu([c], fps, deadline_ms / 1000.0, overhead=over)
    brute = max(n for n in range(1, 40) if n * (c + over(n)) <= deadline_ms / 1000.0 + TIME_EPS)
    assert ans.streams == brute
    for n in (brute, brute + 1):
        run = simulate(n, {"encode": c, "preprocess": over(n)}, fps, deadline_ms, "fifo", 40)
        assert run["meets"] == (n == brute)


def test_predict_at_agrees_with_the_search():
    samples = jittered({"encode": 0.02}, 0.2, 5000, seed=3)
    ans = capacity.predict_cpu(samples, 2.0, 0.25)
    at = capacity.predict_at(samples, ans.streams, 2.0, 0.25)
    nxt = capacity.predict_at(samples, ans.streams + 1, 2.0, 0.25)
    assert at["late"] == ans.fail_fraction and at["late"] <= MISS < nxt["late"]
    assert at["p99_ms"] == pytest.approx(ans.p99_latency_ms)


def test_nothing_fits_and_the_cap():
    assert capacity.predict_cpu([0.3], 2.0, 0.25).streams == 0       # one frame outlasts the deadline
    capped = capacity.predict_cpu([1e-6], 1.0, 10.0, max_streams=50)
    assert capped.streams == 50 and capped.capped and capped.binds == "search cap"


@pytest.mark.parametrize("bad", [dict(frame_s=[]), dict(frame_s=[float("nan")]), dict(frame_s=[-1.0]),
                                 dict(fps=0), dict(fps=float("inf")), dict(deadline_s=0), dict(miss_rate=1.0)])
def test_bad_model_arguments(bad):
    kw = dict(frame_s=[0.01], fps=2.0, deadline_s=0.25) | bad
    with pytest.raises(ValueError):
        capacity.predict_cpu(**kw)


# ---------------------------------------------------------------------------- memory
@given(shared=st.integers(0, 10**9), per=st.integers(1, 10**8), memory=st.integers(0, 2 * 10**9))
@settings(max_examples=200, derandomize=True)
def test_memory_streams_is_the_largest_n_that_fits(shared, per, memory):
    n = capacity.memory_streams(shared, per, memory)
    assert n >= 0
    if n:
        assert shared + n * per <= memory
    assert shared + (n + 1) * per > memory or (n == 0 and shared > memory)


@pytest.mark.parametrize("graph", [
    "{op: sink_window, sink_tokens: 4, window_tokens: 64}",
])
def test_plan_stream_bytes_are_what_the_runtime_allocates(tmp_path, graph):
    """Per-stream bytes of the plan against the buffers a session allocates (KV, reducer
    state, encoder references), for a graph with a stateful reducer and encoder reuse."""
    from streamgraph.compiler.compile import check_graph
    from streamgraph.kv import KVBuffer
    from streamgraph.runtime.pipeline import EncoderStage, ReducerStage

    text = f"""\
version: 1
name: cap
model: {{preset: tiny, seed: 0}}
stream: {{fps: 2, frame_size: [64, 64]}}
nodes:
  encoder: {{op: stc_cacher, refresh_every: 4}}
  pruner:  {{op: dtd, input: encoder, tokens_per_frame: 8}}
  cache:   {graph}
  llm:     {{op: decoder, input: [pruner, query], cache: cache, max_new_tokens: 4}}
slo: {{frame_deadline_ms: 250, ttft_ms: 500, overload: drop_late}}
budget: {{memory_mb: 512}}
"""
    p = tmp_path / "cap.yaml"
    p.write_text(text)
    plan = check_graph(p, build_weights=False).plan
    per = capacity.plan_stream_bytes(plan)
    reducer, encoder = ReducerStage(plan, None), EncoderStage(plan, None)
    assert reducer.state and encoder.refs is not None          # the case is the one meant
    assert per["kv_cache"] == KVBuffer(plan.kv.shape, plan.kv.dtype).nbytes
    assert per["reducer_state"] == sum(b.nbytes for b in reducer.state.values())
    assert per["encoder_refs"] == encoder.refs.nbytes
    assert per["total"] == per["kv_cache"] + per["reducer_state"] + per["encoder_refs"] + per["host_store"]
    shared = capacity.plan_shared_bytes(plan)
    assert shared["total"] == plan.memory.weights_bytes + plan.memory.activations_bytes + plan.memory.io_bytes


# ---------------------------------------------------------------------------- CLI
def _cli(argv, capsys):
    from streamgraph.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("args, what", [
    (["--fps", "0"], "--fps"), (["--fps", "nan"], "--fps"), (["--fps", "1e9"], "--fps"),
    (["--threads", "0"], "--threads"), (["--memory-gb", "0"], "--memory-gb"), (["--memory-gb", "-2"], "--memory-gb"),
    (["--memory-gb", "inf"], "--memory-gb"), (["--probe-frames", "0"], "--probe-frames"),
    (["--miss-rate", "1"], "--miss-rate"), (["--miss-rate", "nan"], "--miss-rate"),
    (["--probe-seconds", "-1"], "--probe-seconds"), (["--probe-seconds", "inf"], "--probe-seconds"),
])
def test_bad_arguments_one_line(tmp_path, capsys, args, what):
    rc, out, err = _cli(["capacity", str(tmp_path / "missing"), *args], capsys)
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and what in err, err


def test_bad_targets_one_line(tmp_path, capsys):
    rc, _, err = _cli(["capacity", str(tmp_path / "nope")], capsys)
    assert rc == 1 and err.count("\n") == 1 and "no such graph file" in err
    rc, _, err = _cli(["capacity", str(tmp_path)], capsys)
    assert rc == 1 and err.count("\n") == 1 and "manifest" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\nmodel: {preset: tiny}\nstream: {fps: -2}\n")
    rc, _, err = _cli(["capacity", str(bad)], capsys)
    assert rc == 1 and err.count("\n") == 1 and f"{bad}:4:" in err


def test_memory_binds_with_a_tiny_memory(onnx_bundle, capsys):
    """--memory-gb below what the runtime needs once: 0 streams, memory binds; then room for
    exactly a few streams by the figures the first answer reported."""
    base = ["capacity", str(onnx_bundle), "--probe-frames", "4", "--probe-seconds", "0", "--json"]
    rc, out, err = _cli([*base, "--memory-gb", "0.01"], capsys)
    assert rc == 0, err
    a = json.loads(out)
    m = a["memory"]
    assert m["available_bytes"] == int(0.01 * capacity.GiB) and m["shared_bytes"] > m["available_bytes"]
    assert a["streams"] == 0 and a["binds"] == "memory"
    assert m["per_stream_bytes"] >= m["plan_per_stream"]["total"] > 0
    assert m["shared_bytes"] >= m["plan_shared"]["total"]

    gb = (m["shared_bytes"] + 3.5 * m["per_stream_bytes"]) / capacity.GiB
    rc, out, err = _cli([*base, "--memory-gb", repr(gb)], capsys)
    assert rc == 0, err
    b = json.loads(out)
    mb = b["memory"]
    brute = max(n for n in range(0, 1000) if mb["shared_bytes"] + n * mb["per_stream_bytes"] <= mb["available_bytes"])
    assert mb["streams"] == brute and 1 <= brute <= 6
    assert b["cpu"]["streams"] > brute and b["binds"] == "memory" and b["streams"] == brute
    assert len(b["frame_samples_ms"]) == b["probe"]["frames"] == 4      # 2 warm-up frames not counted
