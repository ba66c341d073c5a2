"""Capacity benchmark: predicted vs measured largest number of identical streams (issue #11).

For the tiny and small graphs (graphs/streaming_vlm.yaml, graphs/streaming_vlm_small.yaml),
in one run on this machine:

1. **predict** — :func:`streamgraph.runtime.capacity.estimate`, what ``streamgraph capacity``
   prints: the frame cost distribution (probe frames), the runner's overhead per frame, the
   memory plan, and the model of docs/live.md ("Capacity");
2. **measure** — ``n`` identical streams (the same synthetic clip with the same capture times:
   cameras in phase) through the real :class:`StreamRunner` and real sessions on one shared
   onnxruntime backend, at the graph's fps, for every policy asked (``fifo``: every frame runs
   at full budget, lateness shows as latency; ``graph``: the graph's own overload policy).
   ``n`` fits when at most 1 % of the frames fail (late, dropped, degraded or error) and the
   p99 end-to-end latency of the frames run is <= the deadline: the full-budget service the
   prediction is about (``fits_at_any_budget`` in each run: the same without counting degraded
   frames). The search starts at the
   prediction, steps up (or down) by about 10 % until the answer flips, then bisects: it ends
   with ``n`` fitting and ``n + 1`` not (monotone in ``n``, as the model is).
3. **ratio** — predicted / measured, the goal being within +-15 %. This machine's speed drifts
   with the other work on it (frame costs of the small graph measured from 36 to 70 ms within
   an hour), so besides the single-shot prediction made before the search, every run is
   preceded by a fresh calibration and a fresh probe (3 s, round robin over as many streams
   as the run, up to 128), and the same model over all of
   them gives the *same-window* prediction: prediction and measurement cover the same minutes.

Clock: by default a replay clock (work takes its real wall-clock time, runner included; idle
waits for the next capture are skipped instead of slept), so a 30-period run of 80 streams
takes the executor's busy time, not 15 s of wall time. ``--wall-check`` reruns the measured
``n`` and ``n + 1`` on the real wall clock.

The machine is shared: the load average (os.getloadavg) is recorded before and after every
graph and with every run; run it when the machine is otherwise idle.

    python bench/capacity.py [--graphs tiny,small] [--policies fifo,graph] [--threads N] [--wall-check]

Writes bench/results/capacity.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamgraph.backends import open_backend  # noqa: E402
from streamgraph.compiler.bundle import open_bundle  # noqa: E402
from streamgraph.compiler.compile import compile_graph  # noqa: E402
from streamgraph.runtime import capacity, sources  # noqa: E402
from streamgraph.runtime.stream import Clock, SimulatedClock, WallClock  # noqa: E402
from streamgraph.runtime.stream import StreamRunner  # noqa: E402
from streamgraph.runtime.scheduler import TIME_EPS  # noqa: E402
from streamgraph.runtime.session import Session  # noqa: E402

GRAPHS = {"tiny": REPO / "graphs" / "streaming_vlm.yaml", "small": REPO / "graphs" / "streaming_vlm_small.yaml"}


class ReplayClock(Clock):
    """Stream time = wall time spent working, idle waits skipped: ``now()`` is the wall clock
    since construction plus every wait skipped. Work (engines, runner, records) takes its real
    time, as live; waiting for a capture time jumps, as :class:`SimulatedClock` does."""

    def __init__(self):
        self._t0 = time.perf_counter()
        self._skipped = 0.0

    def now(self) -> float:
        return time.perf_counter() - self._t0 + self._skipped

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            self._skipped += delay

    def spend(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot spend negative time ({seconds} s)")


def load1() -> float:
    return os.getloadavg()[0]


def run_streams(bundle, engines, n: int, policy: str, frames: list, costs_mean: dict, clock_kind: str,
                miss_rate: float) -> dict:
    """``n`` streams in phase through one StreamRunner; pooled figures of every frame."""
    sessions = [Session(bundle, engines, clock=SimulatedClock(), overload=policy) for _ in range(n)]
    for s in sessions:
        s.scheduler.costs.mean = dict(costs_mean)          # calibrated once: identical sessions
    clock = ReplayClock() if clock_kind == "replay" else WallClock()
    for s in sessions:
        s.clock = clock
    runner = StreamRunner([(s, frames) for s in sessions])
    load = load1()
    t0 = time.perf_counter()
    runner.run()
    wall = time.perf_counter() - t0
    full = sessions[0].budgets[-1]
    deadline_ms = sessions[0].scheduler.frame_deadline * 1000.0
    sampled = late = dropped = degraded = errors = 0
    lat, busy = [], 0.0
    for s in sessions:
        for f in s.frames:
            sampled += 1
            if f.decision == "drop":
                dropped += 1
            elif f.decision == "error":
                errors += 1
            else:
                lat.append(f.latency_ms)
                busy += sum(f.stage_ms.values()) / 1000.0
                late += f.end > f.deadline + TIME_EPS
                degraded += f.budget < full
    failed = sum(1 for s in sessions for f in s.frames
                 if f.decision != "run" or f.end > f.deadline + TIME_EPS or f.budget < full)
    p99 = float(np.percentile(lat, 99)) if lat else None
    share = failed / sampled if sampled else 1.0
    fits = bool(lat) and share <= miss_rate and p99 <= deadline_ms + 1000.0 * TIME_EPS
    # the same without counting degraded frames (they met the deadline at a smaller budget)
    fits_latency = bool(lat) and (late + dropped + errors) / sampled <= miss_rate and p99 <= deadline_ms + 1000.0 * TIME_EPS
    span = clock.now()
    out = {"n": n, "policy": policy, "clock": clock_kind, "frames_per_stream": len(frames), "sampled": sampled,
           "late": late, "dropped": dropped, "degraded": degraded, "errors": errors, "failed": failed,
           "failed_share": share, "p50_ms": float(np.percentile(lat, 50)) if lat else None, "p99_ms": p99,
           "max_ms": float(max(lat)) if lat else None, "engine_busy_share": busy / span if span > 0 else None,
           "engine_ms_per_frame": 1000.0 * busy / len(lat) if lat else None,
           "other_ms_per_frame": 1000.0 * (wall - busy) / sampled if sampled else None,
           "fits": fits, "fits_at_any_budget": fits_latency, "wall_s": wall, "load1": load}
    del sessions, runner
    gc.collect()
    return out


def search(predicted: int, fits) -> int:
    """Largest n with fits(n), starting at ``predicted``: steps of ~10 % until the answer
    flips, then bisection (fits(0) is true: no stream)."""
    n = max(1, predicted)
    step = max(1, round(0.1 * n))
    if fits(n):
        lo, hi = n, n + step
        while fits(hi):
            lo, hi = hi, hi + step
    else:
        hi, lo = n, n - step
        while lo >= 1 and not fits(lo):
            hi, lo = lo, lo - step
        lo = max(lo, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def bench_graph(key: str, args) -> dict:
    graph = GRAPHS[key]
    bundle_dir = compile_graph(graph, REPO / "build" / f"bench-capacity-{key}").bundle.path
    load_before = list(os.getloadavg())
    measured: dict[str, dict] = {}
    with open_bundle(bundle_dir) as bundle:
        options = {"threads": args.threads} if args.threads else {}
        engines = open_backend("onnxruntime", bundle, **options)
        probe = Session(bundle, engines, clock=SimulatedClock())
        fps = float(bundle.manifest["stream"]["fps"])
        deadline_s = float(bundle.manifest["slo"]["frame_deadline_ms"]) / 1000.0
        size = tuple(bundle.manifest["stream"].get("frame_size") or bundle.plan.image_size)
        policies = [bundle.manifest["slo"]["overload"] if p == "graph" else p for p in args.policies.split(",")]
        for policy in dict.fromkeys(policies):
            runs: dict[int, dict] = {}
            # the prediction (`streamgraph capacity --overload POLICY`), right before the measurement
            t0 = time.perf_counter()
            answer = capacity.estimate(bundle_dir, threads=args.threads, probe_frames=args.probe_frames,
                                       miss_rate=args.miss_rate, overload=policy,
                                       progress=lambda m: print(f"  {key} {policy}: {m}", flush=True))
            predict_s = time.perf_counter() - t0
            predicted, over = answer.streams, answer.overhead
            print(f"{key} {policy}: predicted {predicted} streams ({answer.binds}; cpu {answer.cpu.binds}); frame "
                  f"{answer.costs_ms['frame']['mean']:.2f} ms mean, p99 {answer.costs_ms['frame']['p99']:.2f} ms; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)

            pool: list[capacity.CostSamples] = []       # probes taken right before each run
            probe_frames = list(sources.synthetic(args.probe_frames + 2, fps=fps, size=size))

            def opener():
                return Session(bundle, engines, clock=SimulatedClock(), overload="fifo")

            def fits(n: int) -> bool:
                if n <= 0:
                    return True
                if n not in runs:
                    periods = max(args.min_periods, math.ceil(args.min_frames / n))
                    frames = list(sources.synthetic(periods, fps=fps, size=size))
                    costs_mean = probe.calibrate()            # each run's sessions calibrated now, as live
                    fresh = capacity.probe_costs(opener, probe_frames, min_seconds=capacity.PROBE_SECONDS,
                                                 sessions=min(n, capacity.MAX_PROBE_SESSIONS))
                    pool.append(fresh)
                    r = run_streams(bundle, engines, n, policy, frames, costs_mean, "replay", args.miss_rate)
                    o = over(n)
                    pm = dataclasses.replace(answer.policy, engine_s=fresh.engine_s)
                    r["model"] = capacity.predict_at(fresh.frame_s, n, fps, deadline_s, o, policy=pm)
                    r["model"]["overhead_ms"] = 1000.0 * o
                    r["model"]["probe_mean_ms"] = 1000.0 * float(fresh.frame_s.mean())
                    runs[n] = r
                    print(f"  {key} {policy:9s} n={n:3d}: failed {r['failed']}/{r['sampled']} "
                          f"({100 * r['failed_share']:.2f}%; late {r['late']}, dropped {r['dropped']}, "
                          f"degraded {r['degraded']}), p99 {r['p99_ms']:.1f} ms (probe just before: frame "
                          f"{r['model']['probe_mean_ms']:.2f} ms, model late {100 * r['model']['late']:.2f}%, "
                          f"p99 {r['model']['p99_ms']:.1f} ms) -> "
                          f"{'fits' if r['fits'] else 'no'}  [load {r['load1']:.2f}, {r['wall_s']:.1f} s]", flush=True)
                return runs[n]["fits"]

            n_meas = search(predicted, fits)
            wall = []
            if args.wall_check:
                for n in (n_meas, n_meas + 1):
                    if n < 1:
                        continue
                    periods = max(args.min_periods, math.ceil(args.min_frames / n))
                    frames = list(sources.synthetic(periods, fps=fps, size=size))
                    r = run_streams(bundle, engines, n, policy, frames, probe.calibrate(), "wall", args.miss_rate)
                    wall.append(r)
                    print(f"  {key} {policy:9s} n={n:3d} wall clock: failed {100 * r['failed_share']:.2f}%, "
                          f"p99 {r['p99_ms']:.1f} ms -> {'fits' if r['fits'] else 'no'}", flush=True)
            # the same model over every probe of the search: prediction and measurement cover the
            # same minutes (this machine's speed drifts with the other work on it)
            frame_s = np.concatenate([p.frame_s for p in pool])
            pm = dataclasses.replace(answer.policy, engine_s=np.concatenate([p.engine_s for p in pool]))
            window = capacity.predict_cpu(frame_s, fps, deadline_s, over, args.miss_rate, policy=pm)
            predicted_window = min(window.streams, answer.memory["streams"])
            ratio = predicted / n_meas if n_meas else None
            ratio_w = predicted_window / n_meas if n_meas else None
            measured[policy] = {"predicted": predicted, "prediction": answer.to_dict(), "predict_s": predict_s,
                                "predicted_same_window": predicted_window, "same_window_cpu": dataclasses.asdict(window),
                                "same_window_probe_frame_ms": {"mean": 1000.0 * float(frame_s.mean()),
                                                               "p99": 1000.0 * float(np.percentile(frame_s, 99))},
                                "streams": n_meas, "ratio_predicted_over_measured": ratio,
                                "within_15pct": ratio is not None and abs(ratio - 1) <= 0.15,
                                "ratio_same_window": ratio_w,
                                "within_15pct_same_window": ratio_w is not None and abs(ratio_w - 1) <= 0.15,
                                "runs": [runs[k] for k in sorted(runs)], "wall_check": wall}
            print(f"{key} {policy}: predicted {predicted} (same window: {predicted_window}), measured {n_meas}"
                  + (f", ratio {ratio:.3f} (same window {ratio_w:.3f})" if ratio else ""), flush=True)
    return {"graph": str(graph.relative_to(REPO)), "name": bundle.name, "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()), "policies": measured}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default="tiny,small")
    ap.add_argument("--policies", default="fifo,drop_late,graph",
                    help="comma-separated; 'graph' = the graph's slo.overload")
    ap.add_argument("--threads", type=int, help="intra-op threads of the engines (default: the machine's cores)")
    ap.add_argument("--probe-frames", type=int, default=48)
    ap.add_argument("--miss-rate", type=float, default=capacity.MISS_RATE)
    ap.add_argument("--min-periods", type=int, default=30, help="frame periods per run, at least")
    ap.add_argument("--min-frames", type=int, default=400, help="frames per run (all streams), at least")
    ap.add_argument("--wall-check", action="store_true", help="rerun the measured n and n+1 on the wall clock")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "capacity.json"))
    args = ap.parse_args()
    import onnxruntime

    t0 = time.time()
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
               "threads": args.threads or os.cpu_count(), "python": platform.python_version(),
               "onnxruntime": onnxruntime.__version__, "machine": platform.machine(),
               "loadavg_start": list(os.getloadavg()), "miss_rate": args.miss_rate,
               "min_periods": args.min_periods, "min_frames": args.min_frames, "graphs": []}
    for key in args.graphs.split(","):
        results["graphs"].append(bench_graph(key.strip(), args))
    results["loadavg_end"] = list(os.getloadavg())
    results["duration_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} ({results['duration_s']:.0f} s; load {results['loadavg_start'][0]:.2f} -> "
          f"{results['loadavg_end'][0]:.2f})")


if __name__ == "__main__":
    main()
