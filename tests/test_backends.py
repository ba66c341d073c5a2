"""Backend selection and clean failure when an engine runtime is missing."""
from __future__ import annotations

import importlib.abc
import sys

import pytest

from streamgraph.cli import main
from streamgraph.compiler.bundle import Bundle
from streamgraph.errors import BackendUnavailableError


class _BrokenTensorRT(importlib.abc.MetaPathFinder):
    """Mimics an installed-but-broken TensorRT whose import raises a bare Exception."""

    def find_spec(self, name, path, target=None):
        if name == "tensorrt":
            raise Exception("libnvinfer.so.10: cannot open shared object file")
        return None


@pytest.mark.parametrize("broken", [False, True])
def test_tensorrt_missing_is_a_clear_error(onnx_bundle, monkeypatch, capsys, broken):
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    if broken:
        monkeypatch.setattr(sys, "meta_path", [_BrokenTensorRT()] + sys.meta_path)
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    from streamgraph.backends import open_backend

    with pytest.raises(BackendUnavailableError, match="TensorRT is not available here"):
        open_backend("tensorrt", Bundle.load(onnx_bundle))
    assert main(["run", str(onnx_bundle), "--backend", "tensorrt", "--max-frames", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TensorRT is not available here") and "\n" not in err


def test_onnxruntime_refuses_missing_provider_and_torch_target(onnx_bundle, tmp_path):
    from streamgraph.backends.onnxruntime import OnnxRuntimeBackend
    from tests.conftest import torch_bundle

    with pytest.raises(BackendUnavailableError, match="not available here"):
        OnnxRuntimeBackend(Bundle.load(onnx_bundle), providers=["NoSuchExecutionProvider"])
    tb = torch_bundle(tmp_path, name="t-only")
    with pytest.raises(BackendUnavailableError, match="no ONNX engines"):
        OnnxRuntimeBackend(Bundle.load(tb))


def test_unknown_backend(onnx_bundle):
    from streamgraph.backends import open_backend

    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        open_backend("tpu", Bundle.load(onnx_bundle))
