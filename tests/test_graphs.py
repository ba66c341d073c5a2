"""Every example graph in graphs/ validates, compiles to ONNX engines and runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from streamgraph.compiler.compile import check_graph, compile_graph
from streamgraph.runtime.session import Session
from tests.conftest import EXAMPLE, REPO, frames

GRAPHS = sorted((REPO / "graphs").glob("*.yaml"))


def test_there_are_example_graphs():
    assert EXAMPLE in GRAPHS and len(GRAPHS) >= 2


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda p: p.name)
def test_example_graph_compiles_and_runs(graph: Path, tmp_path, onnx_bundle):
    from streamgraph.compiler.spec import load_spec

    spec = load_spec(graph)
    if spec.model.hf is not None and not spec.resolve_path(spec.model.hf).exists():
        pytest.skip(f"{graph.name} points at a local checkpoint that is not here "
                    f"(tests/test_hf_checkpoint.py covers it with a tiny generated one)")
    checked = check_graph(graph)
    if graph == EXAMPLE:
        bundle = onnx_bundle                          # compiled once for the whole session
    else:
        bundle = compile_graph(graph, tmp_path / checked.spec.name).bundle.path
    s = Session.open(bundle, "onnxruntime", overload="fifo")
    h, w = s.plan.image_size
    for f in frames(2, size=(h, w)):
        assert s.push_frame(f).decision == "run"
    assert "".join(s.ask("What is there?", max_new_tokens=2)) is not None
    assert s.kv.nbytes == checked.plan.kv.bytes
