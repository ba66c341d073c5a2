"""Fuzzing `streamgraph validate`: a mutated graph file gives a valid graph or a located
one-line error, never another exception and never a hang.

The mutations are those of ``scripts/fuzz_graphs.py`` (its long mode runs >= 10,000 cases);
here hypothesis drives them for a bounded number of examples, derandomized so the suite is
stable. "Located" means: a StreamgraphError whose message is one printable line starting
``FILE:LINE:COL: `` with FILE the graph file. Every error a graph file can cause is located;
only errors about the file as a whole that YAML cannot place are not (a missing or
unreadable file: ``FILE: cannot read graph file: ...``), and the fuzzer never makes those.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamgraph.errors import SpecError, StreamgraphError
from tests.conftest import graph_text

ROOT = Path(__file__).resolve().parents[1]


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_graphs", ROOT / "scripts" / "fuzz_graphs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_graphs"] = module
    spec.loader.exec_module(module)
    return module


fz = _load_fuzzer()
TIMEOUT_S = 20.0  # per case; a case takes ~50 ms


class DataChooser(fz.Chooser):
    """Choices drawn from hypothesis, so a failing case shrinks to a minimal mutation."""

    def __init__(self, data):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seed_docs() -> dict[str, str]:
    return fz.seeds()


def outcome(path: Path, raw: bytes) -> tuple[str, str]:
    path.write_bytes(raw)
    return fz.run_case(str(path), TIMEOUT_S)


# --------------------------------------------------------------------------- the oracle can fail

def test_seeds_are_valid_graphs(workdir, seed_docs):
    """Mutations start from valid graphs (else the fuzzer would only test one error)."""
    assert len(seed_docs) >= 10
    for name, text in seed_docs.items():
        kind, message = outcome(workdir / "seed.yaml", text.encode())
        if "does not exist" in message:  # graphs/llava_onevision_hf.yaml: checkpoint not fetched
            assert kind == "located", message
            continue
        assert kind == "valid", f"{name}: {message}"


def test_classify_tells_every_outcome_apart(workdir):
    path = str(workdir / "two-lines.yaml")
    Path(path).write_text("a: 1\nb: 2\n")
    assert fz.classify(path, SpecError("past the end", file=path, line=4, col=1))[0] == "unlocated"
    assert fz.classify(path, None)[0] == "valid"
    assert fz.classify(path, SpecError("bad", file=path, line=3, col=7))[0] == "located"
    assert fz.classify(path, SpecError("bad", file=path))[0] == "unlocated"
    assert fz.classify(path, SpecError("bad", file=path, line=3))[0] == "unlocated"
    assert fz.classify(path, SpecError("two\nlines", file=path, line=1, col=1))[0] == "unlocated"
    assert fz.classify(path, SpecError("bad", file="other.yaml", line=1, col=1))[0] == "unlocated"
    assert fz.classify(path, StreamgraphError(f"{path}: no position"))[0] == "unlocated"
    assert fz.classify(path, ValueError("boom"))[0] == "internal"
    assert fz.classify(path, fz.CaseTimeout())[0] == "hang"


def test_run_case_stops_a_hang(monkeypatch, workdir):
    monkeypatch.setattr(fz, "validate_file", lambda path: time.sleep(30))
    t0 = time.monotonic()
    assert fz.run_case(str(workdir / "x.yaml"), 0.2) == ("hang", "timed out")
    assert time.monotonic() - t0 < 5


def test_run_case_reports_an_internal_error(monkeypatch, workdir):
    def boom(path):
        raise RuntimeError("Storage size calculation overflowed")
    monkeypatch.setattr(fz, "validate_file", boom)
    kind, message = fz.run_case(str(workdir / "x.yaml"), 5)
    assert kind == "internal" and "RuntimeError" in message


# --------------------------------------------------------------------------- the property

@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(data=st.data())
def test_mutated_graph_is_valid_or_a_located_error(data, workdir, seed_docs):
    name, steps, raw = fz.make_case(DataChooser(data), seed_docs)
    kind, message = outcome(workdir / "graph.yaml", raw)
    assert kind in ("valid", "located"), (
        f"{kind}: {message}\nseed {name}, mutations: {steps}\n"
        f"file:\n{raw.decode('utf-8', 'replace')[:2000]}")


# --------------------------------------------------------------------------- found by fuzzing

def _graph(tmp: Path, old: str, new: str) -> Path:
    """The suite's template graph (topk_saliency + sink_window) with one edit."""
    text = graph_text()
    assert text.count(old) == 1, old
    p = tmp / "g.yaml"
    p.write_text(text.replace(old, new))
    return p


@pytest.mark.parametrize("old,new,field", [
    ("frame_size: [64, 64]", "frame_size: [9223372036854775808, 64]", "stream.frame_size[0]"),
    ("frame_size: [64, 64]", "frame_size: [9223372036854775800, 64]", "stream.frame_size[0]"),
    ("frame_size: [64, 64]", "frame_size: [16384, 16384]", "stream.frame_size"),
    ("fps: 2", "fps: 1.0e+300", "stream.fps"),
    ("max_new_tokens: 6", "max_new_tokens: 1000000000000000000000000000000000000000",
     "nodes.llm.max_new_tokens"),
], ids=["frame_size-2**63", "frame_size-2**63-8", "frame_area", "fps-1e300", "max_new_tokens-10**39"])
def test_validate_issue_repros(tmp_path, capsys, old, new, field):
    """The issue's repros through `streamgraph validate`: rc 1, one located line (was an
    internal error with a C++ trace, or `ok`)."""
    from streamgraph.cli import main

    path = _graph(tmp_path, old, new)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}:"), err
    kind, message = fz.run_case(str(path), TIMEOUT_S)
    assert kind == "located" and f": {field}: " in message, message


def test_largest_frame_is_refused_by_the_memory_plan_not_a_crash(tmp_path):
    """At the bounds (16384 x 4096 px, a 2**26-pixel frame) the plan computes in exact
    integers and the budget check refuses it with the numbers."""
    from streamgraph.compiler.compile import check_graph

    path = _graph(tmp_path, "frame_size: [64, 64]", "frame_size: [16384, 4096]")
    with pytest.raises(SpecError) as info:
        check_graph(path, build_weights=False)
    err = info.value
    assert err.field == "budget.memory_mb" and err.line is not None and "plan needs" in err.message


def test_plan_error_of_a_cache_parameter_is_located_at_it(tmp_path):
    """A cache parameter the plan refuses (a ReKV block store smaller than one block) is
    reported at that parameter, not at budget.memory_mb."""
    from streamgraph.compiler.compile import check_graph

    cache = "{op: rekv, local_tokens: 128, question_tokens: 64, store_mb: 0.000001}"
    path = _graph(tmp_path, "{op: sink_window, sink_tokens: 4, window_tokens: 512}", cache)
    text = path.read_text()
    pos = text.index("store_mb: ") + len("store_mb: ")
    line, col = text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1
    with pytest.raises(SpecError) as info:
        check_graph(path, build_weights=False)
    err = info.value
    assert (err.line, err.col, err.field) == (line, col, "nodes.cache.store_mb"), str(err)
    assert "less than one block" in err.message and "\n" not in str(err)


@pytest.mark.parametrize("hf,fragment", [
    ("a" * 300, "255"),                          # ENAMETOOLONG from the file system
    ("~no_such_user_sg/ckpt", "does not exist"),  # Path.expanduser raised RuntimeError
])
def test_checkpoint_paths_the_os_refuses_are_located(tmp_path, hf, fragment):
    from streamgraph.compiler.compile import check_graph

    path = _graph(tmp_path, "{preset: tiny, seed: 0}", f"{{hf: '{hf}'}}")
    with pytest.raises(StreamgraphError) as info:
        check_graph(path, build_weights=False)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3:13: model.hf: ") and fragment in msg and "\n" not in msg, msg


def test_os_error_reading_a_checkpoint_is_located(tmp_path, monkeypatch):
    """An OSError while reading the checkpoint directory (EACCES, EIO) is a located
    CheckpointError, not an unlocated OSError."""
    import streamgraph.models.hf as hf_mod
    from streamgraph.compiler.compile import check_graph

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(hf_mod, "open_checkpoint", denied)
    path = _graph(tmp_path, "{preset: tiny, seed: 0}", "{hf: ckpt}")
    with pytest.raises(hf_mod.CheckpointError) as info:
        check_graph(path, build_weights=False)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3:13: model.hf: ") and "Permission denied" in msg, msg
