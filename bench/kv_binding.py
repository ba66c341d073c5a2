"""Benchmark: engine I/O per decoder step, before and after binding the KV buffer (issue #14).

*Before* is the path every backend had: ``backend.run("decoder_step", {..., "kv_cache":
kv.data})`` every step (the whole KV buffer passed as an input), ``new_kv`` returned as a
fresh array, then scattered into its slots on the host (``KVBuffer.write``). *After* is the
ONNX Runtime backend's bound path: ``alloc_kv`` once (the buffer wrapped in an OrtValue that
shares its memory and bound with IOBinding), ``decoder_step`` (small inputs bound where they
lie, ``new_kv`` into a preallocated buffer) and ``commit_kv`` (the scatter, from the bound
output). Both run the same ONNX Runtime sessions in one process, interleaved token by token
on two KV buffers holding the same cache, so they see the same machine conditions, and their
logits and caches are compared bit for bit.

What ONNX Runtime really copies is measured separately on synthetic models (a 256 MiB input
read by a Slice; a 256 MiB output written by an Expand) against a numpy copy of the same
bytes, and by comparing data pointers: "bytes crossing the API" (what a call is handed and
hands back) is not "bytes copied".

Models: the ``small`` preset (graphs/streaming_vlm_small.yaml) and, when its bundle exists
(``--real-shapes DIR``; build it once with ``bench/hf_real_shapes.py``, which leaves
``/tmp/streamgraph-bench/bundle-float32``), LLaVA-OneVision-0.5B shapes with random weights.
One intra-op thread. Writes ``bench/results/kv_binding.json``. Not a test. Usage::

    python bench/kv_binding.py [--tokens 24] [--frames 10] [--real-shapes DIR | --no-real-shapes]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamgraph import contract as C  # noqa: E402

MIB = 1 << 20


def _best_ms(fn, n: int = 7) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * min(ts)


# ----------------------------------------------------------------------------- what ORT copies
def ort_copy_probe(mib: int = 256) -> dict:
    """Does ONNX Runtime's Python API copy a numpy input, or an output it returns? Times a
    ``mib`` MiB input read by one Slice and a ``mib`` MiB output written by one Expand, each
    through ``run`` and through IOBinding, against ``np.copyto`` of the same bytes."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h

    n = mib * MIB // 4
    model = lambda nodes, ins, outs, inits: h.make_model(  # noqa: E731
        h.make_graph(nodes, "probe", ins, outs, inits), opset_imports=[h.make_opsetid("", 18)], ir_version=9)
    read = model([h.make_node("Slice", ["X", "s", "e"], ["Y"])], [h.make_tensor_value_info("X", TP.FLOAT, [n])],
                 [h.make_tensor_value_info("Y", TP.FLOAT, [1])],
                 [h.make_tensor("s", TP.INT64, [1], [0]), h.make_tensor("e", TP.INT64, [1], [1])])
    write = model([h.make_node("Expand", ["X", "shape"], ["Y"])], [h.make_tensor_value_info("X", TP.FLOAT, [1])],
                  [h.make_tensor_value_info("Y", TP.FLOAT, [n])], [h.make_tensor("shape", TP.INT64, [1], [n])])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sr = ort.InferenceSession(read.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sw = ort.InferenceSession(write.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x, one, out = np.ones(n, np.float32), np.ones(1, np.float32), np.empty(n, np.float32)
    memcpy = _best_ms(lambda: np.copyto(out, x))
    ov = ort.OrtValue.ortvalue_from_numpy(x)
    br = sr.io_binding()
    br.bind_ortvalue_input("X", ov)
    br.bind_output("Y", "cpu")
    bw = sw.io_binding()
    bw.bind_cpu_input("X", one)
    bw.bind_output("Y", "cpu", 0, np.float32, [n], out.ctypes.data)

    def bound_fresh(sess):          # a new, untouched buffer every run, as run() allocates one
        fresh = np.empty(n, np.float32)
        b = sess.io_binding()
        b.bind_cpu_input("X", one)
        b.bind_output("Y", "cpu", 0, np.float32, [n], fresh.ctypes.data)
        sess.run_with_iobinding(b)

    res = {
        "bytes": n * 4, "numpy_copy_ms": memcpy,
        "input_run_ms": _best_ms(lambda: sr.run(["Y"], {"X": x})),
        "input_bound_ortvalue_ms": _best_ms(lambda: sr.run_with_iobinding(br)),
        "ortvalue_from_numpy_shares_memory": ov.data_ptr() == x.ctypes.data,
        "output_run_ms": _best_ms(lambda: sw.run(["Y"], {"X": one})),
        "output_bound_preallocated_ms": _best_ms(lambda: sw.run_with_iobinding(bw)),
        "output_bound_fresh_ms": _best_ms(lambda: bound_fresh(sw)),
    }
    sw.run_with_iobinding(bw)
    res["bound_output_written_in_place"] = bool(out[0] == 1.0 and out[-1] == 1.0)
    # input: a copy of 256 MiB costs ~numpy_copy_ms; far less means none happened
    res["run_copies_input"] = res["input_run_ms"] > 0.5 * memcpy
    # output: timings of fresh 256 MiB buffers are dominated by page faults and noisy on a
    # loaded machine; decisive is whether numpy allocated (and so copied into) the returned
    # array, or wraps ORT's tensor (no OWNDATA, a capsule as base, nothing traced)
    import tracemalloc

    tracemalloc.start()
    y = sw.run(["Y"], {"X": one})[0]
    res["run_output_numpy_bytes_allocated"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    res["run_output_wraps_ort_tensor"] = (not y.flags.owndata) and type(y.base).__name__ == "PyCapsule"
    res["run_copies_output"] = not res["run_output_wraps_ort_tensor"] or \
        res["run_output_numpy_bytes_allocated"] >= n * 4
    return res


# ----------------------------------------------------------------------------- one model
def _nbytes(shape, dtype: str, t: int) -> int:
    return int(np.prod([t if d == "T" else int(d) for d in shape])) * C.DTYPES[dtype].bytes


def io_accounting(plan, t: int, n_valid: int, consecutive: bool) -> dict:
    """Bytes per decoder step of a ``t``-token chunk, by path: what crosses the engine API
    and what is actually copied (given ``ort_copy_probe``: ORT copies neither numpy inputs nor
    returned outputs on CPU)."""
    dec = plan.engines[C.DECODER_STEP]
    ins = {i.name: _nbytes(i.shape, i.dtype, t) for i in dec.inputs}
    outs = {o.name: _nbytes(o.shape, o.dtype, t) for o in dec.outputs}
    token_kv = outs[C.NEW_KV] // t * n_valid             # the KV of the chunk's valid tokens
    return {
        "T": t, "valid_tokens": n_valid, "inputs": ins, "outputs": outs,
        "before": {
            "crossing_api": sum(ins.values()) + sum(outs.values()),
            "kv_cache_passed": ins[C.KV_CACHE],
            # KVBuffer.write: new_kv[..., mask, :] (a copy), then the scatter
            "copied_host": 2 * token_kv,
            "copied_by_ort": 0,
        },
        "after": {
            "crossing_api": sum(v for k, v in ins.items() if k != C.KV_CACHE) + sum(outs.values()),
            "kv_cache_passed": 0,
            # commit_kv: one slice copy from the bound output (a masked copy + scatter otherwise)
            "copied_host": token_kv if consecutive else 2 * token_kv,
            "copied_by_ort": 0,
        },
    }


def bench_model(label: str, bundle_dir: Path, tokens: int, frames: int, threads: int, filled_frac: float) -> dict:
    from streamgraph.backends import open_backend
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.kv.base import KVBuffer

    bundle = Bundle.load(bundle_dir)
    plan = bundle.plan
    t0 = time.perf_counter()
    be = open_backend("onnxruntime", bundle, threads=threads)
    load_s = time.perf_counter() - t0
    dec = plan.engines[C.DECODER_STEP]
    names = {i.name for i in dec.inputs}
    L, _, _, hkv, S, _ = plan.kv.shape
    k, c = plan.tokens_per_frame, plan.hidden_size
    rng = np.random.default_rng(0)

    before = KVBuffer(plan.kv.shape, plan.kv.dtype)            # today's path: host buffer, run()
    after = be.alloc_kv(plan.kv.shape, plan.kv.dtype)          # bound once
    fill = (0.5 * rng.standard_normal(plan.kv.shape)).astype(before.data.dtype)
    before.data[...] = fill
    after.data[...] = fill
    del fill
    # the timed chunks must fit: one frame's K slots (every frame rewrites them, so each
    # frame is the same work) and tokens + 1 decode tokens
    filled = max(0, min(int(filled_frac * S), S - k - (tokens + 1)))
    address = after.address
    cache_positions = np.arange(S, dtype=np.int64)[None]

    def inputs(embeds, pos):
        t = embeds.shape[1]
        d = {C.INPUTS_EMBEDS: embeds, C.POSITIONS: np.arange(pos, pos + t, dtype=np.int64)[None],
             C.TOKEN_VALID: np.ones((1, t), bool), C.CACHE_POSITIONS: cache_positions,
             C.CACHE_VALID: (np.arange(S) < pos)[None]}
        if C.WINDOW_VALID in names:
            d[C.WINDOW_VALID] = d[C.CACHE_VALID]
        if C.STREAMING_HEADS in names:
            d[C.STREAMING_HEADS] = np.zeros((L, hkv), bool)
        return d

    def step_before(embeds, pos):
        out = be.run(C.DECODER_STEP, {**inputs(embeds, pos), C.KV_CACHE: before.data})
        before.write(out[C.NEW_KV], np.arange(pos, pos + embeds.shape[1], dtype=np.int64))
        return out

    def step_after(embeds, pos):
        out = be.decoder_step(after, inputs(embeds, pos))
        be.commit_kv(after, np.arange(pos, pos + embeds.shape[1], dtype=np.int64))
        return out

    def embed(tok):
        return be.run(C.EMBED_TOKENS, {C.INPUT_IDS: np.array([[tok]], dtype=np.int64)})[C.INPUTS_EMBEDS]

    # frames (T = K, new frames written over the same K slots) then greedy decode (T = 1),
    # before/after interleaved step by step, which path goes first alternating
    # wall time, and CPU time of this thread (ORT with one intra-op thread computes on the
    # calling thread): the CPU time is what other jobs on a shared machine disturb least
    res = {w: {"before": [], "after": []} for w in ("frame_ms", "decode_token_ms", "frame_cpu_ms", "decode_token_cpu_ms")}
    identical, max_diff = True, 0.0
    pos = filled
    for i in range(frames + 1):                         # the first frame is a warm-up
        x = (0.5 * rng.standard_normal((1, k, c))).astype(np.float32)
        outs = {}
        for path, fn in (("before", step_before), ("after", step_after)) if i % 2 else \
                (("after", step_after), ("before", step_before)):
            t1, c1 = time.perf_counter(), time.thread_time()
            outs[path] = fn(x, pos)
            if i:
                res["frame_ms"][path].append(1000 * (time.perf_counter() - t1))
                res["frame_cpu_ms"][path].append(1000 * (time.thread_time() - c1))
        identical &= bool(np.array_equal(outs["before"][C.LOGITS], outs["after"][C.LOGITS]))
        max_diff = max(max_diff, float(np.abs(outs["before"][C.LOGITS] - outs["after"][C.LOGITS]).max()))
    pos += k                  # every timed frame overwrote the same K slots: the same work each time
    tok = {"before": 1, "after": 1}
    for i in range(tokens + 1):                         # the first token is a warm-up
        outs = {}
        for path, fn in (("before", step_before), ("after", step_after)) if i % 2 else \
                (("after", step_after), ("before", step_before)):
            t1, c1 = time.perf_counter(), time.thread_time()
            outs[path] = fn(embed(tok[path]), pos)
            tok[path] = int(np.argmax(outs[path][C.LOGITS][0]))
            if i:
                res["decode_token_ms"][path].append(1000 * (time.perf_counter() - t1))
                res["decode_token_cpu_ms"][path].append(1000 * (time.thread_time() - c1))
        identical &= bool(np.array_equal(outs["before"][C.LOGITS], outs["after"][C.LOGITS]))
        max_diff = max(max_diff, float(np.abs(outs["before"][C.LOGITS] - outs["after"][C.LOGITS]).max()))
        pos += 1
    kv_equal = bool(np.array_equal(before.data, after.data))

    # the engine call alone (no embed_tokens, no scatter, no rebinding), thread CPU time:
    # run() with kv_cache as an input vs run_with_iobinding on the bound buffers
    sess = be.sessions[C.DECODER_STEP]
    for t, n in ((k, frames), (1, tokens)):
        x = (0.5 * rng.standard_normal((1, t, c))).astype(np.float32)
        inp = inputs(x, pos - t)
        feed = {**inp, C.KV_CACHE: before.data}
        outs_names = [o.name for o in sess.get_outputs()]
        for name, value in inp.items():
            after.binding.bind_cpu_input(name, value)
        keep = [np.empty(shape, dt) for _, shape, dt in after.fresh_outputs]     # alive while bound
        for (name, shape, dt), arr in zip(after.fresh_outputs, keep):
            after.binding.bind_output(name, "cpu", 0, dt, shape, arr.ctypes.data)
        after.bind_outputs(t)
        engine = {"before": [], "after": []}
        calls = {"before": lambda: sess.run(outs_names, feed), "after": lambda: sess.run_with_iobinding(after.binding)}
        for i in range(n + 1):
            for path in (("before", "after") if i % 2 else ("after", "before")):
                c1 = time.thread_time()
                calls[path]()
                if i:
                    engine[path].append(1000 * (time.thread_time() - c1))
        res[f"engine_only_T{t}_cpu_ms"] = engine
        del keep
    after.pending_new_kv = None
    assert after.address == address == after.data.ctypes.data == after.ortvalue.data_ptr()

    # the per-step costs outside the engine, timed alone
    x1 = embed(1)
    inp1 = inputs(x1, pos)
    bind_us = 1000 * _best_ms(lambda: [after.binding.bind_cpu_input(n, v) for n, v in inp1.items()]
                              + [after.binding.bind_output(n, "cpu", 0, dt, sh, np.empty(sh, dt).ctypes.data)
                                 for n, sh, dt in after.fresh_outputs], 50)
    rebind_t_us = 1000 * _best_ms(lambda: (after.bind_outputs(k), after.bind_outputs(1)), 50) / 2
    out1 = be.run(C.DECODER_STEP, {**inp1, C.KV_CACHE: before.data})
    slots1 = np.array([S - 1], dtype=np.int64)
    scatter_before_us = 1000 * _best_ms(lambda: before.write(out1[C.NEW_KV], slots1), 50)

    def scatter_after():
        after.pending_new_kv = after.outputs[C.NEW_KV]
        be.commit_kv(after, slots1)
    after.bind_outputs(1)
    scatter_after_us = 1000 * _best_ms(scatter_after, 50)
    kv_copy_ms = _best_ms(lambda: np.copyto(before.data, after.data), 5)

    summary = {}
    for what in res:
        b, a = res[what]["before"], res[what]["after"]
        summary[what] = {"before_median": statistics.median(b), "after_median": statistics.median(a),
                         "before_min": min(b), "after_min": min(a),
                         "before_over_after": statistics.median(b) / statistics.median(a), "runs": res[what]}
    return {
        "label": label, "bundle": str(bundle_dir), "kv_shape": plan.kv.shape, "kv_bytes": plan.kv.bytes,
        "kv_dtype": plan.kv.dtype, "tokens_per_frame": k, "T_max": dec.dims["T"][1],
        "decoder_inputs": [i.name for i in dec.inputs], "ort_load_s": load_s,
        "capacity": S, "cache_filled_slots_at_start": filled, "frames": frames, "decode_tokens": tokens,
        "bytes_per_step": {"decode": io_accounting(plan, 1, 1, True), "frame": io_accounting(plan, k, k, True)},
        "bound_output_buffer_bytes": after.output_nbytes,
        "latency": summary,
        "outputs": {"logits_bit_identical": identical, "logits_max_abs_diff": max_diff,
                    "kv_cache_bit_identical": kv_equal},
        "per_step_overheads_us": {"bind_small_inputs_and_fresh_outputs": bind_us,
                                  "rebind_new_kv_for_a_new_T": rebind_t_us,
                                  "scatter_one_token_before (KVBuffer.write)": scatter_before_us,
                                  "scatter_one_token_after (commit_kv)": scatter_after_us},
        "copy_whole_kv_buffer_ms": kv_copy_ms,
    }


def _print_model(r: dict) -> None:
    mib = lambda b: f"{b / MIB:.3f} MiB" if b >= MIB else f"{b / 1024:.1f} KiB"  # noqa: E731
    print(f"\n== {r['label']}: KV {r['kv_shape']} {r['kv_dtype']} = {mib(r['kv_bytes'])}; "
          f"{r['cache_filled_slots_at_start']} slots filled at start")
    for kind, acc in r["bytes_per_step"].items():
        b, a = acc["before"], acc["after"]
        print(f"  {kind:6s} step (T={acc['T']}): crossing the API {mib(b['crossing_api'])} -> {mib(a['crossing_api'])}; "
              f"copied {mib(b['copied_host'] + b['copied_by_ort'])} -> {mib(a['copied_host'] + a['copied_by_ort'])}")
    for what, s in r["latency"].items():
        print(f"  {what:20s} before {s['before_median']:8.2f} ms (min {s['before_min']:.2f})  after "
              f"{s['after_median']:8.2f} ms (min {s['after_min']:.2f})  before/after {s['before_over_after']:.3f}")
    o = r["outputs"]
    print(f"  logits bit-identical: {o['logits_bit_identical']} (max |diff| {o['logits_max_abs_diff']:.1e}); "
          f"KV bit-identical: {o['kv_cache_bit_identical']}")
    print("  per-step overheads (us): " + ", ".join(f"{k} {v:.1f}" for k, v in r["per_step_overheads_us"].items()))
    print(f"  (a copy of the whole KV buffer would cost {r['copy_whole_kv_buffer_ms']:.2f} ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", default=str(REPO / "graphs" / "streaming_vlm_small.yaml"))
    ap.add_argument("--real-shapes", default="/tmp/streamgraph-bench/bundle-float32",
                    help="compiled LLaVA-OneVision-0.5B-shapes bundle (bench/hf_real_shapes.py builds it)")
    ap.add_argument("--no-real-shapes", action="store_true")
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens timed per path")
    ap.add_argument("--frames", type=int, default=10, help="frame chunks (T = K) timed per path")
    ap.add_argument("--real-frames", type=int, default=4, help="frame chunks timed per path at the 0.5B shapes")
    ap.add_argument("--filled", type=float, default=0.5, help="fraction of the cache valid at the start")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "kv_binding.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import onnxruntime

    from streamgraph.compiler.compile import compile_graph

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    probe = ort_copy_probe()
    print(f"ONNX Runtime {onnxruntime.__version__} copy probe (256 MiB): numpy copy {probe['numpy_copy_ms']:.1f} ms; "
          f"run() with it as input {probe['input_run_ms']:.3f} ms (copies: {probe['run_copies_input']}); "
          f"run() returning it {probe['output_run_ms']:.1f} ms (wraps ORT's tensor: {probe['run_output_wraps_ort_tensor']}, "
          f"copies: {probe['run_copies_output']}); OrtValue shares numpy memory: "
          f"{probe['ortvalue_from_numpy_shares_memory']}")
    models = []
    small = compile_graph(Path(args.small), REPO / "build" / "streaming-vlm-small").bundle.path
    models.append(bench_model("small preset (graphs/streaming_vlm_small.yaml)", small, args.tokens, args.frames,
                              args.threads, args.filled))
    _print_model(models[-1])
    real = Path(args.real_shapes)
    if not args.no_real_shapes:
        if (real / "manifest.json").is_file():
            models.append(bench_model("LLaVA-OneVision-0.5B shapes (random weights)", real, args.tokens,
                                      args.real_frames, args.threads, args.filled))
            _print_model(models[-1])
        else:
            print(f"(no real-shapes bundle at {real}: run bench/hf_real_shapes.py first)")
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": commit,
        "machine": {"processor": platform.processor(), "machine": platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "python": platform.python_version(),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "onnxruntime": onnxruntime.__version__,
        "wall_s": time.perf_counter() - t0,
        "ort_copy_probe": probe,
        "models": models,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
