"""A million frames at full speed: flat memory and a report() whose cost does not grow.

What it exercises: the runtime's own per-frame path over a compiled graph
(``graphs/streaming_vlm.yaml``, compiled for the torch target only to get its plan,
tokenizer and prompt — no engine ever runs): ``StreamRunner`` (queues, EDF, overload policy
``drop_late``) -> ``Session.run_decided`` -> preprocessing of a 64x64 frame -> encoder and
reducer stages -> the cache policy's ``plan_step``/``commit`` and the in-place write of the
KV buffer -> the NaN/Inf guard on every output -> the record: running aggregates (DDSketch
percentiles), the in-memory window, and one JSON line per frame flushed to
``records.jsonl``; a question every 10,000 frames goes through prefill, decoding and the
turn's close. The engines are replaced by a trivial backend that returns constant arrays
of the planned shapes (all tokens kept), so 1,000,000 frames take minutes, not days: the
figures are about the runtime's bookkeeping, not the model.

Measured: the process's resident memory (``/proc/self/statm``) after a warm-up (frames, a
few questions and one report serialised to JSON) and then every ``--sample-every`` frames
(growth target <= 1 MB), and the time of ``report()`` plus serialising it to JSON at
several frame counts (should be flat). The engine-free bundle is compiled in a child
process, so torch never enters the measured one.

Usage (from the repository root)::

    python bench/long_stream.py                        # 1,000,000 frames (several minutes)
    python bench/long_stream.py --frames 100000        # quick look

Writes ``bench/results/long_stream.json`` and prints a summary.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class TrivialBackend:
    """Constant outputs of the planned shapes (``T`` from the first input that has it):
    floats 0.01, booleans True (every reduced token kept), integers 0..n-1 on the last axis.
    Arrays are built once per (engine, T) and reused."""

    name = "trivial"

    def __init__(self, plan):
        self.plan = plan
        self._cache: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.plan.engines[engine]
        t = 0
        for s in spec.inputs:
            if "T" in s.shape:
                t = inputs[s.name].shape[s.shape.index("T")]
                break
        key = (engine, t)
        out = self._cache.get(key)
        if out is None:
            out = {}
            for s in spec.outputs:
                shape = tuple(t if d == "T" else int(d) for d in s.shape)
                dtype = _NP[s.dtype]
                if dtype == np.bool_:
                    a = np.ones(shape, dtype)
                elif dtype == np.int64:
                    a = np.broadcast_to(np.arange(shape[-1], dtype=np.int64), shape).copy()
                else:
                    a = np.full(shape, 0.01, dtype)
                out[s.name] = a
            self._cache[key] = out
        return out


def frames(n: int, fps: float, size: tuple[int, int]):
    from streamgraph.runtime.sources import Frame

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    for k in range(n):
        yield Frame(image=image, timestamp=k / fps, index=k, source_index=k)


def report_cost(session, repeats: int = 5) -> dict:
    """Median seconds of ``report()`` alone and of ``report()`` + JSON (what report.json costs)."""
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rep = session.report()
        t1 = time.perf_counter()
        text = json.dumps(rep.to_dict())
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t0)
    return {"report_s": float(np.median(a)), "report_json_s": float(np.median(b)), "json_bytes": len(text)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--fps", type=float, default=30.0, help="capture rate of the synthetic stream")
    p.add_argument("--warmup", type=int, default=50_000, help="frames before the RSS baseline")
    p.add_argument("--sample-every", type=int, default=50_000)
    p.add_argument("--question-every", type=int, default=10_000, help="frames between questions (0: none)")
    p.add_argument("--report-at", default="1000,10000,100000,1000000",
                   help="frame counts at which report() is timed")
    p.add_argument("--keep-records", action="store_true", help="keep records.jsonl (else deleted)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "long_stream.json"))
    args = p.parse_args(argv)

    from streamgraph.compiler.bundle import Bundle
    from streamgraph.runtime.stream import SimulatedClock
    from streamgraph.runtime.stream import Question, StreamRunner
    from streamgraph.runtime.session import Session

    work = Path(tempfile.mkdtemp(prefix="long_stream-"))
    # compiled in a child process, so torch never enters this one (RSS is the runtime's)
    subprocess.run([sys.executable, "-c", "import sys; from streamgraph.compiler.compile import compile_graph; "
                    "compile_graph(sys.argv[1], sys.argv[2], target='torch')",
                    str(ROOT / "graphs" / "streaming_vlm.yaml"), str(work / "bundle")], check=True, cwd=ROOT)
    bundle = Bundle.load(work / "bundle")
    session = Session(bundle, TrivialBackend(bundle.plan), clock=SimulatedClock(), overload="drop_late")
    session.calibrate()
    records = work / "records.jsonl"
    session.write_records(records)
    fps = args.fps
    n = args.frames
    qs = ([Question(at=k / fps + 0.5 / fps, text="what changed?")
           for k in range(args.question_every, n, args.question_every)] if args.question_every else [])
    report_at = sorted({int(x) for x in args.report_at.split(",") if int(x) <= n})
    rss: list[tuple[int, int]] = []
    costs: list[dict] = []
    state = {"t0": time.perf_counter()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def result(done: int, seconds: float, final: bool) -> dict:
        base = rss[0][1] if rss else 0
        growth = (max(r for _, r in rss) - base) if rss else 0
        summary = session.report().summary
        return {
            "frames": done, "frames_planned": n, "complete": final, "fps": fps, "seconds": seconds,
            "frames_per_s": done / seconds if seconds else None,
            "what": "Session + StreamRunner + records.jsonl with a trivial backend (constant engine outputs)",
            "graph": "graphs/streaming_vlm.yaml", "history": session.history,
            "records_jsonl_bytes": records.stat().st_size,
            "summary": {k: summary[k] for k in ("sampled", "processed", "dropped", "errors", "questions")},
            "rss_after_warmup_mib": base / MiB, "rss_growth_bytes": growth, "rss_growth_mib": growth / MiB,
            "rss_samples": [{"frames": k, "rss_mib": r / MiB} for k, r in rss],
            "report_cost": costs,
            "python": sys.version.split()[0],
        }

    def on_frame(stream, rec) -> None:
        k = session.stats.sampled
        if k in report_at:
            costs.append({"frames": k, **report_cost(session)})
        if k == args.warmup:
            report_cost(session)          # the warm-up includes building one report.json
        if k >= args.warmup and (k - args.warmup) % args.sample_every == 0:
            gc.collect()
            rss.append((k, rss_bytes()))
            el = time.perf_counter() - state["t0"]
            print(f"{k:>9,} frames  {el:7.1f} s  ({k / el:,.0f} frames/s)  RSS {rss[-1][1] / MiB:7.2f} MiB  "
                  f"window {len(session.frames)}", flush=True)
            out.write_text(json.dumps(result(k, el, False), indent=2) + "\n")    # partial, if stopped

    t0 = time.perf_counter()
    runner = StreamRunner([(session, frames(n, fps, tuple(bundle.plan.image_size)))], questions=qs,
                          on_frame=on_frame)
    while runner.step():
        pass
    seconds = time.perf_counter() - t0
    session.close_records()
    gc.collect()
    rss.append((n, rss_bytes()))
    res = result(n, seconds, True)
    lines = res["records_jsonl_lines"] = sum(1 for _ in open(records, "rb"))
    base, growth = res["rss_after_warmup_mib"] * MiB, res["rss_growth_bytes"]
    if not args.keep_records:
        shutil.rmtree(work, ignore_errors=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{n:,} frames in {seconds:.0f} s ({n / seconds:,.0f} frames/s); records.jsonl {lines:,} lines")
    print(f"RSS after {args.warmup:,} frames {base / MiB:.2f} MiB, growth after that {growth / 1024:.0f} KiB "
          f"(target <= 1024 KiB)")
    for c in costs:
        print(f"report() at {c['frames']:>9,} frames: {1000 * c['report_s']:.2f} ms "
              f"(+ JSON {1000 * c['report_json_s']:.2f} ms, {c['json_bytes']:,} bytes)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
