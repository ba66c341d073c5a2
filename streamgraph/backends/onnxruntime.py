"""ONNX Runtime backend (torch-free): one InferenceSession per engine of a bundle, and the
decoder's KV buffer bound once per session with IOBinding.

Stateless engines run through ``InferenceSession.run``. The decoder runs through
``run_with_iobinding`` on a :class:`BoundKV`: the session's KV buffer (host numpy memory,
wrapped once in an ``OrtValue`` that shares it, bound as ``kv_cache``) and output buffers
preallocated for the largest chunk ``T_max`` (``new_kv``, ``logits``, ``last_hidden``,
``query_mean``), so a step allocates nothing and ``new_kv`` is scattered into its slots
straight from the bound output. What this saves and costs, measured: ``bench/kv_binding.py``
and docs/architecture.md, "Engine I/O per decoder step".
"""
from __future__ import annotations

import os

import numpy as np

from streamgraph.backends.base import Backend
from streamgraph.contract import DECODER_STEP, DTYPES, INPUTS_EMBEDS, KV_CACHE, NEW_KV, ONNX_TO_DTYPE
from streamgraph.errors import BackendUnavailableError, BundleError
from streamgraph.kv.base import KVBuffer


class OnnxRuntimeBackend(Backend):
    """Runs a bundle's ONNX engines with ONNX Runtime.

    ``providers`` defaults to CPU; ``threads`` sets intra-op threads per session (default: the
    machine's cores). Spinning is disabled (``session.intra_op.allow_spinning = 0``) because
    several sessions share the cores and spinning threads fight each other.

    Thread-safe (``thread_safe = True``): ONNX Runtime documents ``InferenceSession.run`` (and
    ``run_with_iobinding``) as safe to call from several threads at once. The backend keeps
    no per-stream state: each KV buffer from :meth:`alloc_kv` carries its own IOBinding and
    output buffers (a :class:`BoundKV`), used only by the one session (thread) that owns the
    buffer, so streams on different threads may run the same engines concurrently (the calls
    share each engine's intra-op thread pool).
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
        self._ort = ort
        dec = bundle.plan.engines.get(DECODER_STEP)
        #: decoder_step inputs a step must bind (every input but kv_cache), its outputs as
        #: (name, numpy dtype, plan shape with "T"), and the largest chunk
        self._step_inputs = frozenset(i.name for i in dec.inputs if i.name != KV_CACHE) if dec else frozenset()
        self._step_outputs = [(o.name, DTYPES[o.dtype].numpy, list(o.shape)) for o in dec.outputs] if dec else []
        self._t_max = int(dec.dims.get("T", [1, 1])[1]) if dec else 1

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[engine]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, inputs)))

    # ------------------------------------------------------------------ bound decoder
    def alloc_kv(self, shape, dtype: str = "float32") -> "BoundKV":
        """The session's KV buffer, bound once: a :class:`BoundKV` (host memory shared with
        ONNX Runtime, its own IOBinding and output buffers). Raises KeyError when the bundle
        has no decoder_step engine."""
        return BoundKV(self, shape, dtype)

    def decoder_step(self, kv: KVBuffer, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoder step on the bound buffers of ``kv`` (see
        :meth:`Backend.decoder_step <streamgraph.backends.base.Backend.decoder_step>` for the
        I/O). The small inputs are bound where they lie (no copy), the outputs are written
        where they are returned: ``logits``, ``last_hidden``, ``query_mean`` into fresh arrays
        bound for this step (the caller owns them; nothing is copied), ``new_kv`` into
        ``kv``'s preallocated buffer, returned as a view (the pending KV). A
        plain :class:`~streamgraph.kv.base.KVBuffer` (not from this backend) runs the unbound
        default. Raises ValueError when ``inputs`` is not exactly the engine's inputs other
        than ``kv_cache``."""
        if kv.__class__ is not BoundKV or kv.backend is not self:
            return Backend.decoder_step(self, kv, inputs)
        if inputs.keys() != self._step_inputs:
            raise ValueError(f"decoder_step inputs {sorted(inputs)} != the engine's "
                             f"{sorted(self._step_inputs)} (kv_cache is bound)")
        binding = kv.binding
        kv.pending_new_kv = None
        alive = []                               # the bound arrays, alive until the run ends
        for name, value in inputs.items():      # an OrtValue over the array's memory, no copy
            alive.append(value := np.ascontiguousarray(value))
            binding.bind_cpu_input(name, value)
        out = {}
        for name, shape, dtype in kv.fresh_outputs:  # fresh arrays the caller owns, written in place
            out[name] = a = np.empty(shape, dtype)
            binding.bind_output(name, "cpu", 0, dtype, shape, a.ctypes.data)
        t = inputs[INPUTS_EMBEDS].shape[1]
        if t != kv.bound_t:
            kv.bind_outputs(t)
        self.sessions[DECODER_STEP].run_with_iobinding(binding)
        out.update(kv.outputs)
        kv.pending_new_kv = out[NEW_KV]
        return out

    def commit_kv(self, kv: KVBuffer, write_slots: np.ndarray) -> None:
        """Scatter the pending ``new_kv`` of ``kv`` into ``write_slots`` (>= 0) straight from
        the bound output buffer: one copy of the chunk's valid tokens, a slice assignment
        when the slots are consecutive. Raises RuntimeError when no step is pending."""
        pending = kv.pending_new_kv if hasattr(kv, "pending_new_kv") else None
        if pending is None:
            raise RuntimeError("commit_kv: no decoder_step is pending on this KV buffer")
        kv.pending_new_kv = None
        n = int((write_slots >= 0).sum())
        if n == 0:
            return
        slots = write_slots[:n]
        if n == len(write_slots) or (write_slots[n:] < 0).all():     # valid slots form a prefix
            first = int(slots[0])
            if int(slots[-1]) - first == n - 1 and (n == 1 or (np.diff(slots) == 1).all()):
                kv.data[:, :, :, :, first:first + n, :] = pending[:, :, :, :, :n, :]
                return
        kv.write(pending, write_slots)


class BoundKV(KVBuffer):
    """A session's KV buffer bound to an :class:`OnnxRuntimeBackend`'s ``decoder_step``.

    ``data`` is the host buffer ``[L, 2, B, Hkv, S, Dh]`` (as for a plain KVBuffer, the live
    view tests and ReKV's block copies read); ``ortvalue`` is an ``OrtValue`` over the same
    memory (checked: same data pointer), bound once as ``kv_cache`` in ``binding``, this
    buffer's own IOBinding (never shared across threads). The chunk-sized outputs
    (``new_kv``) have buffers allocated once for ``T_max`` tokens; ``new_kv`` of a T-token
    chunk is a contiguous view of the first ``L*2*B*Hkv*T*Dh`` elements of its buffer,
    rebound only when ``T`` changes. The other outputs (``logits``, ``last_hidden``,
    ``query_mean``; no ``T`` axis) are bound per step to fresh arrays handed to the caller
    (``fresh_outputs``): a buffer reused across steps would change under a caller that kept
    a step's logits, and copying out of one would cost a copy.
    Raises RuntimeError if ONNX Runtime would not share the buffer's memory.
    """

    def __init__(self, backend: OnnxRuntimeBackend, shape, dtype: str = "float32"):
        super().__init__(shape, dtype)
        self.backend = backend
        self.ortvalue = backend._ort.OrtValue.ortvalue_from_numpy(self.data)
        if self.ortvalue.data_ptr() != self.address:
            raise RuntimeError("onnxruntime copied the KV buffer instead of sharing its memory")
        self.binding = backend.sessions[DECODER_STEP].io_binding()
        self.binding.bind_ortvalue_input(KV_CACHE, self.ortvalue)
        self.pending_new_kv: np.ndarray | None = None
        self.bound_t: int | None = None
        t_max = backend._t_max
        self._flat = {}                                # chunk-sized output -> flat buffer for T_max
        self.outputs: dict[str, np.ndarray] = {}       # chunk-sized output -> view bound for bound_t
        #: (name, shape, numpy dtype) of the outputs bound to fresh arrays every step
        self.fresh_outputs: list[tuple[str, tuple[int, ...], np.dtype]] = []
        for name, np_dtype, plan_shape in backend._step_outputs:
            if "T" in plan_shape:
                self._flat[name] = np.zeros(int(np.prod([t_max if d == "T" else d for d in plan_shape])), np_dtype)
            else:
                self.fresh_outputs.append((name, tuple(plan_shape), np_dtype))
        self._shapes = {name: plan_shape for name, _, plan_shape in backend._step_outputs}
        self.bind_outputs(1)

    @property
    def output_nbytes(self) -> int:
        """Bytes of the preallocated chunk-sized output buffers (sized for ``T_max``)."""
        return sum(int(a.nbytes) for a in self._flat.values())

    def bind_outputs(self, t: int) -> None:
        """Bind the chunk-sized outputs to their preallocated buffers, shaped for a chunk of
        ``t`` tokens (1 <= t <= T_max; ValueError otherwise)."""
        if not 1 <= t <= self.backend._t_max:
            raise ValueError(f"decoder_step chunk of {t} tokens is outside the plan's T = [1, {self.backend._t_max}]")
        for name, flat in self._flat.items():
            shape = [t if d == "T" else d for d in self._shapes[name]]
            view = flat[: int(np.prod(shape))].reshape(shape)
            self.binding.bind_output(name, "cpu", 0, flat.dtype, shape, view.ctypes.data)
            self.outputs[name] = view
        self.bound_t = t


def _io_mismatch(sess, engine) -> str | None:
    """How an ONNX Runtime session's inputs/outputs differ from the plan's ``engine`` (names
    in order, dtypes, static dims; a plan's ``"T"`` is a symbolic dim), or None."""
    for kind, got, want in (("inputs", sess.get_inputs(), engine.inputs),
                            ("outputs", sess.get_outputs(), engine.outputs)):
        if [g.name for g in got] != [w.name for w in want]:
            return f"{kind} {[g.name for g in got]} != {[w.name for w in want]}"
        for g, w in zip(got, want):
            if ONNX_TO_DTYPE.get(g.type, g.type) != w.dtype:
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
