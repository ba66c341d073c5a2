"""Scheduler benchmark: real time, vtest.avi, offered load 1x and 2x this machine's capacity.

For each load and each overload policy (plus the unbounded FIFO baseline), in one run:
frames processed within deadline, drops, p50/p99 end-to-end latency, max queue length, the
latency trend (last tenth vs first tenth of the run) and a question's TTFT. Capacity is
measured by calibration at the start of the run (1 / predicted cost of a full-budget frame),
and the video is replayed at the speed that offers the chosen multiple of it.

    python bench/scheduler.py [--graph graphs/streaming_vlm_small.yaml] [--seconds 20]

Prints a table, writes bench/results/scheduler.json and docs/img/scheduler.png.

``--fairness`` runs the multi-stream benchmark instead: N identical cameras (the same clip,
the same capture times) share one executor at an offered load of ``--fair-load`` x capacity,
for every overload policy, with the runner's :class:`FairEDF` and with the plain EDF it
replaced (deadline ties to the lower stream index); frames served per stream, in real time
with the real engines and on the simulated clock with the calibrated costs. Writes
bench/results/scheduler_fairness.json.

    python bench/scheduler.py --fairness [--streams 3,8] [--fair-load 1.2] [--frames-per-stream 120]

``--fair-campaign N`` (simulated clock only, no engines, about a minute for 120): N seeded
random configurations — 2 to 8 streams, load 1.05 to 3x, cameras in phase, a few ms apart
or anywhere in the frame period, with or without cost jitter — and, per policy, the largest
deviation of a stream's frames served from the mean. Writes
bench/results/scheduler_fairness_campaign.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamgraph.compiler.compile import compile_graph  # noqa: E402
from streamgraph.runtime import sources  # noqa: E402
from streamgraph.runtime.stream import SimulatedClock, WallClock  # noqa: E402
from streamgraph.runtime.stream import Question, StreamRunner  # noqa: E402
from streamgraph.runtime.scheduler import FairEDF, Scheduler  # noqa: E402
from streamgraph.runtime.simulate import SimulatedSession  # noqa: E402
from streamgraph.runtime.session import Session  # noqa: E402

POLICIES = ("fifo", "drop_late", "latest_only", "degrade")


def run_one(bundle: Path, video: Path, policy: str, speed: float, seconds: float, native_fps: float,
            frame_size, ask_at: float, threads: int | None) -> dict:
    session = Session.open(bundle, "onnxruntime", clock=SimulatedClock(), overload=policy, threads=threads)
    session.calibrate(repeats=3)
    n_frames = int(seconds * native_fps * speed)
    src = sources.video(video, fps=None, size=tuple(frame_size), max_frames=n_frames)
    frames = list(src)                                   # decoded up front: the loop measures the model only
    session.clock = WallClock()
    q = Question(at=ask_at, text="What is happening?", max_new_tokens=8)
    runner = StreamRunner([(session, frames)], questions=[q], speed=speed)
    t0 = time.perf_counter()
    (rep,) = runner.run()
    wall = time.perf_counter() - t0
    ran = [f for f in rep.frames if f.decision == "run"]
    lat = [f.latency_ms for f in ran]
    tenth = max(1, len(ran) // 10)
    return {
        "policy": policy, "speed": speed, "offered_fps": native_fps * speed, "sampled": len(rep.frames),
        "processed": len(ran), "in_deadline": sum(1 for f in ran if f.deadline_met),
        "dropped": rep.summary["dropped"], "misses": rep.summary["deadline_misses"],
        "p50_ms": float(np.percentile(lat, 50)) if lat else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat else None,
        "first_tenth_ms": float(np.mean(lat[:tenth])) if lat else None,
        "last_tenth_ms": float(np.mean(lat[-tenth:])) if lat else None,
        "max_queue": runner.max_queue[0], "ttft_ms": rep.questions[0].ttft_ms if rep.questions else None,
        "budgets_used": sorted({f.budget for f in ran}), "wall_s": wall,
        "latency_series": [(f.capture, f.latency_ms) for f in ran],
        "overran": {k: sum(1 for f in ran if f.overran == k) for k in {f.overran for f in ran if f.overran}},
    }


class PlainEDF(FairEDF):
    """The rule FairEDF replaced: earliest deadline, ties to the lower stream index."""

    def pick(self, heads, now):
        return min(heads, key=lambda h: (h[1], h[0]))[0]


def fairness_runs(bundle: Path, video: Path, n_streams: int, load: float, n_frames: int, native_fps: float,
                  frame_size, capacity: float, costs: dict, threads: int | None) -> list[dict]:
    """N identical streams of ``n_frames`` frames at ``load`` x capacity, every policy,
    FairEDF vs plain EDF, real engines on the wall clock and SimulatedSession with the
    calibrated costs."""
    per_stream_fps = load * capacity / n_streams
    speed = per_stream_fps / native_fps
    frames = list(sources.video(video, fps=None, size=tuple(frame_size), max_frames=n_frames))
    rows = []
    for policy in ("drop_late", "degrade", "latest_only"):
        for rule in ("edf", "fair"):
            for mode in ("real", "simulated"):
                if mode == "real":
                    sessions = []
                    for _ in range(n_streams):
                        s = Session.open(bundle, "onnxruntime", clock=SimulatedClock(), overload=policy, threads=threads)
                        s.calibrate(repeats=3)
                        sessions.append(s)
                    clock = WallClock()
                else:
                    clock = SimulatedClock()
                    sessions = []
                    for _ in range(n_streams):
                        s = SimulatedSession(Scheduler(policy, costs["deadline_ms"], 1000.0, budgets=costs["budgets"]),
                                             costs["stages"], clock=clock)
                        s.calibrate()
                        sessions.append(s)
                for s in sessions:
                    s.clock = clock
                runner = StreamRunner([(s, frames) for s in sessions], speed=speed)
                if rule == "edf":
                    runner.picker = PlainEDF(n_streams)
                reps = runner.run()
                served = [r.summary["processed"] for r in reps]
                mean = sum(served) / n_streams
                row = {"streams": n_streams, "load": load, "policy": policy, "rule": rule, "mode": mode,
                       "offered_per_stream": len(frames), "served": served, "wall_s": clock.now() if mode == "real" else None,
                       "in_deadline": [sum(1 for f in r.frames if f.decision == "run" and f.deadline_met) for r in reps],
                       "max_dev_pct": 100 * max(abs(x - mean) for x in served) / mean if mean else None}
                rows.append(row)
                print(f"{n_streams} streams {load:g}x {policy:11s} {rule:4s} {mode:9s} served {served} "
                      f"(max deviation from mean {row['max_dev_pct']:.1f}%)", flush=True)
    return rows


def fairness_main(args) -> None:
    bundle = compile_graph(args.graph, REPO / "build" / "bench-scheduler").bundle.path
    probe = Session.open(bundle, "onnxruntime", threads=args.threads)
    probe.calibrate(repeats=5)
    full = probe.budgets[-1]
    frame_s = probe.scheduler.costs.predict_frame(full)
    capacity = 1.0 / frame_s
    native = sources.video(args.video).native_fps()
    stages = {}
    for st in ("preprocess", "encode", "reduce", "prefill"):
        if st in ("reduce", "prefill"):
            stages[st] = {b: probe.scheduler.costs.predict(st, b) or 0.0 for b in probe.budgets}
        else:
            stages[st] = probe.scheduler.costs.predict(st) or 0.0
    costs = {"stages": stages, "budgets": probe.budgets, "deadline_ms": probe.scheduler.frame_deadline * 1000}
    print(f"bundle {bundle.name}: full-budget frame {1000 * frame_s:.1f} ms -> capacity {capacity:.2f} fps")
    rows = []
    for n in (int(x) for x in args.streams.split(",")):
        rows += fairness_runs(bundle, Path(args.video), n, args.fair_load, args.frames_per_stream, native,
                              probe.plan.image_size, capacity, costs, args.threads)
    out = Path(args.out).with_name("scheduler_fairness.json") if args.out == DEFAULT_OUT else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"capacity_fps": capacity, "frame_ms": 1000 * frame_s, "budgets": probe.budgets, "costs": costs,
            "graph": args.graph, "frames_per_stream": args.frames_per_stream, "command": " ".join(sys.argv),
            "load_average_at_end": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


DEFAULT_OUT = str(REPO / "bench" / "results" / "scheduler.json")


def fairness_campaign(n_cases: int, seed: int = 0) -> dict:
    """Seeded random multi-stream configurations on the simulated clock; see the module doc."""
    from streamgraph.runtime.sources import Frame

    rng = np.random.default_rng(seed)
    img = np.zeros((2, 2, 3), np.uint8)
    cases = []
    # the worst case found while developing FairEDF (another seed), kept as case 0
    known = [("latest_only", 5, 1.3689096615831366, 0.0,
              np.array([0.03180174, 0.07108799, 0.04603553, 0.05074699, 0.07896657]))]
    for i in range(n_cases + len(known)):
        if i < len(known):
            policy, n, load, jitter, phases = known[i]
        else:
            policy = ("drop_late", "degrade", "latest_only")[i % 3]
            n = int(rng.integers(2, 9))
            load = float(rng.uniform(1.05, 3.0))
            jitter = float(rng.choice([0.0, 0.1]))
            spread = float(rng.choice([0.0, 0.05, 1.0]))          # in phase, a few ms, anywhere
            phases = rng.uniform(0, 0.1, n) * spread
        clock = SimulatedClock()
        c = load / (n * 10.0)                                       # 10 fps per camera
        sessions = []
        for j in range(n):
            s = SimulatedSession(Scheduler(policy, 300.0, 500.0, budgets=[16, 32, 64]),
                                 {"encode": c / 2, "prefill": {16: c / 10, 32: c / 4, 64: c / 2}},
                                 clock=clock, jitter=jitter, seed=j)
            s.calibrate()
            sessions.append(s)
        streams = [(s, [Frame(image=img, timestamp=phases[j] + k / 10.0, index=k, source_index=k)
                        for k in range(200)]) for j, s in enumerate(sessions)]
        served = [r.summary["processed"] for r in StreamRunner(streams).run()]
        mean = sum(served) / n
        cases.append({"policy": policy, "streams": n, "load": load, "jitter": jitter,
                      "phases_s": phases.tolist(), "served": served,
                      "max_dev_pct": 100 * max(abs(x - mean) for x in served) / mean,
                      "min_vs_mean_pct": 100 * (min(served) - mean) / mean})
    worst = {}
    for p in ("drop_late", "degrade", "latest_only"):
        mine = [c for c in cases if c["policy"] == p]
        worst[p] = {"cases": len(mine), "max_dev_pct": max(c["max_dev_pct"] for c in mine),
                    "min_vs_mean_pct": min(c["min_vs_mean_pct"] for c in mine),
                    "within_10pct": sum(c["max_dev_pct"] <= 10 for c in mine)}
        print(f"{p:11s} {len(mine)} cases: largest deviation from the mean {worst[p]['max_dev_pct']:.1f}%, "
              f"least-served stream {worst[p]['min_vs_mean_pct']:+.1f}% of the mean, "
              f"{worst[p]['within_10pct']} within 10%")
    return {"worst": worst, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", default=str(REPO / "graphs" / "streaming_vlm_small.yaml"))
    ap.add_argument("--video", default=str(REPO.parent / "shared" / "data" / "vtest.avi"))
    ap.add_argument("--seconds", type=float, default=20.0, help="wall seconds of stream per run")
    ap.add_argument("--loads", default="1,2", help="offered load as multiples of measured capacity")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--fairness", action="store_true", help="multi-stream fairness benchmark instead")
    ap.add_argument("--streams", default="3,8", help="--fairness: numbers of identical streams")
    ap.add_argument("--fair-load", type=float, default=1.2, help="--fairness: offered load x capacity")
    ap.add_argument("--frames-per-stream", type=int, default=120, help="--fairness: frames offered per stream")
    ap.add_argument("--fair-campaign", type=int, default=0, metavar="N",
                    help="N random simulated multi-stream configurations (no engines)")
    args = ap.parse_args()
    if args.fair_campaign:
        res = fairness_campaign(args.fair_campaign)
        out = REPO / "bench" / "results" / "scheduler_fairness_campaign.json"
        out.write_text(json.dumps({"command": " ".join(sys.argv), **res}, indent=1) + "\n")
        print(f"wrote {out}")
        return
    if args.fairness:
        return fairness_main(args)

    bundle = compile_graph(args.graph, REPO / "build" / "bench-scheduler").bundle.path
    probe = Session.open(bundle, "onnxruntime", threads=args.threads)
    probe.calibrate(repeats=5)
    full = probe.budgets[-1]
    frame_s = probe.scheduler.costs.predict_frame(full)
    capacity = 1.0 / frame_s
    native = sources.video(args.video).native_fps()
    frame_size = probe.plan.image_size
    print(f"bundle {bundle.name}: budgets {probe.budgets}, full-budget frame {1000 * frame_s:.1f} ms "
          f"-> capacity {capacity:.2f} fps; video native {native:g} fps")
    rows = []
    for load in (float(x) for x in args.loads.split(",")):
        speed = load * capacity / native
        for policy in POLICIES:
            r = run_one(bundle, Path(args.video), policy, speed, args.seconds, native, frame_size,
                        ask_at=args.seconds / 2, threads=args.threads)
            r["load"] = load
            rows.append(r)
            print(f"load {load:g}x {policy:11s} in-deadline {r['in_deadline']:4d}/{r['sampled']:<4d} dropped "
                  f"{r['dropped']:4d} p50 {r['p50_ms']:8.1f} ms p99 {r['p99_ms']:8.1f} ms "
                  f"first/last tenth {r['first_tenth_ms']:7.1f}/{r['last_tenth_ms']:7.1f} ms "
                  f"maxq {r['max_queue']:4d} ttft {r['ttft_ms']:.0f} ms budgets {r['budgets_used']}", flush=True)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"scheduler, real time, {Path(args.video).name}, capacity {capacity:.2f} fps "
                    f"(deadline {probe.scheduler.frame_deadline * 1000:.0f} ms)")
    for c in ("load", "policy", "in deadline", "dropped", "p50 ms", "p99 ms", "latency first→last tenth",
              "max queue", "TTFT ms", "budgets"):
        t.add_column(c)
    for r in rows:
        t.add_row(f"{r['load']:g}x", r["policy"], f"{r['in_deadline']}/{r['sampled']}", str(r["dropped"]),
                  f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                  f"{r['first_tenth_ms']:.0f} → {r['last_tenth_ms']:.0f}", str(r["max_queue"]),
                  f"{r['ttft_ms']:.0f}", ",".join(map(str, r["budgets_used"])))
    Console(width=200).print(t)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"capacity_fps": capacity, "frame_ms": 1000 * frame_s, "budgets": probe.budgets,
            "deadline_ms": probe.scheduler.frame_deadline * 1000, "graph": args.graph,
            "seconds": args.seconds, "command": " ".join(sys.argv)}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    loads = sorted({r["load"] for r in rows})
    fig, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), 4), dpi=110, squeeze=False)
    for ax, load in zip(axes[0], loads):
        for r in (r for r in rows if r["load"] == load):
            xs, ys = zip(*r["latency_series"]) if r["latency_series"] else ((), ())
            ax.plot(xs, ys, ".", ms=3, label=r["policy"])
        ax.axhline(meta["deadline_ms"], color="k", ls="--", lw=1, label="deadline")
        ax.set_yscale("log")
        ax.set_title(f"offered load {load:g}x capacity")
        ax.set_xlabel("capture time (s, stream)")
        ax.set_ylabel("end-to-end latency (ms)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    img = REPO / "docs" / "img" / "scheduler.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img)
    print(f"wrote {img}")


if __name__ == "__main__":
    main()
