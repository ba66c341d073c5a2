"""Shared fixtures: graph files written from a template, bundles compiled once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "graphs" / "streaming_vlm.yaml"
VTEST = REPO.parent / "shared" / "data" / "vtest.avi"

GRAPH = """\
version: 1
name: {name}
model: {{preset: tiny, seed: {seed}}}
stream: {{fps: 2, frame_size: [64, 64]}}
nodes:
  encoder: {{op: vision_encoder}}
  pruner:  {{op: topk_saliency, input: encoder, tokens_per_frame: {k}}}
  cache:   {cache}
  llm:     {{op: decoder, input: [pruner, query], cache: cache, max_new_tokens: {max_new}, prefill_chunk_tokens: {chunk}}}
slo: {{frame_deadline_ms: {deadline}, ttft_ms: 500, overload: {overload}}}
budget: {{memory_mb: {budget}}}
"""


def graph_text(name="t", seed=0, k=16, cache="{op: sink_window, sink_tokens: 4, window_tokens: 512}",
               max_new=6, chunk=32, deadline=250, overload="drop_late", budget=512) -> str:
    return GRAPH.format(name=name, seed=seed, k=k, cache=cache, max_new=max_new, chunk=chunk,
                        deadline=deadline, overload=overload, budget=budget)


def write_graph(directory: Path, **kw) -> Path:
    p = Path(directory) / f"{kw.get('name', 't')}.yaml"
    p.write_text(graph_text(**kw))
    return p


@pytest.fixture(scope="session")
def onnx_bundle(tmp_path_factory) -> Path:
    """graphs/streaming_vlm.yaml compiled to ONNX engines (once per test session)."""
    from streamgraph.compiler.compile import compile_graph

    d = tmp_path_factory.mktemp("bundle")
    return compile_graph(EXAMPLE, d / "streaming-vlm-tiny").bundle.path


def torch_bundle(tmp_path: Path, **kw) -> Path:
    """A torch-target bundle (weights + manifest, no ONNX export) for eager reference runs."""
    from streamgraph.compiler.compile import compile_graph

    g = write_graph(tmp_path, **kw)
    return compile_graph(g, tmp_path / "build" / kw.get("name", "t"), target="torch").bundle.path


def frames(n: int, size=(64, 64), fps: float = 2.0, seed: int = 0):
    from streamgraph.runtime.sources import synthetic

    return list(synthetic(n, fps=fps, size=size, seed=seed))


# ------------------------------------------------------------------ Hugging Face checkpoints
# A tiny LLaVA-OneVision: SigLIP 40 px / patch 8 (5x5 grid: odd, so the 2x2 pooling is a true
# bilinear blend -> 3x3 = 9 tokens per frame), 3 layers read at vision_feature_layer=-2;
# Qwen2 with GQA, untied lm_head, initializer_range 0.1 so logits are O(1).
HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=40, patch_size=8)
HF_TEXT = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
               tie_word_embeddings=False, initializer_range=0.1)
HF_TOKENS_PER_FRAME = 9

HF_GRAPH = """\
version: 1
name: {name}
model: {{hf: {ckpt}{extra}}}
stream: {{fps: 2}}
nodes:
  encoder: {{op: vision_encoder}}
  cache:   {{op: full, capacity_tokens: 256}}
  llm:     {{op: decoder, input: [encoder, query], cache: cache, max_new_tokens: 5, prefill_chunk_tokens: 16}}
slo: {{frame_deadline_ms: 250, ttft_ms: 500, overload: none}}
budget: {{memory_mb: 512}}
"""


def write_hf_checkpoint(path: Path, **kw):
    """A tiny random LLaVA-OneVision checkpoint written by transformers; returns its model."""
    from streamgraph.models.hf_random import tiny_special_ids, write_random_checkpoint

    args = dict(vision=HF_VISION, text=HF_TEXT, special_ids=tiny_special_ids(), vision_feature_layer=-2)
    args.update(kw)
    return write_random_checkpoint(path, **args)


def write_hf_graph(directory: Path, ckpt: Path, name: str = "hf-tiny", extra: str = "") -> Path:
    p = Path(directory) / f"{name}.yaml"
    p.write_text(HF_GRAPH.format(name=name, ckpt=ckpt, extra=extra))
    return p


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(checkpoint dir, the transformers model saved there)."""
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf") / "llava-ov-tiny"
    return d, write_hf_checkpoint(d)


@pytest.fixture(scope="session")
def hf_onnx_bundle(hf_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint compiled to ONNX engines, every engine in external-data format."""
    import streamgraph.compiler.lower as lower
    from streamgraph.compiler.compile import compile_graph

    d = tmp_path_factory.mktemp("hfbundle")
    graph = write_hf_graph(d, hf_checkpoint[0])
    old = lower.EXTERNAL_DATA_MIN_BYTES
    lower.EXTERNAL_DATA_MIN_BYTES = 0          # exercise external data on a tiny model
    try:
        return compile_graph(graph, d / "bundle").bundle.path
    finally:
        lower.EXTERNAL_DATA_MIN_BYTES = old
