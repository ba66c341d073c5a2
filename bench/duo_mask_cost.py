"""Benchmark: what decoder_step's DuoAttention inputs cost (issue #14).

``window_valid [B,S]`` and ``streaming_heads [L,Hkv]`` make the engine build a per-head mask
``[B,H,T,S+T]`` per layer instead of one shared ``[B,1,T,S+T]``. Every policy pays it (the
others pass ``window_valid = cache_valid`` and all-False heads). This exports the same
``decoder_step`` module of the ``small`` preset (graphs/streaming_vlm_small.yaml, random
weights) twice — with the plan's eight inputs and with the first six only (the engine before
the change) — and times both in ONNX Runtime, one intra-op thread, interleaved, on the same
inputs with the cache ``filled`` slots full: a decode step (T=1) and a prefill chunk (T=K).
It also times the eight-input engine with half the KV heads streaming (``duo``'s cost is the
same dense attention). Logits of the six-input engine and the all-False eight-input engine
are compared. Writes ``bench/results/duo_mask_cost.json``. Not a test. Usage::

    OMP_NUM_THREADS=1 python bench/duo_mask_cost.py [--repeats 200] [--filled 1000]
"""
from __future__ import annotations

import argparse
import dataclasses
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--filled", type=int, default=1000)
    args = ap.parse_args()

    import onnxruntime as ort

    from streamgraph.backends.torch import TorchBackend
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.compiler.compile import compile_graph
    from streamgraph.compiler.lower import export_engine

    tmp = Path(tempfile.mkdtemp(prefix="duo-mask-"))
    bundle = Bundle.load(compile_graph(REPO / "graphs" / "streaming_vlm_small.yaml", tmp / "b", target="torch").bundle.path)
    plan = bundle.plan
    eng8 = plan.engines["decoder_step"]
    assert [s.name for s in eng8.inputs][-2:] == ["window_valid", "streaming_heads"]
    eng6 = dataclasses.replace(eng8, inputs=eng8.inputs[:6], file="engines/decoder_step6.onnx")
    module = TorchBackend(bundle).modules["decoder_step"]
    export_engine(module, eng8, tmp / "x")
    export_engine(module, eng6, tmp / "x")
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    s8 = ort.InferenceSession(str(tmp / "x" / eng8.file), so, providers=["CPUExecutionProvider"])
    s6 = ort.InferenceSession(str(tmp / "x" / eng6.file), so, providers=["CPUExecutionProvider"])

    L, _, _, hkv, cap, _ = plan.kv.shape
    c, k = plan.hidden_size, plan.tokens_per_frame
    filled = min(args.filled, cap - k)
    rng = np.random.default_rng(0)
    kv = (0.5 * rng.standard_normal(plan.kv.shape)).astype(np.float32)
    valid = (np.arange(cap) < filled)[None]
    window = valid & ((np.arange(cap) < 4) | (np.arange(cap) >= filled - 64))[None]
    half = np.zeros((L, hkv), bool)
    half[:, hkv // 2:] = True

    def feeds(t, heads, wv):
        f = {"inputs_embeds": (0.5 * rng.standard_normal((1, t, c))).astype(np.float32),
             "positions": (filled + np.arange(t))[None], "token_valid": np.ones((1, t), bool), "kv_cache": kv,
             "cache_positions": np.arange(cap)[None], "cache_valid": valid}
        return f, {**f, "window_valid": wv, "streaming_heads": heads}

    out = {"machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                       "loadavg_start": os.getloadavg(), "threads": 1, "onnxruntime": ort.__version__},
           "preset": "small", "kv_shape": plan.kv.shape, "filled": filled, "repeats": args.repeats, "cases": {}}
    for name, t in [("decode", 1), ("prefill", k)]:
        f6, f8 = feeds(t, np.zeros((L, hkv), bool), valid)
        _, f8d = feeds(t, half, window)
        f8d.update({n: f6[n] for n in ("inputs_embeds", "positions")})
        a = s6.run(["logits"], f6)[0]
        b = s8.run(["logits"], f8)[0]
        times = {"6 inputs": [], "8 inputs, no streaming head": [], "8 inputs, half streaming": []}
        for _ in range(args.repeats):
            for key, sess, f in [("6 inputs", s6, f6), ("8 inputs, no streaming head", s8, f8),
                                 ("8 inputs, half streaming", s8, f8d)]:
                t0 = time.perf_counter()
                sess.run(["logits"], f)
                times[key].append((time.perf_counter() - t0) * 1e3)
        med = {key: statistics.median(v) for key, v in times.items()}
        out["cases"][name] = {"T": t, "median_ms": med,
                              "ratio_8_over_6": med["8 inputs, no streaming head"] / med["6 inputs"],
                              "logits_max_abs_diff_6_vs_8": float(np.abs(a - b).max())}
        print(name, f"T={t}", {kk: round(v, 3) for kk, v in med.items()},
              f"ratio {out['cases'][name]['ratio_8_over_6']:.3f}", f"|dlogits| {np.abs(a - b).max():.3g}")
    out["machine"]["loadavg_end"] = os.getloadavg()
    dst = REPO / "bench" / "results" / "duo_mask_cost.json"
    dst.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", dst)


if __name__ == "__main__":
    main()
