"""Engine backends, found by name through one registry (torch-free: nothing is imported
until a backend is opened).

======================  ==============================================================
name                    backend
======================  ==============================================================
``onnxruntime``         :class:`~streamgraph.backends.onnxruntime.OnnxRuntimeBackend`
                        (default; CPU, the KV buffer bound once with IOBinding)
``torch``               :class:`~streamgraph.backends.torch.TorchBackend` (eager reference)
``torch-device``        :class:`~streamgraph.backends.torch_device.TorchDeviceBackend`
                        (CUDA or CPU; the KV buffer resident on the device)
``tensorrt``            :class:`~streamgraph.backends.tensorrt.TensorRTBackend` (written
                        against TensorRT 10, never run here)
======================  ==============================================================

Every backend implements :class:`~streamgraph.backends.base.Backend`. The registry lives
here, not in ``base.py``: the base module imports none of its subclasses (no import circle).
"""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from streamgraph.backends.base import Backend


def _lazy(module: str, cls: str) -> Callable[..., Backend]:
    """A factory that imports ``streamgraph.backends.<module>`` only when called."""

    def factory(bundle, **options) -> Backend:
        return getattr(import_module(f"streamgraph.backends.{module}"), cls)(bundle, **options)

    factory.__qualname__ = factory.__name__ = f"open_{module}"
    return factory


#: Backend name -> lazy factory ``(bundle, **options) -> Backend``. Register another backend
#: by adding an entry.
BACKENDS: dict[str, Callable[..., Backend]] = {
    "onnxruntime": _lazy("onnxruntime", "OnnxRuntimeBackend"),
    "torch": _lazy("torch", "TorchBackend"),
    "torch-device": _lazy("torch_device", "TorchDeviceBackend"),
    "tensorrt": _lazy("tensorrt", "TensorRTBackend"),
}


def open_backend(name: str, bundle, **options) -> Backend:
    """Open backend ``name`` (a key of :data:`BACKENDS`; ``onnxruntime`` is the default of
    every caller) on a loaded :class:`~streamgraph.compiler.bundle.Bundle`; ``options`` go
    to its constructor.

    Raises ValueError (one line, listing the allowed names) for an unknown name, and
    :class:`~streamgraph.errors.BackendUnavailableError` when the backend's runtime is
    missing (no onnxruntime / torch / TensorRT, no CUDA device, wrong bundle target)."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"unknown backend {name!r} (allowed: {', '.join(BACKENDS)})")
    return factory(bundle, **options)


__all__ = ["BACKENDS", "Backend", "open_backend"]
