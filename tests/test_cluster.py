"""streamgraph.cluster: placement and admission (brute force), the paced camera, and a local
Ray cluster on 127.0.0.1 (>= 16 streams over 4 actors at 80 % of planned capacity, the stream
past capacity refused, an actor killed mid-run, /metrics)."""
from __future__ import annotations

import itertools
import math
import os
import random
import time

import pytest

from streamgraph.cluster.placement import ActorPlan, AdmissionError, Placement


def plan(name, slots, memory=1 << 30, per=1 << 20):
    return ActorPlan(actor=name, node="n", slots=slots, cpu_streams=slots, memory_streams=10 ** 6, binds="CPU time",
                     fps=2.0, deadline_ms=250.0, shared_bytes=0, per_stream_bytes=per, memory_bytes=memory)


# ---------------------------------------------------------------------------- placement
@pytest.mark.parametrize("seed", range(20))
def test_plan_placement_admits_exactly_capacity_and_never_overfills(seed):
    rng = random.Random(seed)
    slots = [rng.randint(0, 7) for _ in range(rng.randint(1, 5))]
    p = Placement("plan")
    for i, s in enumerate(slots):
        p.add_actor(plan(f"a{i}", s))
    admitted = 0
    for k in range(sum(slots) + 3):
        try:
            a = p.choose(f"s{k}")
        except AdmissionError as e:
            assert k >= sum(slots), "refused while an actor had a free slot"
            assert "refused" in str(e) and "\n" not in str(e)
            continue
        p.assign(f"s{k}", a)
        admitted += 1
        for i, s in enumerate(slots):          # brute force: every actor within its slots
            assert len(p.on(f"a{i}")) <= s
    assert admitted == sum(slots)


def test_plan_placement_is_proportional_and_round_robin_is_not():
    for policy, expect in (("plan", {"big": 6, "s1": 2, "s2": 2}), ("round_robin", None)):
        p = Placement(policy)
        for name, s in (("big", 8), ("s1", 3), ("s2", 3)):
            p.add_actor(plan(name, s))
        for k in range(10):
            p.assign(f"x{k}", p.choose(f"x{k}"))
        got = {a: len(p.on(a)) for a in ("big", "s1", "s2")}
        if expect is not None:
            # brute force: the assignment minimising the largest load/slots ratio, filled greedily
            best = min((c for c in itertools.product(range(9), range(4), range(4)) if sum(c) == 10),
                       key=lambda c: max(c[0] / 8, c[1] / 3, c[2] / 3))
            assert max(got["big"] / 8, got["s1"] / 3, got["s2"] / 3) == pytest.approx(
                max(best[0] / 8, best[1] / 3, best[2] / 3))
            assert got == expect
        else:
            assert got == {"big": 4, "s1": 3, "s2": 3}       # blind to slots: s1, s2 at 100 %


def test_reserve_keeps_room_for_one_actor_and_failover_orphans():
    p = Placement("plan", reserve_actors=1)
    for name, s in (("a", 4), ("b", 4), ("c", 2)):
        p.add_actor(plan(name, s))
    assert p.capacity == 10 and p.admissible == 6
    for k in range(6):
        p.assign(f"s{k}", p.choose(f"s{k}"))
    with pytest.raises(AdmissionError, match="reserve"):
        p.choose("s6")
    victim = max(p.actors, key=lambda a: len(p.on(a)))
    orphans = p.remove_actor(victim)
    for s in orphans:                         # the survivors take every orphan
        p.assign(s, p.choose(s, failover=True))
    assert sum(len(p.on(a)) for a in p.actors) == 6
    assert all(len(p.on(a)) <= p.actors[a].slots for a in p.actors)


def test_placement_errors():
    with pytest.raises(ValueError, match="unknown placement policy"):
        Placement("random")
    with pytest.raises(ValueError, match="reserve_actors"):
        Placement("plan", reserve_actors=-1)
    with pytest.raises(AdmissionError, match="no live actor"):
        Placement().choose("s")


# ---------------------------------------------------------------------------- paced camera
class _Clock:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t


def test_paced_camera_newest_frame_and_skips():
    import numpy as np

    from streamgraph.cluster.worker import PacedCamera

    clock = _Clock()
    images = [np.full((2, 2, 3), i, np.uint8) for i in range(3)]
    cam = PacedCamera(images, fps=4.0, t0=100.0, clock=clock, epoch0=99.0)   # frame 0 at clock 1.0
    assert cam.latest() is None
    seen = []
    for t in (1.0, 1.1, 1.25, 2.0, 2.01):
        clock.t = t
        f = cam.latest()
        if f is not None:
            seen.append((f.index, f.timestamp, int(f.image[0, 0, 0])))
    # brute force: frame k is captured at clock 1 + k/4; the newest one at each poll, once
    assert seen == [(0, 1.0, 0), (1, 1.25, 1), (4, 2.0, 1)]
    assert cam.skipped == 2 and cam.delivered == 3 and cam.first_k == 0 and cam.last_k == 4
    cam.carry([seen])                             # handed back frames come first
    assert cam.latest() == seen


# ---------------------------------------------------------------------------- HTTP, Ray-free
class _FakeCluster:
    """What the app reads of a Cluster: snapshot(), ask(), add_stream()."""

    def snapshot(self):
        totals = {"run": 3, "drop": 0, "error": 0, "skipped": 1, "lost": 2, "misses": 1,
                  "misses_by_stage": {"prefill": 1}, "questions_ok": 1, "questions_error": 0, "ttft_misses": 0,
                  "latency_buckets": [1] * 15, "latency_sum": 0.5, "ttft_buckets": [], "ttft_sum": 0.0}
        return {"streams": {"a": {"actor": "w0", "state": "running", "failovers": 1, "kv_bytes": 10,
                                  "slots_in_use": 3, "totals": totals}},
                "actors": {"w0": {"up": True, "node": "n0", "slots": 4, "streams": 1, "frame_ms": {"p50": 2.0, "p99": 3.0}},
                           "w1": {"up": False, "node": "n1", "slots": 0, "streams": 0, "frame_ms": {}}},
                "capacity": 4, "admissible": 4, "admissions": {"admitted": 1, "refused": 2}, "failovers": 1,
                "policy": "plan", "fps": 2.0}

    def ask(self, sid, text, max_new):
        return {"answer": "red", "new_tokens": 1, "prompt_tokens": 3, "ttft_ms": 1.0, "ttft_met": True, "actor": "w0"}

    def add_stream(self, sid, source):
        raise AdmissionError(f"stream {sid!r} refused: the cluster is at its planned capacity")


def test_cluster_http_metrics_and_api():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from streamgraph.cluster.http import create_app
    from streamgraph.serve import ServerThread

    with ServerThread(create_app(_FakeCluster(), token="t0k")) as srv:
        assert httpx.get(f"{srv.url}/healthz").json() == {"status": "ok", "streams": 1, "actors": 1}
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        auth = {"Authorization": "Bearer t0k"}
        text = httpx.get(f"{srv.url}/metrics", headers=auth).text
        assert 'streamgraph_frames_total{actor="w0",decision="lost",stream="a"} 2.0' in text
        assert 'streamgraph_deadline_misses_total{actor="w0",stage="prefill",stream="a"} 1.0' in text
        for k, le in enumerate(("0.001", "0.0025", "0.005")):   # cumulative buckets
            assert f'streamgraph_frame_latency_seconds_bucket{{actor="w0",le="{le}",stream="a"}} {k + 1}.0' in text
        assert 'streamgraph_frame_latency_seconds_count{actor="w0",stream="a"} 15.0' in text
        assert 'streamgraph_actor_up{actor="w1",node="n1"} 0.0' in text
        assert 'streamgraph_cluster_admissions_total{result="refused"} 2.0' in text
        r = httpx.post(f"{srv.url}/v1/chat/completions", headers=auth,
                       json={"model": "a", "messages": [{"role": "user", "content": "colour?"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "red"
        r = httpx.post(f"{srv.url}/v1/streams", headers=auth, json={"id": "b"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "admission_refused"
        r = httpx.post(f"{srv.url}/v1/streams/zz/ask", headers=auth, json={"question": "q"})
        assert r.status_code == 404


# ---------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("argv, message", [
    (["cluster", "does/not/exist.yaml"], "no such graph file or bundle directory"),
    (["cluster", ".", "--actors", "0"], "--actors must be >= 1"),
    (["cluster", ".", "--fps", "0"], "--fps must be a number of frames per second"),
])
def test_cli_cluster_errors_are_one_line(argv, message, capsys):
    from streamgraph.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_cluster_refuses_an_open_bind_without_token(onnx_bundle, capsys, monkeypatch):
    pytest.importorskip("ray")
    from streamgraph.cli import main

    monkeypatch.delenv("STREAMGRAPH_API_TOKEN", raising=False)
    assert main(["cluster", str(onnx_bundle), "--host", "0.0.0.0"]) == 1      # before Ray starts
    assert "needs an API token" in capsys.readouterr().err


# ---------------------------------------------------------------------------- on Ray
ray = pytest.importorskip("ray")


def _totals(c):
    return {sid: dict(s["totals"]) for sid, s in c.snapshot()["streams"].items()}


def _failed(before, after, streams):
    """(frames failed: late, dropped, errors, overwritten in the camera; frames offered)."""
    tot = dict.fromkeys(("misses", "drop", "error", "skipped", "delivered"), 0)
    for s in streams:
        a, b = after[s], before.get(s, {})
        for k in tot:
            tot[k] += a[k] - b.get(k, 0)
    return tot["misses"] + tot["drop"] + tot["error"] + tot["skipped"], tot["delivered"] + tot["skipped"], tot


def test_cluster_on_local_ray(onnx_bundle):
    import httpx

    from streamgraph.cluster.cluster import Cluster
    from streamgraph.cluster.http import create_app
    from streamgraph.serve import ServerThread

    t_start = time.monotonic()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    c = None
    try:
        # 4 actors, 1 intra-op thread each, all pinned to one core (a quarter of it each; the
        # other core stays with the machine's other work), tiny preset (graphs/streaming_vlm.yaml)
        core = max(os.sched_getaffinity(0))
        c = Cluster(onnx_bundle, actors=4, threads=1, fps=8.0, probe_seconds=3.0, actor_cpus=[[core]] * 4)
        c.start(timeout_s=120)
        cap = c.capacity
        if cap < 20:          # a busy machine: the highest rate (0.5 fps steps) at which 4 actors plan >= 20
            cap = c.replan(max(0.5, math.floor(2 * c.fps * cap / 22) / 2))
        assert all(p.slots >= 1 for p in c.plans.values()), c.plans
        n = math.floor(0.8 * cap)
        assert n >= 16, f"planned capacity {cap} on this machine: 80 % is fewer than 16 streams"

        # 1. n streams, cameras in phase (the critical instant the plan is made for)
        t0 = time.time() + 1.0
        for i in range(n):
            c.add_stream(f"cam{i}", f"synthetic:{i}", t0=t0)
        assert len({c.placement.streams[f"cam{i}"] for i in range(n)}) == 4
        time.sleep(max(0.0, t0 - time.time()) + 2.0)
        before = _totals(c)
        time.sleep(6.0)
        after = _totals(c)
        failed, offered, why = _failed(before, after, before)
        assert offered >= n * 6 * c.fps * 0.9
        # The figure (<= 1 % failed at 80 % of the plan) is bench/cluster.py's (0 of 2,600
        # frames, docs/cluster.md); this check runs on whatever shares the CI machine's cores
        # during a 6 s window, so it only guards against a broken plan or placement (a plan that
        # ignored the actors' measured capacity fails far more: round robin 5-23 % in the bench).
        assert failed <= 0.05 * offered, f"{failed} of {offered} frames failed at 80 % of capacity: {why}"

        # the stream past capacity is refused at admission, before it runs
        fillers = []
        for k in range(cap - n):
            c.add_stream(f"fill{k}", "synthetic", t0=t0)
            fillers.append(f"fill{k}")
        with pytest.raises(AdmissionError, match=r"refused: .*planned capacity"):
            c.add_stream("one-too-many", "synthetic", t0=t0)
        assert "one-too-many" not in c.streams
        for s in fillers:
            c.remove_stream(s)

        # 2. kill an actor mid-run: with room for its streams (N+1), they resume within 2 s
        victim = max(c.plans, key=lambda a: c.plans[a].slots)
        room = math.floor(0.8 * (cap - c.plans[victim].slots))
        for i in range(room, n):                  # drop to 80 % of what the survivors can hold
            c.remove_stream(f"cam{i}")
        live = [f"cam{i}" for i in range(min(n, room))]
        moved = c.placement.on(victim)
        others = [s for s in live if s not in moved]
        assert moved and others
        time.sleep(1.0)
        w0 = _totals(c)
        time.sleep(3.0)
        w1 = _totals(c)
        killed = c.kill_actor(victim)
        time.sleep(3.0)
        w2 = _totals(c)
        for s in moved:
            st = c.streams[s]
            assert st.state == "running" and st.actor != victim
            (f,) = st.failovers
            assert f["from"] == victim and f["first_run_epoch"] is not None, f
            assert f["resume_s"] <= 2.0 and f["first_run_epoch"] - killed <= 2.0, f
            assert f["frames_lost"] >= 0 and f["gap_s"] > 0
        miss_before = sum(w1[s]["misses"] - w0[s]["misses"] for s in others)
        miss_after = sum(w2[s]["misses"] - w1[s]["misses"] for s in others)
        # the other streams are not disturbed: no more misses in the 3 s after the kill than in
        # the 3 s before, give or take 2 frames of machine noise (the bench measures 0 and 0)
        assert miss_after <= miss_before + 2, (miss_before, miss_after)
        rec = c.ask(moved[0], "What is in the frame?", max_new_tokens=4)
        assert rec["actor"] == c.streams[moved[0]].actor and rec["ttft_ms"] is not None
        rep = c.report(moved[0])
        assert rep["cluster"]["failovers"][0]["frames_lost"] is not None
        assert rep["summary"]["processed"] >= 1

        # 3. /metrics: per stream and per actor, the dead actor down
        with ServerThread(create_app(c)) as srv:
            text = httpx.get(f"{srv.url}/metrics", timeout=10).text
            assert f'streamgraph_actor_up{{actor="{victim}"' in text
            assert f'streamgraph_frames_total{{actor="{c.streams[moved[0]].actor}",decision="run",stream="{moved[0]}"}}' in text
            assert "streamgraph_actor_stream_slots" in text and "streamgraph_cluster_failovers_total 1.0" in text
            r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                           json={"model": others[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 200 and r.json()["streamgraph"]["actor"] == c.streams[others[0]].actor
    finally:
        if c is not None:
            c.close()
        ray.shutdown()
    assert time.monotonic() - t_start < 120
