"""The one engine-runtime interface every backend implements (torch-free).

Two kinds of engine call:

* stateless engines (``vision_encoder``, ``reducer_k{K}``, ``embed_tokens``):
  :meth:`Backend.run` — numpy arrays in, numpy arrays out;
* the decoder over the session's KV buffer, in three calls per chunk:
  :meth:`Backend.alloc_kv` once per session (the buffer the backend binds), then per step
  :meth:`Backend.decoder_step` (the chunk's small inputs; the step's ``new_kv`` stays in the
  backend as the buffer's *pending* KV) and :meth:`Backend.commit_kv` (the pending KV
  scattered into slots, inside the backend). The runtime checks the step's outputs for
  NaN/Inf between the two, so a non-finite step is never committed.

The defaults below run the decoder through :meth:`Backend.run` with the host buffer as the
``kv_cache`` input and scatter on the host (every backend works with them); a backend with
device memory or bound buffers overrides the three (``onnxruntime``: IOBinding,
``tensorrt``: a device-resident buffer).
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import numpy as np

from streamgraph.contract import DECODER_STEP, KV_CACHE, NEW_KV
from streamgraph.kv.base import KVBuffer


class Backend(ABC):
    """Loads a bundle's engines and runs them on numpy arrays.

    ``run(engine, inputs)`` takes and returns dicts keyed by the plan's input/output names
    (:mod:`streamgraph.contract`); arrays are batch-first numpy arrays with the plan's dtypes.

    A backend holds only the engines (weights, compiled graphs), never a stream's state: the
    KV buffer (allocated by :meth:`alloc_kv`, with whatever binding the backend attaches to
    it), the cache policy and the reducer/encoder state belong to each session, so one
    backend can serve any number of sessions (``Engines``). ``thread_safe`` says whether
    ``run`` and the decoder calls may come from several threads at once (each thread with
    its own KV buffer); :class:`SerializedBackend` makes a backend that is not safe so by
    running one engine call at a time.
    """

    name = "backend"
    #: whether ``run`` / ``decoder_step`` may be called concurrently from several threads
    #: (on different KV buffers)
    thread_safe = False

    @abstractmethod
    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one engine. Raises KeyError for an engine the bundle does not have."""

    # ------------------------------------------------------------------ the decoder's KV
    def alloc_kv(self, shape: "list[int] | tuple[int, ...]", dtype: str = "float32") -> KVBuffer:
        """Allocate a session's KV buffer ``kv_cache [L, 2, B, Hkv, S, Dh]`` of plan dtype
        ``dtype`` ("float32" / "float16"), zero-filled, once; its address never changes.
        Default: a host :class:`~streamgraph.kv.base.KVBuffer`."""
        return KVBuffer(shape, dtype)

    def decoder_step(self, kv: KVBuffer, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``decoder_step`` over ``kv`` (the engine's ``kv_cache``). ``inputs`` holds
        every other decoder_step input (``inputs_embeds [B,T,C]``, ``positions [B,T]``,
        ``token_valid [B,T]``, ``cache_positions [B,S]``, ``cache_valid [B,S]``, and
        ``window_valid [B,S]`` / ``streaming_heads [L,Hkv]`` in engines that have them).

        Returns host numpy ``logits [B,V]``, ``last_hidden [B,C]``, ``query_mean [L,B,H,Dh]``
        (fresh arrays the caller may keep) and ``new_kv [L,2,B,Hkv,T,Dh]``, a host view of
        the step's KV that the backend keeps as ``kv``'s pending KV until :meth:`commit_kv`
        or the next step on ``kv`` (read it, e.g. to check it is finite; do not keep it).
        A device backend may return ``new_kv_finite`` (bool) instead of ``new_kv``.
        Default: :meth:`run` with ``kv.data`` as ``kv_cache``."""
        out = self.run(DECODER_STEP, {**inputs, KV_CACHE: kv.data})
        kv.pending_new_kv = out[NEW_KV]
        return out

    def commit_kv(self, kv: KVBuffer, write_slots: np.ndarray) -> None:
        """Write the pending KV of the last :meth:`decoder_step` on ``kv``: its token ``t``
        into slot ``write_slots[t]`` for every ``write_slots[t] >= 0`` (``write_slots [T]``
        int64), in place. Raises RuntimeError when no step is pending (committed already, or
        none ran). Default: :meth:`KVBuffer.write` on the host."""
        pending = getattr(kv, "pending_new_kv", None)
        if pending is None:
            raise RuntimeError("commit_kv: no decoder_step is pending on this KV buffer")
        kv.pending_new_kv = None
        kv.write(pending, write_slots)

    def close(self) -> None:  # pragma: no cover - optional
        pass


class SerializedBackend(Backend):
    """Wraps a backend whose calls are not thread-safe: one engine call at a time (a lock
    held for the duration of each ``run``, ``decoder_step`` and ``commit_kv``). Other
    attributes are the wrapped backend's."""

    thread_safe = True

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = backend.name
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self.backend.run(engine, inputs)

    def alloc_kv(self, shape, dtype: str = "float32") -> KVBuffer:
        with self._lock:
            return self.backend.alloc_kv(shape, dtype)

    def decoder_step(self, kv: KVBuffer, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self.backend.decoder_step(kv, inputs)

    def commit_kv(self, kv: KVBuffer, write_slots: np.ndarray) -> None:
        with self._lock:
            self.backend.commit_kv(kv, write_slots)

    def close(self) -> None:
        self.backend.close()
