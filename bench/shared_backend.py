"""Memory of N streams on one shared backend against N separate sessions (same run).

For each graph (default: the tiny and the small presets, ``graphs/streaming_vlm*.yaml``),
compiled once into ``build/bench-shared/<name>``, one fresh child process per
configuration measures its resident memory (``VmRSS`` and peak ``VmHWM`` from
``/proc/self/status``):

* ``baseline``: the runtime imported, the bundle loaded and verified, no engine;
* ``shared-1`` / ``shared-N``: ``Engines.load`` once, then 1 / N sessions on it;
* ``separate-N``: N ``Session.open(bundle_dir)``, each loading its own engines.

Each stream then runs the same work (``--frames`` synthetic frames of its own, one question
after them), so ONNX Runtime's arenas are allocated as in a run, and the child reports its
ORT session count and a digest of every stream's logits: the shared and the separate
configurations must produce identical outputs (checked here, recorded).

Usage (from the repository root)::

    python bench/shared_backend.py                # tiny and small, N = 4
    python bench/shared_backend.py --streams 8 --graphs graphs/streaming_vlm.yaml

Writes ``bench/results/shared_backend.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
GRAPHS = [ROOT / "graphs" / "streaming_vlm.yaml", ROOT / "graphs" / "streaming_vlm_small.yaml"]


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


# ----------------------------------------------------------------------------- child
def child(mode: str, bundle: str, n: int, n_frames: int, threads: int | None) -> dict:
    """One configuration in this (fresh) process; returns its measurements."""
    import onnxruntime as ort

    from streamgraph.compiler.bundle import Bundle
    from streamgraph.runtime.session import Engines, Session
    from streamgraph.runtime.sources import synthetic

    made = []
    real = ort.InferenceSession

    class Counting(real):
        def __init__(self, *a, **k):
            made.append(1)
            super().__init__(*a, **k)

    ort.InferenceSession = Counting
    plan = Bundle.load(bundle).plan
    opts = {"threads": threads} if threads else {}
    rss0 = status_bytes("VmRSS")
    if mode == "baseline":
        return {"rss": rss0, "hwm": status_bytes("VmHWM"), "ort_sessions": 0}
    t0 = time.perf_counter()
    if mode == "shared":
        engines = Engines.load(bundle, **opts)
        sessions = [engines.session(overload="fifo", trace=True) for _ in range(n)]
    else:
        sessions = [Session.open(bundle, overload="fifo", trace=True, **opts) for _ in range(n)]
    open_s = time.perf_counter() - t0
    rss_open = status_bytes("VmRSS")
    h, w = plan.image_size
    digests = []
    for i, s in enumerate(sessions):
        for f in synthetic(n_frames, fps=2, size=(h, w), seed=i):
            s.push_frame(f, budget=s.budgets[-1])
        answer = "".join(s.ask("what is on the screen?", max_new_tokens=4))
        d = hashlib.sha256()
        for t in s.trace:
            d.update(t["kind"].encode())
            d.update(t["logits"].tobytes())
        d.update(s.kv.data.tobytes())
        digests.append({"answer": answer, "digest": d.hexdigest()})
        s.trace.clear()                                   # not part of what a stream holds
    return {"rss": status_bytes("VmRSS"), "hwm": status_bytes("VmHWM"), "rss_after_open": rss_open,
            "rss_before_open": rss0, "open_s": open_s, "ort_sessions": len(made), "streams": digests,
            "kv_bytes_per_stream": plan.kv.bytes}


def run_child(mode: str, bundle: Path, n: int, n_frames: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(bundle), str(n), str(n_frames), str(threads or 0)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- parent
def measure(graph: Path, n: int, n_frames: int, threads: int | None) -> dict:
    from streamgraph.compiler.compile import compile_graph

    res = compile_graph(graph, ROOT / "build" / "bench-shared" / graph.stem)
    bundle = res.bundle.path
    engines_bytes = sum((bundle / e.file).stat().st_size for e in res.bundle.plan.engines.values())
    runs = {"baseline": run_child("baseline", bundle, 1, n_frames, threads),
            "shared-1": run_child("shared", bundle, 1, n_frames, threads),
            f"shared-{n}": run_child("shared", bundle, n, n_frames, threads),
            f"separate-{n}": run_child("separate", bundle, n, n_frames, threads)}
    shared, separate, one = runs[f"shared-{n}"], runs[f"separate-{n}"], runs["shared-1"]
    identical = shared["streams"] == separate["streams"]
    base = runs["baseline"]["rss"]
    return {
        "graph": str(graph.relative_to(ROOT)), "bundle": str(bundle.relative_to(ROOT)), "streams": n,
        "frames_per_stream": n_frames, "engine_files_mib": engines_bytes / MiB,
        "kv_mib_per_stream": shared["kv_bytes_per_stream"] / MiB,
        "ort_sessions": {"shared": shared["ort_sessions"], "separate": separate["ort_sessions"]},
        "rss_mib": {k: v["rss"] / MiB for k, v in runs.items()},
        "peak_rss_mib": {k: v["hwm"] / MiB for k, v in runs.items()},
        "above_baseline_mib": {k: (v["rss"] - base) / MiB for k, v in runs.items() if k != "baseline"},
        "per_extra_stream_mib": {"shared": (shared["rss"] - one["rss"]) / MiB / (n - 1),
                                 "separate": (separate["rss"] - one["rss"]) / MiB / (n - 1)},
        "saved_mib": (separate["rss"] - shared["rss"]) / MiB,
        "open_s": {"shared": shared["open_s"], "separate": separate["open_s"]},
        "outputs_identical": identical,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=5, metavar=("MODE", "BUNDLE", "N", "FRAMES", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--graphs", nargs="+", type=Path, default=GRAPHS)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8, help="frames per stream before its question")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: the cores)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shared_backend.json")
    args = ap.parse_args(argv)
    if args.child:
        mode, bundle, n, n_frames, threads = args.child
        print(json.dumps(child(mode, bundle, int(n), int(n_frames), int(threads) or None)))
        return 0
    if args.streams < 2:
        ap.error("--streams must be >= 2")
    results = []
    for g in args.graphs:
        r = measure(g.resolve(), args.streams, args.frames, args.threads)
        results.append(r)
        n = args.streams
        print(f"{r['graph']}: engines {r['engine_files_mib']:.1f} MiB on disk, KV {r['kv_mib_per_stream']:.1f} MiB "
              f"per stream; ORT sessions shared {r['ort_sessions']['shared']} / separate "
              f"{r['ort_sessions']['separate']}")
        print(f"  RSS: baseline {r['rss_mib']['baseline']:.0f} MiB, 1 stream {r['rss_mib']['shared-1']:.0f}, "
              f"{n} shared {r['rss_mib'][f'shared-{n}']:.0f}, {n} separate {r['rss_mib'][f'separate-{n}']:.0f} "
              f"(saved {r['saved_mib']:.0f} MiB); per extra stream: shared "
              f"{r['per_extra_stream_mib']['shared']:.1f} MiB, separate {r['per_extra_stream_mib']['separate']:.1f} "
              f"MiB; outputs identical: {r['outputs_identical']}")
    out = {"what": __doc__.split("\n\n")[0], "results": results,
           "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
                       "platform": platform.platform()},
           "threads": args.threads or os.cpu_count()}
    import onnxruntime

    out["onnxruntime"] = onnxruntime.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0 if all(r["outputs_identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
