"""Shared fixtures: graph files written from a template, bundles compiled once per session."""
from __future__ import annotations

import textwrap
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
