"""Benchmark: LLaVA-OneVision-0.5B shapes through streamgraph's Hugging Face path, ORT vs torch eager.

Writes a random-weight checkpoint with the real shapes of ``llava-onevision-qwen2-0.5b-ov``
(transformers' ``LlavaOnevisionForConditionalGeneration`` + ``save_pretrained``, bf16, sharded
like a hub download), compiles a graph pointing at it (``model: {hf: DIR}``) to ONNX engines
(external data above 1 GiB), then times on this machine, in one run, with the same inputs:

* preprocess — a real 768x576 frame resized to 384x384 (bicubic, antialiased) and normalised
  (numpy, runtime side, backend-independent);
* encode — the ``vision_encoder`` engine: SigLIP-so400m at 384 px (27x27 = 729 patches,
  feature layer -2 of 27, i.e. 26 layers computed), projector, 2x2 bilinear pooling -> 196
  tokens;
* prefill — one frame's 196 tokens through ``decoder_step`` (Qwen2-0.5B, 24 layers) attending to
  a cache with ``--filled`` valid slots of ``--capacity``;
* decode — one token: ``embed_tokens`` + ``decoder_step`` at T=1 over the same cache.

ONNX Runtime (CPU EP) and the eager torch modules the engines were exported from are timed
interleaved (``--warmup`` untimed runs each, then ORT, torch, ORT, torch, ... ``--repeats``
times), so both see
the same machine conditions; the table reports medians (and minima in the JSON) and the ratio
of the medians. Prints a rich table and writes JSON
under ``bench/results/``. Not a test. Usage::

    python bench/hf_real_shapes.py [--dtype float32|float16] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# llava-onevision-qwen2-0.5b-ov: SigLIP-so400m-patch14-384 and Qwen2-0.5B
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14, vision_use_head=False)
QWEN2_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, max_position_embeddings=32768)
VISION_FEATURE_LAYER = -2          # LLaVA-OneVision reads the penultimate so400m layer

GRAPH = """\
version: 1
name: llava-ov-0.5b-shapes-{dtype}
model: {{hf: {ckpt}, dtype: {dtype}}}
stream: {{fps: 1}}
nodes:
  encoder: {{op: vision_encoder}}
  cache:   {{op: sink_window, sink_tokens: 4, window_tokens: {window}}}
  llm:     {{op: decoder, input: [encoder, query], cache: cache, max_new_tokens: 32, prefill_chunk_tokens: 64}}
slo: {{frame_deadline_ms: 10000, ttft_ms: 10000, overload: none}}
budget: {{memory_mb: 16384}}
"""


def _interleaved_ms(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds of each callable in ``fns``: ``warmup`` untimed runs each, then alternating
    timed runs."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1000.0 * (time.perf_counter() - t0))
    return times


def _median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    fn()                                                     # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times), times


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/streamgraph-bench", help="checkpoint + bundle (several GB)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per backend and stage")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--capacity", type=int, default=4096, help="KV-cache slots (sink 4 + window)")
    ap.add_argument("--filled", type=int, default=2048, help="valid cache slots during prefill/decode")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/hf_real_shapes-<dtype>.json)")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from streamgraph.backends.onnxruntime import OnnxRuntimeBackend
    from streamgraph.backends.torch import TorchBackend
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.compiler.compile import compile_graph
    from streamgraph.models.hf_random import QWEN2_SPECIAL_IDS, write_random_checkpoint
    from streamgraph.runtime.pipeline import preprocess_frame
    from streamgraph.runtime.sources import sample_clip, video

    console = Console(width=150)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    ckpt = work / "llava-onevision-qwen2-0.5b-shapes"
    timings: dict[str, float] = {}
    if not (ckpt / "config.json").is_file():
        console.print(f"writing a random-weight checkpoint with the real shapes to {ckpt} ...")
        t0 = time.perf_counter()
        write_random_checkpoint(ckpt, vision=SIGLIP_SO400M_384, text=QWEN2_0_5B, special_ids=QWEN2_SPECIAL_IDS,
                                vision_feature_layer=VISION_FEATURE_LAYER, dtype="bfloat16",
                                max_shard_size="500MB", perturb=0.0, return_model=False)
        timings["write_checkpoint_s"] = time.perf_counter() - t0
    graph = work / f"graph-{args.dtype}.yaml"
    graph.write_text(GRAPH.format(ckpt=ckpt, dtype=args.dtype, window=args.capacity - 4))
    console.print(f"compiling {graph} (torch.onnx dynamo export) ...")
    t0 = time.perf_counter()
    res = compile_graph(graph, work / f"bundle-{args.dtype}")
    timings["compile_s"] = time.perf_counter() - t0
    bundle = Bundle.load(res.bundle.path)
    plan = bundle.plan
    files = {f: (bundle.path / f).stat().st_size for f in bundle.manifest["files"]}

    t0 = time.perf_counter()
    ort = OnnxRuntimeBackend(bundle, threads=args.threads)
    timings["ort_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = TorchBackend(bundle, threads=args.threads)
    timings["torch_load_s"] = time.perf_counter() - t0

    # inputs, identical for both backends
    rng = np.random.default_rng(0)
    src = Path(REPO.parent / "shared" / "data" / "vtest.avi")
    frame = next(iter(video(src if src.exists() else sample_clip(), fps=1, max_frames=1))).image
    fdt = np.float16 if args.dtype == "float16" else np.float32
    pre_ms, _ = _median_ms(lambda: preprocess_frame(frame, plan.image_size, plan.image_mean, plan.image_std,
                                                    plan.resample, plan.rescale_factor), args.repeats)
    pixels = preprocess_frame(frame, plan.image_size, plan.image_mean, plan.image_std, plan.resample,
                              plan.rescale_factor).astype(fdt)
    cap, filled, k, c = plan.cache["capacity"], min(args.filled, plan.cache["capacity"]), plan.tokens_per_frame, plan.hidden_size
    kv = (0.5 * rng.standard_normal(plan.kv.shape)).astype(fdt)
    cache_positions = np.arange(cap, dtype=np.int64)[None]
    cache_valid = (np.arange(cap) < filled)[None]

    def step_inputs(t: int, embeds: np.ndarray) -> dict:
        return {"inputs_embeds": embeds, "positions": (filled + np.arange(t, dtype=np.int64))[None],
                "token_valid": np.ones((1, t), bool), "kv_cache": kv, "cache_positions": cache_positions,
                "cache_valid": cache_valid, "window_valid": cache_valid,
                "streaming_heads": np.zeros((plan.kv.shape[0], plan.kv.shape[3]), bool)}

    frame_embeds = (0.5 * rng.standard_normal((1, k, c))).astype(fdt)
    token = np.array([[1234]], dtype=np.int64)

    rows, results, parity = [], {}, {}
    for stage, fn_of in [
        ("encode", lambda b: lambda: b.run("vision_encoder", {"pixel_values": pixels})),
        ("prefill", lambda b: lambda: b.run("decoder_step", step_inputs(k, frame_embeds))),
        ("decode", lambda b: lambda: b.run("decoder_step", step_inputs(
            1, b.run("embed_tokens", {"input_ids": token})["inputs_embeds"]))),
    ]:
        console.print(f"  {stage}: onnxruntime and torch, interleaved ...")
        runs = _interleaved_ms({"onnxruntime": fn_of(ort), "torch": fn_of(ref)}, args.repeats, args.warmup)
        out = {name: {"median_ms": statistics.median(ms), "min_ms": min(ms), "runs_ms": ms}
               for name, ms in runs.items()}
        a, b = fn_of(ort)(), fn_of(ref)()
        parity[stage] = max(float(np.abs(a[n].astype(np.float32) - b[n].astype(np.float32)).max())
                            for n in a if a[n].dtype.kind == "f")
        out["torch_over_ort"] = out["torch"]["median_ms"] / out["onnxruntime"]["median_ms"]
        results[stage] = out
        rows.append((stage, out["onnxruntime"], out["torch"], out["torch_over_ort"], parity[stage]))

    shapes = {"encode": f"pixel_values [1,3,{plan.image_size[0]},{plan.image_size[1]}] -> [1,{plan.encoder_tokens},{c}]",
              "prefill": f"T={k} over {filled}/{cap} valid slots", "decode": f"T=1 over {filled}/{cap} valid slots"}
    table = Table(title=f"LLaVA-OneVision-0.5B shapes, {args.dtype}, {args.threads} threads, "
                        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)")
    for col in ("stage", "shape", "ORT ms (median / min)", "torch eager ms (median / min)", "torch / ORT",
                "max |ORT - torch|"):
        table.add_column(col, justify="left" if col in ("stage", "shape") else "right")
    table.add_row("preprocess", f"{frame.shape[1]}x{frame.shape[0]} RGB -> 384x384 bicubic (numpy)",
                  f"{pre_ms:.1f}", "-", "-", "-")
    for stage, o, t, r, p in rows:
        table.add_row(stage, shapes[stage], f"{o['median_ms']:.1f} / {o['min_ms']:.1f}",
                      f"{t['median_ms']:.1f} / {t['min_ms']:.1f}", f"{r:.2f}x", f"{p:.2e}")
    console.print(table)
    mem = plan.memory
    console.print(f"plan: weights {mem.weights_bytes / 2**20:.1f} MiB, KV {mem.kv_cache_bytes / 2**20:.1f} MiB, "
                  f"activations (est.) {mem.activations_bytes / 2**20:.1f} MiB, total {mem.total_bytes / 2**20:.1f} MiB; "
                  f"compile {timings['compile_s']:.0f} s; RSS now {_rss_mib():.0f} MiB")

    import onnxruntime
    import transformers

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"processor": platform.processor(), "machine": platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "transformers": transformers.__version__, **bundle.manifest["tools"]},
        "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup,
        "model": {"vision": SIGLIP_SO400M_384, "vision_feature_layer": VISION_FEATURE_LAYER, "text": QWEN2_0_5B,
                  "weights": "random (transformers init, std 0.02), saved bf16"},
        "shapes": shapes, "plan_memory_bytes": dict(mem.table()), "kv_shape": plan.kv.shape,
        "engine_weight_bytes": {n: e.weights_bytes for n, e in plan.engines.items()},
        "bundle_file_bytes": files, "timings_s": timings,
        "preprocess_ms": pre_ms, "latency": results, "max_abs_diff_ort_vs_torch": parity,
    }
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"hf_real_shapes-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
