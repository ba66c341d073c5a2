"""Issue #14, must-show 1: one frame's path enters at most 7 files of the package, and the
package has no import circles.

The file trace is bench/file_path.py's (``sys.setprofile``: files under ``streamgraph/`` whose
functions ran). The import graph is built here independently of Python's import machinery:
every ``import`` / ``from ... import`` statement of every ``streamgraph/**.py``, at module level
and inside functions, resolved to the module it names.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "streamgraph"
sys.path.insert(0, str(REPO / "bench"))

MAX_FILES = 7


def _trace():
    spec = importlib.util.spec_from_file_location("file_path_bench", REPO / "bench" / "file_path.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.trace


def test_steady_state_push_frame_and_ask_enter_at_most_7_files(onnx_bundle):
    from streamgraph.runtime.session import Session

    trace = _trace()
    s = Session.open(onnx_bundle, overload="fifo")
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    for i in range(3):
        s.push_frame(img, 0.5 * i)
    files, rec = trace(lambda: s.push_frame(img, 1.5))
    assert rec.decision == "run" and rec.tokens_kept > 0          # the whole frame path ran
    assert "runtime/stream.py" in files and "runtime/pipeline.py" in files and "runtime/decoder.py" in files
    assert len(files) <= MAX_FILES, files
    assert "runtime/metrics.py" not in files and "runtime/session.py" not in files
    files, answer = trace(lambda: "".join(s.ask("what is happening?", at=2.0)))
    assert s.questions[-1].new_tokens >= 1 and "runtime/decoder.py" in files
    assert len(files) <= MAX_FILES, files


def _module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> nx.DiGraph:
    """module -> module it imports (module level and inside functions), package modules only."""
    files = {_module_of(p): p for p in PKG.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import name`: the submodule pkg.name when it is one, else pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files and "." in t:     # `import a.b.c` of a name inside a.b
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    g.add_edge(mod, t)
    return g


def test_import_graph_sees_function_level_imports():
    g = import_graph()
    # streamgraph/__init__.py imports the session inside __getattr__ only
    assert g.has_edge("streamgraph", "streamgraph.runtime.session")
    assert g.has_edge("streamgraph.runtime.session", "streamgraph.runtime.decoder")
    assert g.has_edge("streamgraph.runtime.stream", "streamgraph.runtime.scheduler")


def test_no_import_circles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"{len(cycles)} import circle(s), e.g. {' -> '.join(min(cycles, key=len))}"
