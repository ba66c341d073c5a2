"""The one engine-runtime interface every backend implements (torch-free)."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Backend(ABC):
    """Loads a bundle's engines and runs them on numpy arrays.

    ``run(engine, inputs)`` takes and returns dicts keyed by the plan's input/output names;
    arrays are batch-first numpy arrays with the plan's dtypes.
    """

    name = "backend"

    @abstractmethod
    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one engine. Raises KeyError for an engine the bundle does not have."""

    def close(self) -> None:  # pragma: no cover - optional
        pass


def open_backend(name: str, bundle, **options) -> Backend:
    """Backend by name: ``onnxruntime`` (default), ``torch`` (eager reference), ``tensorrt``.

    Raises :class:`~streamgraph.errors.BackendUnavailableError` when its runtime is missing,
    and ValueError for an unknown name."""
    if name == "onnxruntime":
        from streamgraph.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, **options)
    if name == "torch":
        from streamgraph.backends.torch import TorchBackend

        return TorchBackend(bundle, **options)
    if name == "tensorrt":
        from streamgraph.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle, **options)
    raise ValueError(f"unknown backend {name!r} (allowed: onnxruntime, torch, tensorrt)")
