"""Benchmark (issue #15): the ``torch-device`` backend on whatever device is here (CUDA if
available, else the CPU; the device is named in the output), LLaVA-OneVision-0.5B shapes with
random weights built on the device, every cache policy.

The model is :class:`~streamgraph.models.vlm.StreamingVLM` with the shapes of
``llava-onevision-qwen2-0.5b-ov`` (bench/hf_real_shapes.py: SigLIP-so400m at 384 px, patch 14,
feature layer -2 of 27, 2x2 bilinear pooling -> 196 tokens per frame; Qwen2-0.5B, 24 layers,
14 query / 2 KV heads of 64), random weights (normal, std 0.02) drawn on the device: nothing
is downloaded, no bundle is compiled, no weights travel. It runs through
:class:`~streamgraph.backends.torch_device.TorchDeviceBackend` (``from_model``): the same class
``--backend torch-device`` opens for a bundle, with the KV buffer allocated once on the device.

Per policy (full, sink_window, streaming_vlm, rekv, carrier, duo; sizes in ``POLICIES``), one
simulated stream: a prompt prefix, then ``--frames`` frames back to back (random pixels ->
``vision_encoder`` -> 196 visual tokens -> one ``decoder_step`` chunk, committed), then
``--questions`` questions (``--question-tokens`` of prompt, ``--decode-tokens`` greedy answer
tokens, the resume chunk). Measured, wall clock (the backend synchronises when it copies the
logits back, so each step's time includes its device work):

* ``encode_ms`` / ``prefill_ms`` per frame (median, p99), ``ingest_fps`` = frames / their total
  time (a steady stream fed as fast as it is taken; the first ``--warmup`` frames excluded);
* ``ttft_ms``: question start (embedding, ReKV's retrieval passes, the question prefill) to the
  first answer token's logits on the host;
* ``decode_tok_s``: answer tokens after the first, per second (embed + decoder_step + commit);
* device memory: ``torch.cuda.memory_allocated`` sampled every ``--mem-every`` frames (flat =
  the same bytes from the first sample to the last), and ``max_memory_allocated``.

A policy whose cache fills (``full``, ``duo``: no eviction) stops its stream when the next frame
and the questions would not fit; ``--policy-seconds`` caps each policy's stream time (so the
whole run fits one device call), ``--rekv-frames`` caps ReKV's (its block store spills a
4.8 MiB block per frame to host RAM / disk). Results: ``bench/results/gpu.json``
(``gpu_smoke.json`` with ``--smoke``), rewritten after every policy.

Usage::

    python bench/gpu.py                      # real shapes; cuda: 10000 frames, bfloat16
    python bench/gpu.py --smoke              # tiny shapes, a few frames, CPU: proves the script
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamgraph import contract as C  # noqa: E402

K_REAL = 196


def real_config():
    """LLaVA-OneVision-0.5B shapes (bench/hf_real_shapes.py's SIGLIP_SO400M_384 / QWEN2_0_5B)."""
    from streamgraph.models.config import TextConfig, VisionConfig, VLMConfig

    vision = VisionConfig(image_size=(384, 384), patch_size=14, hidden_size=1152, intermediate_size=4304,
                          num_hidden_layers=27, num_attention_heads=16, feature_layers=(-2,))
    text = TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True)
    return VLMConfig(vision=vision, text=text, video_pooling="bilinear_2x", image_newline=True)


def smoke_config():
    """The tiny preset at 64x64 px with LLaVA-OneVision's pooling: 16 tokens per frame."""
    from dataclasses import replace

    from streamgraph.models.config import tiny_config

    return replace(tiny_config((64, 64)), video_pooling="bilinear_2x")


def policies(cfg, k: int, smoke: bool, store_dir: str, seed: int) -> dict:
    """Factories of every policy, sized for the real shapes (or the smoke run)."""
    from streamgraph.kv.carrier import CarrierCache
    from streamgraph.kv.duo import DuoCache
    from streamgraph.kv.full import FullCache
    from streamgraph.kv.rekv import RekvCache
    from streamgraph.kv.sink_window import SinkWindowCache
    from streamgraph.kv.streaming_vlm import StreamingVLMCache

    t = cfg.text
    heads = np.random.default_rng(seed).random((t.num_hidden_layers, t.num_key_value_heads)) < 0.5
    heads[0, 0], heads[-1, -1] = True, False                      # both roles present
    s = 1 if not smoke else 0
    big = (lambda real, small: real) if s else (lambda real, small: small)  # noqa: E731
    return {
        "full": lambda: FullCache(big(32768, 512)),
        "sink_window": lambda: SinkWindowCache(big(64, 4), big(8192, 128)),
        "streaming_vlm": lambda: StreamingVLMCache(big(512, 16), big(512, 64), big(32, 4), k),
        "rekv": lambda: RekvCache(init_tokens=big(512, 16), local_tokens=big(4096, 64), topk=big(8, 2), block_tokens=k,
                                  question_tokens=big(512, 64), store_blocks=big(64, 4),
                                  num_layers=t.num_hidden_layers, num_kv_heads=t.num_key_value_heads,
                                  head_dim=t.head_dim, num_heads=t.num_attention_heads, store_dir=store_dir),
        "carrier": lambda: CarrierCache(big(512, 16), big(1024, 8), big(512, 64), t.hidden_size),
        "duo": lambda: DuoCache(big(32768, 512), big(64, 4), big(2048, 32), heads),
    }


def build_backend(cfg, device: str | None, dtype: str, seed: int):
    """The model built on the device with random weights (normal std 0.02; norms 1; the
    embedding table x25 as the presets do), wrapped in the torch-device backend."""
    import torch

    from streamgraph.backends.torch_device import TorchDeviceBackend, resolve_device
    from streamgraph.models.vlm import StreamingVLM

    dev = resolve_device(torch, device)
    torch.manual_seed(seed)
    with torch.device(dev), torch.no_grad():
        model = StreamingVLM(cfg)
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        model.language_model.embed_tokens.weight.mul_(25.0)
    return TorchDeviceBackend.from_model(model.eval(), device=str(dev), dtype=dtype)


class Stream:
    """One policy's session state: the device KV buffer, the policy, the step loop (the
    runtime's Decoder.step: plan, decoder_step, NaN check, commit)."""

    def __init__(self, backend, policy, cfg):
        t = cfg.text
        self.backend, self.policy = backend, policy
        shape = (t.num_hidden_layers, 2, 1, t.num_key_value_heads, policy.capacity, t.head_dim)
        self.kv = backend.alloc_kv(shape, "float32")
        self.address = self.kv.address
        policy.attach(self.kv)
        self.no_heads = np.zeros((t.num_hidden_layers, t.num_key_value_heads), dtype=bool)

    def step(self, embeds: np.ndarray, n_valid: int, kind: str) -> np.ndarray:
        t = embeds.shape[1]
        sp = self.policy.plan_step(t, n_valid, None, kind=kind)
        valid = np.zeros((1, t), dtype=bool)
        valid[0, :n_valid] = True
        sh = self.policy.streaming_heads
        out = self.backend.decoder_step(self.kv, {
            C.INPUTS_EMBEDS: embeds, C.POSITIONS: sp.positions[None], C.TOKEN_VALID: valid,
            C.CACHE_POSITIONS: sp.cache_positions[None], C.CACHE_VALID: sp.cache_valid[None],
            C.WINDOW_VALID: (sp.cache_valid if sp.window_valid is None else sp.window_valid)[None],
            C.STREAMING_HEADS: self.no_heads if sh is None else sh})
        if not out["new_kv_finite"] or not np.isfinite(out[C.LOGITS]).all():
            raise FloatingPointError(f"{self.policy.name}: {kind} step produced NaN/Inf")
        self.backend.commit_kv(self.kv, sp.write_slots)
        self.policy.commit(sp, out)
        return out[C.LOGITS][0]

    def embed(self, ids) -> np.ndarray:
        return self.backend.run(C.EMBED_TOKENS, {C.INPUT_IDS: np.asarray([ids], np.int64)})[C.INPUTS_EMBEDS]

    def text(self, ids, kind: str, chunk: int) -> np.ndarray:
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            logits = self.step(self.embed(part), len(part), kind)
        return logits


def _q(xs, p):
    return float(np.percentile(xs, p)) if xs else None


def run_policy(name, make, backend, cfg, args, rng, torch) -> dict:
    cuda = backend.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    policy = make()
    s = Stream(backend, policy, cfg)
    k, size, vocab = cfg.encoder_tokens, cfg.vision.image_size, cfg.text.vocab_size
    chunk = args.chunk
    ids = lambda n: [int(v) for v in rng.integers(0, vocab, n)]  # noqa: E731
    s.text(ids(16), "prefix", chunk)
    reserve = args.questions * (args.question_tokens + args.decode_tokens + 8)
    limit = args.frames if name != "rekv" else min(args.frames, args.rekv_frames)
    enc, pre, mem, frames_done, stop = [], [], [], 0, "frames"
    t_start = time.perf_counter()
    for i in range(limit):
        if name in ("full", "duo") and policy.tokens_seen + k + reserve > policy.capacity:
            stop = "cache full"
            break
        if time.perf_counter() - t_start > args.policy_seconds:
            stop = "time cap"
            break
        pixels = rng.standard_normal((1, 3, *size), dtype=np.float32)
        t0 = time.perf_counter()
        tokens = backend.run(C.VISION_ENCODER, {C.PIXEL_VALUES: pixels})[C.VISUAL_TOKENS]
        t1 = time.perf_counter()
        chunk_tokens, n_valid, _ = policy.prepare_frame(tokens, tokens.shape[1], None)
        s.step(chunk_tokens, n_valid, "frame")
        t2 = time.perf_counter()
        frames_done += 1
        if i >= args.warmup:
            enc.append((t1 - t0) * 1e3)
            pre.append((t2 - t1) * 1e3)
        if cuda and (i % args.mem_every == 0):
            mem.append([i, int(torch.cuda.memory_allocated())])
    ttft, decode = [], []
    for _ in range(args.questions):
        q = ids(args.question_tokens)
        t0 = time.perf_counter()
        policy.prepare_question(lambda q=q: s.text(q, "retrieval", chunk))
        logits = s.text(q, "question", chunk)
        tok = int(np.argmax(logits))
        t1 = time.perf_counter()
        ttft.append((t1 - t0) * 1e3)
        steps = []
        for _ in range(args.decode_tokens - 1):
            t2 = time.perf_counter()
            tok = int(np.argmax(s.step(s.embed([tok]), 1, "decode")))
            steps.append(time.perf_counter() - t2)
        decode.append(len(steps) / sum(steps) if steps else None)
        s.text([tok] + ids(5), "resume", chunk)
    assert s.kv.address == s.address == s.kv.tensor.data_ptr(), "KV buffer moved"
    if cuda:
        mem.append([frames_done, int(torch.cuda.memory_allocated())])
    steady = mem[1:] if len(mem) > 2 else mem
    res = {
        "frames": frames_done, "stopped_by": stop, "capacity_slots": policy.capacity,
        "kv_bytes": s.kv.nbytes, "tokens_seen": int(policy.tokens_seen),
        "encode_ms_p50": _q(enc, 50), "encode_ms_p99": _q(enc, 99),
        "prefill_ms_p50": _q(pre, 50), "prefill_ms_p99": _q(pre, 99),
        "ingest_fps": (len(enc) / (sum(enc) + sum(pre)) * 1e3) if enc else None,
        "ttft_ms": ttft, "ttft_ms_median": statistics.median(ttft) if ttft else None,
        "decode_tok_s": decode,
        "decode_tok_s_median": statistics.median([d for d in decode if d]) if any(decode) else None,
    }
    if cuda:
        res.update(memory_allocated_samples=mem, max_memory_allocated=int(torch.cuda.max_memory_allocated()),
                   memory_flat_after_first_sample=(max(m for _, m in steady) - min(m for _, m in steady)) if steady
                   else None)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few frames (CPU proof the script works)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: bfloat16 on cuda, "
                                                  "float32 on cpu)")
    ap.add_argument("--frames", type=int, default=None, help="frames per policy (default 10000 on cuda, 40 on cpu)")
    ap.add_argument("--policies", default="full,sink_window,streaming_vlm,rekv,carrier,duo")
    ap.add_argument("--policy-seconds", type=float, default=70.0, help="cap on each policy's stream time")
    ap.add_argument("--rekv-frames", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64, help="prefill chunk of text")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mem-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.smoke:
        args.questions, args.question_tokens, args.decode_tokens = min(args.questions, 2), 8, 4
        args.frames = args.frames or 12
    args.frames = args.frames or (10000 if cuda else 40)
    cfg = smoke_config() if args.smoke else real_config()
    t0 = time.perf_counter()
    backend = build_backend(cfg, args.device, dtype, args.seed)
    build_s = time.perf_counter() - t0
    dev = backend.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {dev} ({name}), dtype {dtype}, torch {torch.__version__}, "
          f"{'smoke (tiny shapes)' if args.smoke else 'LLaVA-OneVision-0.5B shapes'}, "
          f"{cfg.encoder_tokens} tokens/frame, model built in {build_s:.1f} s", flush=True)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / ("gpu_smoke.json" if args.smoke else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "device": str(dev), "device_name": name, "dtype": dtype, "torch": torch.__version__,
              "cuda": torch.version.cuda, "host": platform.node(), "cpu_threads": torch.get_num_threads(),
              "smoke": args.smoke, "tokens_per_frame": cfg.encoder_tokens,
              "shapes": "tiny preset, 64 px, pooled" if args.smoke else "llava-onevision-qwen2-0.5b-ov",
              "args": vars(args), "model_build_s": build_s, "policies": {}}
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-rekv-") as store:
        makers = policies(cfg, cfg.encoder_tokens, args.smoke, store, args.seed)
        for pname in args.policies.split(","):
            t1 = time.perf_counter()
            try:
                res = run_policy(pname, makers[pname], backend, cfg, args, rng, torch)
            except Exception as e:                  # noqa: BLE001 - record and go on to the next policy
                res = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
            res["wall_s"] = time.perf_counter() - t1
            report["policies"][pname] = res
            out.write_text(json.dumps(report, indent=1))
            if "error" in res:
                print(f"{pname:14s} ERROR {res['error']}", flush=True)
                continue
            fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
            print(f"{pname:14s} frames {res['frames']:6d} ({res['stopped_by']})  encode {fmt(res['encode_ms_p50'])} ms"
                  f"  prefill {fmt(res['prefill_ms_p50'])} ms  ingest {fmt(res['ingest_fps'])} fps"
                  f"  TTFT {fmt(res['ttft_ms_median'])} ms  decode {fmt(res['decode_tok_s_median'])} tok/s"
                  + (f"  mem max {res['max_memory_allocated'] / 2**20:.0f} MiB, drift "
                     f"{res['memory_flat_after_first_sample']} B" if "max_memory_allocated" in res else ""),
                  flush=True)
    print(f"wrote {out}")
    if any("error" in r for r in report["policies"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
