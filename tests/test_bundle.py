"""Bundle: lock key decides rebuilds; tampered files are refused; plan numbers are exact."""
from __future__ import annotations

import json

import numpy as np
import pytest

from streamgraph.compiler.bundle import Bundle
from streamgraph.compiler.compile import check_graph, compile_graph
from streamgraph.errors import BundleError, SpecError
from tests.conftest import write_graph


def test_lock_key_rebuilds_when_and_only_when_inputs_change(tmp_path):
    g = write_graph(tmp_path, name="lk")
    out = tmp_path / "b"
    first = compile_graph(g, out, target="torch")
    assert first.rebuilt
    again = compile_graph(g, out, target="torch")
    assert not again.rebuilt and again.bundle.lock_key == first.bundle.lock_key
    # whitespace/comment-only edits do not change the normalized graph
    g.write_text("# a comment\n" + g.read_text())
    assert not compile_graph(g, out, target="torch").rebuilt
    for change in ({"seed": 1}, {"k": 8}, {"cache": "{op: sink_window, sink_tokens: 4, window_tokens: 256}"}):
        g2 = write_graph(tmp_path, name="lk", **change)
        res = compile_graph(g2, out, target="torch")
        assert res.rebuilt and res.bundle.lock_key != first.bundle.lock_key, change


def test_tampered_bundle_is_refused(tmp_path):
    g = write_graph(tmp_path, name="tamper")
    b = compile_graph(g, tmp_path / "b", target="torch").bundle.path
    Bundle.load(b)
    w = b / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 does not match"):
        Bundle.load(b)
    # a compile notices the damage and rebuilds instead of trusting the manifest
    assert compile_graph(g, tmp_path / "b", target="torch").rebuilt
    Bundle.load(b)
    (b / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(b)
    with pytest.raises(BundleError, match="not a bundle directory"):
        Bundle.load(tmp_path / "nowhere")


def test_manifest_lists_every_file_and_engine_io(onnx_bundle):
    man = json.loads((onnx_bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(onnx_bundle).as_posix() for p in onnx_bundle.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert set(man["files"]) == on_disk
    assert {"engines/vision_encoder.onnx", "engines/reducer_k16.onnx", "engines/embed_tokens.onnx",
            "engines/decoder_step.onnx"} <= on_disk
    import onnx

    for name, e in man["plan"]["engines"].items():
        m = onnx.load(str(onnx_bundle / e["file"]), load_external_data=False)
        assert [i.name for i in m.graph.input] == [s["name"] for s in e["inputs"]]
        assert [o.name for o in m.graph.output] == [s["name"] for s in e["outputs"]]
        for i, s in zip(m.graph.input, e["inputs"]):
            dims = [d.dim_value if d.HasField("dim_value") else "T" for d in i.type.tensor_type.shape.dim]
            assert dims == s["shape"], (name, i.name)


def test_plan_kv_bytes_and_budget(tmp_path):
    g = check_graph(write_graph(tmp_path, cache="{op: sink_window, sink_tokens: 4, window_tokens: 300}"))
    cfg = g.cfg.text
    expect = cfg.num_hidden_layers * 2 * 1 * cfg.num_key_value_heads * 304 * cfg.head_dim * 4
    assert g.plan.kv.bytes == expect == int(np.prod(g.plan.kv.shape)) * 4
    assert g.plan.kv.shape == [cfg.num_hidden_layers, 2, 1, cfg.num_key_value_heads, 304, cfg.head_dim]
    m = g.plan.memory
    assert m.total_bytes == m.weights_bytes + m.kv_cache_bytes + m.activations_bytes + m.io_bytes
    # weights: what the ONNX files will carry (tied lm_head counted in the decoder engine)
    n_params = sum(p.numel() for p in g.model.parameters())
    assert m.weights_bytes >= 4 * n_params
    # KV for 100k slots: 2*2*2*16*100000*4 = 51.2 MB > 16 MiB budget
    small = write_graph(tmp_path, name="small", cache="{op: full, capacity_tokens: 100000}", budget=16)
    with pytest.raises(SpecError, match=r"plan needs .* MiB .*budget.memory_mb is 16"):
        check_graph(small)
