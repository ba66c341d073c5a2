"""ONNX Runtime backend (torch-free): one InferenceSession per engine of a bundle."""
from __future__ import annotations

import os

import numpy as np

from streamgraph.backends.base import Backend
from streamgraph.errors import BackendUnavailableError


class OnnxRuntimeBackend(Backend):
    """Runs a bundle's ONNX engines with ONNX Runtime.

    ``providers`` defaults to CPU; ``threads`` sets intra-op threads per session (default: the
    machine's cores). Spinning is disabled (``session.intra_op.allow_spinning = 0``) because
    several sessions share the cores and spinning threads fight each other.
    """

    name = "onnxruntime"

    def __init__(self, bundle, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - dependency of the package
            raise BackendUnavailableError(f"onnxruntime is not installed: {e}") from None
        self.providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailableError(
                f"onnxruntime execution provider(s) {missing} not available here "
                f"(available: {ort.get_available_providers()})")
        if bundle.manifest.get("target") != "onnx":
            raise BackendUnavailableError(
                f"{bundle.path}: bundle was compiled for target {bundle.manifest.get('target')!r} and has no "
                f"ONNX engines; recompile it with the default target (onnx)")
        self.sessions = {}
        self.threads = threads or (os.cpu_count() or 1)       # intra-op threads of every engine
        for name, engine in bundle.plan.engines.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sessions[name] = ort.InferenceSession(str(bundle.path / engine.file), so,
                                                       providers=self.providers)

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[engine]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, inputs)))
