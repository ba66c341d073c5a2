"""ONNX Runtime backend (torch-free): one InferenceSession per engine of a bundle."""
from __future__ import annotations

import os

import numpy as np

from streamgraph.backends.base import Backend
from streamgraph.errors import BackendUnavailableError, BundleError


class OnnxRuntimeBackend(Backend):
    """Runs a bundle's ONNX engines with ONNX Runtime.

    ``providers`` defaults to CPU; ``threads`` sets intra-op threads per session (default: the
    machine's cores). Spinning is disabled (``session.intra_op.allow_spinning = 0``) because
    several sessions share the cores and spinning threads fight each other.

    Thread-safe (``thread_safe = True``): ONNX Runtime documents ``InferenceSession.run`` as
    safe to call from several threads at once, and this backend keeps no state between calls,
    so streams on different threads may run the same engines concurrently (the calls share
    each engine's intra-op thread pool).
    """

    name = "onnxruntime"
    thread_safe = True

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
            file = bundle.file(engine.file)          # verified at load, inside the bundle
            try:
                sess = ort.InferenceSession(str(file), so, providers=self.providers)
            except Exception as e:  # ORT's load errors (InvalidProtobuf, Fail, ...): a bad file
                raise BundleError(f"{bundle.path / engine.file}: onnxruntime cannot load the engine: "
                                  f"{type(e).__name__}: {' '.join(str(e).split())}") from None
            problem = _io_mismatch(sess, engine)
            if problem:
                raise BundleError(f"{bundle.path / engine.file}: engine does not match the plan's "
                                  f"{name!r} engine: {problem}")
            self.sessions[name] = sess

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[engine]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, inputs)))


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(bool)": "bool"}


def _io_mismatch(sess, engine) -> str | None:
    """How an ONNX Runtime session's inputs/outputs differ from the plan's ``engine`` (names
    in order, dtypes, static dims; a plan's ``"T"`` is a symbolic dim), or None."""
    for kind, got, want in (("inputs", sess.get_inputs(), engine.inputs),
                            ("outputs", sess.get_outputs(), engine.outputs)):
        if [g.name for g in got] != [w.name for w in want]:
            return f"{kind} {[g.name for g in got]} != {[w.name for w in want]}"
        for g, w in zip(got, want):
            if _ORT_DTYPES.get(g.type, g.type) != w.dtype:
                return f"{g.name}: dtype {g.type} != {w.dtype}"
            dims = list(g.shape) if g.shape is not None else None
            if dims is None or len(dims) != len(w.shape):
                return f"{g.name}: shape {dims} != {w.shape}"
            for d, e in zip(dims, w.shape):
                if e == "T":
                    if isinstance(d, int) and kind == "inputs":
                        return f"{g.name}: shape {dims} != {w.shape} (T is dynamic)"
                elif isinstance(d, int) and d != e or (kind == "inputs" and not isinstance(d, int)):
                    return f"{g.name}: shape {dims} != {w.shape}"
    return None
