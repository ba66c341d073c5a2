"""Scheduler benchmark: real time, vtest.avi, offered load 1x and 2x this machine's capacity.

For each load and each overload policy (plus the unbounded FIFO baseline), in one run:
frames processed within deadline, drops, p50/p99 end-to-end latency, max queue length, the
latency trend (last tenth vs first tenth of the run) and a question's TTFT. Capacity is
measured by calibration at the start of the run (1 / predicted cost of a full-budget frame),
and the video is replayed at the speed that offers the chosen multiple of it.

    python bench/scheduler.py [--graph graphs/streaming_vlm_small.yaml] [--seconds 20]

Prints a table, writes bench/results/scheduler.json and docs/img/scheduler.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamgraph.compiler.compile import compile_graph  # noqa: E402
from streamgraph.runtime import sources  # noqa: E402
from streamgraph.runtime.clock import SimulatedClock, WallClock  # noqa: E402
from streamgraph.runtime.runner import Question, StreamRunner  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", default=str(REPO / "graphs" / "streaming_vlm_small.yaml"))
    ap.add_argument("--video", default=str(REPO.parent / "shared" / "data" / "vtest.avi"))
    ap.add_argument("--seconds", type=float, default=20.0, help="wall seconds of stream per run")
    ap.add_argument("--loads", default="1,2", help="offered load as multiples of measured capacity")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scheduler.json"))
    args = ap.parse_args()

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
