"""KV-cache policies over one hour of stream: process memory, per-frame and per-question cost.

Every policy streams the same 7,200 synthetic frames (one hour at 2 fps; 64x64, tiny preset,
K = 16 visual tokens per frame) through a compiled ONNX bundle with the onnxruntime backend
(the torch-free runtime), with a question every 10 minutes of stream time. Each policy runs
in a fresh worker process (so its RSS is its own) that samples RSS from /proc/self/statm every
``--sample-every`` frames, checks that the KV buffer is the same allocation at the end, and
records the decoder-step ("prefill") time of every frame and the TTFT / per-token decode time
of every question. ``full`` is given a capacity well short of the hour and is expected to
stop with a CapacityError.

The session keeps one FrameRecord (~1 KB) per frame for its report; the worker drains them
into preallocated arrays every sample so that RSS measures the cache policy, not the report.

Usage (from the repository root)::

    python bench/kv_memory.py                       # all policies, 7200 frames
    python bench/kv_memory.py --frames 600 --policies rekv carrier   # quick look

Writes ``bench/results/kv_memory.json`` and ``docs/kv_memory.png``; prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024

#: The policies compared, as the graph file's cache node. Sized to a few thousand slots at
#: most, except full (65,536 slots: about 34 minutes of this stream).
POLICIES = {
    "full": "{op: full, capacity_tokens: 65536}",
    "sink_window": "{op: sink_window, sink_tokens: 4, window_tokens: 1024}",
    "streaming_vlm": "{op: streaming_vlm, sink_tokens: 128, text_window_tokens: 256, vision_window_seconds: 16}",
    "rekv": "{op: rekv, init_tokens: 128, local_tokens: 512, topk: 16, question_tokens: 256, store_blocks: 512}",
    "carrier": "{op: carrier, sink_tokens: 128, carriers: 64, question_tokens: 256}",
}

GRAPH = """\
version: 1
name: kv-{name}
model: {{preset: tiny, seed: 0}}
stream: {{fps: 2, frame_size: [64, 64]}}
nodes:
  encoder: {{op: vision_encoder}}
  pruner:  {{op: topk_saliency, input: encoder, tokens_per_frame: 16}}
  cache:   {cache}
  llm:     {{op: decoder, input: [pruner, query], cache: cache, max_new_tokens: 16}}
slo: {{frame_deadline_ms: 250, ttft_ms: 500, overload: none}}
budget: {{memory_mb: 512}}
"""

QUESTION = "What is moving in the video?"


def rss_bytes() -> int:
    """Resident set size of this process (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------- worker
def worker(bundle: str, frames: int, fps: float, question_every_s: float, sample_every: int,
           threads: int | None, out: str) -> None:
    """Stream ``frames`` synthetic frames through ``bundle``; write the measurements to ``out``."""
    import numpy as np

    from streamgraph.errors import CapacityError
    from streamgraph.runtime import sources
    from streamgraph.runtime.session import Session

    t_start = time.perf_counter()
    session = Session.open(bundle, "onnxruntime", overload="none", threads=threads)
    kv_addr, kv_obj = session.kv.address, session.kv.data
    plan = session.plan
    src = sources.synthetic(frames, fps=fps, size=tuple(plan.image_size))
    prefill_ms = np.full(frames, np.nan)
    frame_ms = np.full(frames, np.nan)
    rss = [(0, rss_bytes())]
    questions, error, done = [], None, 0
    every = int(round(question_every_s * fps))
    try:
        for k in range(frames):
            f = src.frame(k)
            if every and k and k % every == 0:
                pieces = list(session.ask(QUESTION, at=f.timestamp))
                q = session.questions[-1]
                questions.append({"at_frame": k, "ttft_ms": q.ttft_ms, "new_tokens": q.new_tokens,
                                  "decode_ms": q.decode_ms, "answer_chars": len("".join(pieces))})
                session.questions.clear()
            rec = session.push_frame(f)
            prefill_ms[k] = rec.stage_ms.get("prefill", np.nan)
            frame_ms[k] = sum(rec.stage_ms.values())
            done = k + 1
            if done % sample_every == 0:
                session.frames.clear()            # report records drained (see module docstring)
                rss.append((done, rss_bytes()))
    except CapacityError as e:
        error = str(e)
        rss.append((done, rss_bytes()))
    pol = session.policy
    stats = {"slots_in_use": pol.slots_in_use}
    if pol.name == "rekv":
        stats.update(blocks=pol.n_blocks, store_ram_blocks=pol.store.ram_blocks,
                     store_disk_blocks=pol.store.disk_blocks, store_disk_bytes=pol.store.disk_bytes,
                     store_ram_bytes=pol.store.ram_bytes, retrieval_passes=pol.retrieval_passes)
    if pol.name == "carrier":
        stats.update(dropped=pol.dropped)
    ran = prefill_ms[:done]
    result = {
        "policy": plan.cache["op"], "params": plan.cache["params"], "capacity": plan.cache["capacity"],
        "regions": plan.cache["regions"], "kv_bytes": plan.kv.bytes, "host_bytes": plan.cache["host_bytes"],
        "frames_requested": frames, "frames_done": done, "error": error,
        "kv_buffer_same_allocation": session.kv.data is kv_obj and session.kv.data.ctypes.data == kv_addr,
        "rss": rss, "prefill_ms": [None if np.isnan(x) else round(float(x), 4) for x in ran],
        "frame_ms_p50": float(np.nanpercentile(frame_ms[:done], 50)) if done else None,
        "prefill_ms_p50": float(np.nanpercentile(ran, 50)) if done else None,
        "prefill_ms_p95": float(np.nanpercentile(ran, 95)) if done else None,
        "questions": questions, "stats": stats, "wall_s": time.perf_counter() - t_start,
    }
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- driver
def compile_bundles(names: list[str], build: Path) -> dict[str, Path]:
    from streamgraph.compiler.compile import compile_graph

    build.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        g = build / f"kv-{name}.yaml"
        g.write_text(GRAPH.format(name=name, cache=POLICIES[name]))
        res = compile_graph(g, build / f"kv-{name}")
        out[name] = res.bundle.path
        print(f"{'compiled' if res.rebuilt else 'up to date'}: {res.bundle.path}", flush=True)
    return out


def summarize(results: dict[str, dict]) -> list[dict]:
    import numpy as np

    rows = []
    for name, r in results.items():
        rss = np.array(r["rss"], dtype=np.float64)
        # steady state: RSS change over the last half of what ran (MiB)
        half = rss[rss[:, 0] >= r["frames_done"] / 2]
        qs = r["questions"]
        dec = [d for q in qs for d in q["decode_ms"]]
        rows.append({
            "policy": name, "slots": r["capacity"], "kv_MiB": r["kv_bytes"] / MiB,
            "host_MiB": r["host_bytes"] / MiB, "frames": r["frames_done"],
            "stopped": "CapacityError" if r["error"] else "",
            "rss_start_MiB": rss[1, 1] / MiB if len(rss) > 1 else rss[0, 1] / MiB,
            "rss_end_MiB": rss[-1, 1] / MiB,
            "rss_growth_last_half_MiB": (half[-1, 1] - half[0, 1]) / MiB if len(half) > 1 else 0.0,
            "prefill_ms_p50": r["prefill_ms_p50"], "prefill_ms_p95": r["prefill_ms_p95"],
            "frame_ms_p50": r["frame_ms_p50"],
            "ttft_ms_median": float(np.median([q["ttft_ms"] for q in qs])) if qs else None,
            "decode_ms_median": float(np.median(dec)) if dec else None,
            "questions": len(qs), "kv_same_allocation": r["kv_buffer_same_allocation"],
        })
    return rows


def per_minute_medians(prefill_ms: list, fps: float) -> list[float | None]:
    """Median decoder-step time (ms) of each minute of stream."""
    import numpy as np

    w = max(1, int(round(60 * fps)))
    p = np.array([np.nan if x is None else x for x in prefill_ms], dtype=np.float64)
    out = []
    for i in range(0, len(p), w):
        chunk = p[i:i + w]
        out.append(None if np.all(np.isnan(chunk)) else round(float(np.nanmedian(chunk)), 4))
    return out


def slim(results: dict[str, dict], fps: float) -> dict[str, dict]:
    """Results for the JSON file: per-frame timings replaced by per-minute medians."""
    out = {}
    for name, r in results.items():
        r = dict(r)
        r["prefill_ms_median_per_minute"] = per_minute_medians(r.pop("prefill_ms"), fps)
        out[name] = r
    return out


def plot(results: dict[str, dict], fps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, z, b) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for name, r in results.items():
        rss = np.array(r["rss"], dtype=np.float64)
        minutes = rss[1:, 0] / fps / 60.0
        (line,) = a.plot(minutes, rss[1:, 1] / MiB, label=name)
        if r["error"]:
            a.plot(minutes[-1], rss[-1, 1] / MiB, "x", color=line.get_color(), markersize=10, mew=2)
            a.annotate("CapacityError", (minutes[-1], rss[-1, 1] / MiB), textcoords="offset points",
                       xytext=(6, -12), color=line.get_color(), fontsize=8)
        else:   # zoom: change since the first sample (after session start + first frames)
            z.plot(minutes, (rss[1:, 1] - rss[1, 1]) / MiB, label=name, color=line.get_color())
        med = np.array([np.nan if x is None else x for x in r["prefill_ms_median_per_minute"]])
        b.plot(np.arange(len(med)) + 0.5, med, label=name, color=line.get_color())
    a.set_ylabel("process RSS (MiB)")
    a.set_yscale("log")
    a.set_title(f"KV-cache policies, {max(r['frames_requested'] for r in results.values()):,} frames "
                f"at {fps:g} fps, tiny preset, onnxruntime CPU")
    a.legend(loc="center right", fontsize=8)
    a.grid(alpha=0.3, which="both")
    z.set_ylabel("RSS change since first sample (MiB)")
    z.legend(loc="upper left", fontsize=8)
    z.grid(alpha=0.3)
    b.set_ylabel("decoder step per frame (ms, median / 1 min)")
    b.set_xlabel("stream time (minutes)")
    b.set_yscale("log")
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=7200)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--question-every", type=float, default=600.0, help="seconds of stream time")
    ap.add_argument("--sample-every", type=int, default=60, help="frames between RSS samples")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--build", default=str(ROOT / "build" / "bench-kv"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "kv_memory.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "kv_memory.png"))
    ap.add_argument("--worker", nargs=2, metavar=("BUNDLE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.frames, args.fps, args.question_every, args.sample_every,
               args.threads, args.worker[1])
        return 0

    bundles = compile_bundles(args.policies, Path(args.build))
    results: dict[str, dict] = {}
    for name in args.policies:
        out = Path(args.build) / f"{name}.result.json"
        cmd = [sys.executable, __file__, "--worker", str(bundles[name]), str(out),
               "--frames", str(args.frames), "--fps", str(args.fps),
               "--question-every", str(args.question_every), "--sample-every", str(args.sample_every)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        results[name] = json.loads(out.read_text())
        r = results[name]
        print(f"{name}: {r['frames_done']} frames in {time.perf_counter() - t0:.0f} s"
              f"{' — stopped: ' + r['error'] if r['error'] else ''}", flush=True)
    rows = summarize(results)
    cols = ["policy", "slots", "kv_MiB", "host_MiB", "frames", "stopped", "rss_start_MiB", "rss_end_MiB",
            "rss_growth_last_half_MiB", "prefill_ms_p50", "prefill_ms_p95", "frame_ms_p50",
            "ttft_ms_median", "decode_ms_median", "questions", "kv_same_allocation"]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(fmt(row[c]) for c in cols))
    meta = {"frames": args.frames, "fps": args.fps, "question_every_s": args.question_every,
            "threads": args.threads, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "command": " ".join(["python", "bench/kv_memory.py", *(argv if argv is not None else sys.argv[1:])])}
    results = slim(results, args.fps)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=1))
    plot(results, args.fps, Path(args.plot))
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
