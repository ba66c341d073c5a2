"""Streams over StreamWorker actors on a local Ray cluster (127.0.0.1): the figures of docs/cluster.md.

Two clusters, one after the other, in one Ray instance started and stopped here
(``ray.init(address="local", include_dashboard=False)``), the tiny preset
(``graphs/streaming_vlm.yaml``: 250 ms frame deadline, ``drop_late``), 1 intra-op thread per
actor, capacity measured inside each actor, all actors probing at the same moment:

1. **Capacity and admission** — ``--actors`` (4) actors pinned to one core (a quarter of it
   each): every actor's plan; streams at ``--load`` (80 %) of the planned capacity, cameras
   in phase, for ``--seconds``; frames failed (late, dropped, overwritten in the camera) per
   actor; then streams added up to capacity and the next one refused (its one-line reason).
2. **Failover** — streams reduced to ``--load`` of what the survivors of the largest actor
   can hold (N+1), that actor ``ray.kill``-ed mid-run: per moved stream the detection, resume time, frames
   lost and gap; the other streams' misses in equal windows before and after the kill.
3. **Plan-aware against round-robin placement** — unequal actors: CPU limits as containers
   have them (cgroup CFS quota: ``w1..w4`` 0.1 CPU each, ``w0`` none; where cgroups cannot be
   written, ``w0`` alone on core 0 and ``w1..w4`` sharing core 1 instead); the same number of streams (``--load`` and 100 % of the planned
   capacity) placed by each policy in turn, each run for ``--seconds``: frames failed per actor.

Usage (from the repository root; about 6 minutes)::

    OMP_NUM_THREADS=1 python bench/cluster.py                 # writes bench/results/cluster.json

Needs the ``ray`` extra and 2 cores (the core layout above).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def totals(c) -> dict:
    return {sid: dict(s["totals"]) for sid, s in c.snapshot()["streams"].items()}


def failed(before: dict, after: dict, streams) -> dict:
    """Frames of ``streams`` between two snapshots: offered (camera frames due), run, late,
    dropped, errors, overwritten in the camera, and the failed share."""
    t = dict.fromkeys(("delivered", "skipped", "run", "misses", "drop", "error"), 0)
    for s in streams:
        for k in t:
            t[k] += after[s][k] - before.get(s, {}).get(k, 0)
    out = {"offered": t["delivered"] + t["skipped"], "run": t["run"], "late": t["misses"], "dropped": t["drop"],
           "errors": t["error"], "skipped": t["skipped"]}
    bad = t["misses"] + t["drop"] + t["error"] + t["skipped"]
    out["failed"] = bad
    out["failed_share"] = bad / out["offered"] if out["offered"] else None
    return out


def by_actor(c, before, after, streams) -> dict:
    groups: dict[str, list] = {}
    for s in streams:
        groups.setdefault(c.placement.streams.get(s, "-"), []).append(s)
    return {a: {"streams": len(ss), **failed(before, after, ss)} for a, ss in sorted(groups.items())}


def plans(c) -> dict:
    return {a: {**{k: v for k, v in p.to_dict().items() if k in ("slots", "binds", "cpu_binds", "frame_ms", "node",
                                                                     "first_pass", "second_pass")},
                "niceness": c.actor_info.get(a, {}).get("niceness"), "cpus": c.actor_info.get(a, {}).get("cpus")}
            for a, p in sorted(c.plans.items())}


CGROUP = Path("/sys/fs/cgroup/cpu")       # cgroup v1 cpu controller (this machine); v2 below


def cpu_limits(quotas: dict[str, float], made: list):
    """``on_actors`` hook: put actor ``name``'s process in a cgroup limited to ``quotas[name]``
    CPUs (CFS quota per 100 ms), as a container's CPU limit — actors of unequal size on one
    machine. Returns None when cgroups cannot be written here."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    root = Path("/sys/fs/cgroup") if v2 else CGROUP
    if not os.access(root, os.W_OK):
        return None

    def hook(info: dict) -> None:
        for name, q in quotas.items():
            d = root / f"streamgraph-bench-{name}-{os.getpid()}"
            d.mkdir(exist_ok=True)
            made.append(d)
            if v2:
                (d / "cpu.max").write_text(f"{int(q * 100000)} 100000")
            else:
                (d / "cpu.cfs_period_us").write_text("100000")
                (d / "cpu.cfs_quota_us").write_text(str(int(q * 100000)))
            (d / "cgroup.procs").write_text(str(info[name]["pid"]))
    return hook


def fit_fps(c, target: int, fps: float) -> float:
    """Lower the stream rate (0.5 fps steps, not below 2 fps) until the planned capacity reaches
    ``target``."""
    while c.capacity < target and fps > 2.0:
        fps = max(2.0, math.floor(2 * fps * c.capacity / (target * 1.1)) / 2)
        c.replan(fps)
    return c.fps


def run_streams(c, n: int, seconds: float, prefix: str) -> tuple[dict, dict, list]:
    t0 = time.time() + 1.0
    names = [f"{prefix}{i}" for i in range(n)]
    for i, s in enumerate(names):
        c.add_stream(s, f"synthetic:{i}", t0=t0)
    time.sleep(max(0.0, t0 - time.time()) + 2.0)
    before = totals(c)
    time.sleep(seconds)
    after = totals(c)
    return before, after, names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graph", default=str(ROOT / "graphs" / "streaming_vlm.yaml"))
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--fps", type=float, default=8.0, help="stream rate to plan at first (lowered to fit --min-streams)")
    ap.add_argument("--min-streams", type=int, default=20, help="planned capacity wanted in phase 1")
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--probe-seconds", type=float, default=6.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    args = ap.parse_args()

    import ray

    from streamgraph.cluster.cluster import Cluster
    from streamgraph.cluster.placement import AdmissionError
    from streamgraph.compiler.compile import compile_graph

    bundle = str(compile_graph(args.graph, ROOT / "build" / "bench-cluster").bundle.path)
    cores = sorted(os.sched_getaffinity(0))
    result = {"graph": args.graph, "machine": {"cpus": os.cpu_count(), "cores": cores, "python": platform.python_version(),
                                               "loadavg_before": list(os.getloadavg())},
              "threads_per_actor": 1, "load": args.load}
    t_all = time.monotonic()
    made: list = []                                         # cgroups made for phase 3
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        # ------------------------------------------------------------ 1. capacity and admission
        c = Cluster(bundle, actors=args.actors, threads=1, fps=args.fps, probe_seconds=args.probe_seconds,
                    actor_cpus=[[cores[-1]]] * args.actors)
        try:
            c.start()
            fps = fit_fps(c, args.min_streams, args.fps)
            cap = c.capacity
            n = math.floor(args.load * cap)
            print(f"1. {args.actors} actors on core {cores[-1]}: planned capacity {cap} streams at {fps:g} fps; "
                  f"running {n} ({args.load:.0%}) for {args.seconds:g} s", flush=True)
            before, after, names = run_streams(c, n, args.seconds, "cam")
            reports = [c.report(s)["summary"]["latency_ms"] for s in names]
            p99 = max(r["end_to_end"]["p99"] for r in reports if r and r.get("end_to_end"))
            one = {"fps": fps, "capacity": cap, "streams": n, "actors": plans(c), "total": failed(before, after, names),
                   "by_actor": by_actor(c, before, after, names), "worst_stream_p99_latency_ms": p99,
                   "deadline_ms": next(iter(c.plans.values())).deadline_ms}
            print(f"   frames {one['total']['offered']}, failed {one['total']['failed']} "
                  f"({100 * (one['total']['failed_share'] or 0):.2f} %); worst stream p99 {p99:.1f} ms", flush=True)
            fillers = [f"fill{k}" for k in range(cap - n)]
            for s in fillers:
                c.add_stream(s, "synthetic")
            try:
                c.add_stream("one-too-many", "synthetic")
                one["refused"] = None
            except AdmissionError as e:
                one["refused"] = str(e)
            print(f"   after {cap} admitted: {one['refused']}", flush=True)
            for s in fillers:
                c.remove_stream(s)

            # -------------------------------------------------------- 2. failover
            victim = max(c.plans, key=lambda a: (c.plans[a].slots, a))
            room = math.floor(args.load * (cap - c.plans[victim].slots))   # the survivors at --load after it
            for s in names[room:]:
                c.remove_stream(s)
            live = names[:room]
            moved = c.placement.on(victim)
            others = [s for s in live if s not in moved]
            window = 5.0
            time.sleep(2.0)
            w0 = totals(c)
            time.sleep(window)
            w1 = totals(c)
            killed = c.kill_actor(victim)
            time.sleep(window)
            w2 = totals(c)
            events = []
            for s in moved:
                (f,) = c.streams[s].failovers
                events.append({"stream": s, "to": f["to"], "detected_s": f["detected_epoch"] - killed,
                               "placed_s": (f["placed_epoch"] - killed) if f["placed_epoch"] else None,
                               "resume_s": f["resume_s"], "frames_lost": f["frames_lost"], "gap_s": f["gap_s"]})
            two = {"streams": len(live), "victim": victim, "moved": len(moved), "window_s": window, "events": events,
                   "others_before": failed(w0, w1, others), "others_after": failed(w1, w2, others),
                   "moved_after": failed({s: {} for s in moved}, w2, moved)}
            print(f"2. killed {victim} ({len(moved)} of {len(live)} streams): resume "
                  f"{max(e['resume_s'] or 99 for e in events):.2f} s at most; other streams' late frames "
                  f"{two['others_before']['late']} before / {two['others_after']['late']} after, failed "
                  f"{two['others_before']['failed']} / {two['others_after']['failed']}", flush=True)
            result["capacity_and_admission"], result["failover"] = one, two
        finally:
            c.close()

        # ------------------------------------------------------------ 3. plan vs round robin
        quotas = {"w1": 0.1, "w2": 0.1, "w3": 0.1, "w4": 0.1}              # w0: no limit
        hook = cpu_limits(quotas, made)
        layout = None if hook else [[cores[0]]] + [[cores[-1]]] * 4     # no cgroups: cores instead
        c = Cluster(bundle, actors=5, threads=1, fps=args.fps, probe_seconds=args.probe_seconds, actor_cpus=layout,
                    on_actors=hook)
        try:
            c.start()
            fps = fit_fps(c, args.min_streams, args.fps)
            cap = c.capacity
            three = {"fps": fps, "capacity": cap, "cpu_limits": quotas if hook else None,
                     "layout": {f"w{i}": l for i, l in enumerate(layout)} if layout else None,
                     "actors": plans(c), "runs": []}
            what = ("CPU limits (cgroup CFS quota) w1..w4 0.1 CPU each, w0 none" if hook else
                    f"w0 on core {cores[0]}, w1..w4 on core {cores[-1]}")
            print(f"3. 5 unequal actors ({what}): capacity {cap} at "
                  f"{fps:g} fps; " + ", ".join(f"{a} {p['slots']}" for a, p in three["actors"].items()), flush=True)
            for load in sorted({args.load, 1.0}):
                n = math.floor(load * cap)
                for policy in ("plan", "round_robin"):
                    c.set_policy(policy)
                    before, after, names = run_streams(c, n, args.seconds, f"{policy}-")
                    run = {"load": load, "streams": n, "policy": policy, "total": failed(before, after, names),
                           "by_actor": by_actor(c, before, after, names)}
                    three["runs"].append(run)
                    t = run["total"]
                    print(f"   {load:.0%} {policy:>11}: {t['failed']} of {t['offered']} frames failed "
                          f"({100 * (t['failed_share'] or 0):.2f} %; late {t['late']}, dropped {t['dropped']}, "
                          f"skipped {t['skipped']}); streams per actor "
                          + ", ".join(f"{a} {v['streams']}" for a, v in run["by_actor"].items()), flush=True)
                    for s in names:
                        c.remove_stream(s)
            result["plan_vs_round_robin"] = three
        finally:
            c.close()
    finally:
        ray.shutdown()
        for d in made:                                      # the cgroups, once their processes are gone
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    result["wall_s"] = time.monotonic() - t_all
    result["seconds"] = args.seconds
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s; load average {result['machine']['loadavg_before'][0]:.1f} -> "
          f"{result['machine']['loadavg_after'][0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
