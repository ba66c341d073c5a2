"""A backend wrapper that checks every engine output before the runtime can store it.

:class:`GuardedBackend` forwards ``run(engine, inputs)`` to a backend and

* turns any exception the backend raises into :class:`~streamgraph.errors.EngineError`
  naming the engine (a one-line message; the original exception is chained);
* checks every floating-point output (``new_kv``, ``logits``, reducer ``next_state_*``,
  ``encoder_refs``, visual tokens, ...) for NaN/Inf and raises
  :class:`~streamgraph.errors.NonFiniteError` ("decoder_step produced NaN/Inf in new_kv")
  *before* returning, so the caller never writes a non-finite value into the KV buffer,
  the cache policy, or a reducer's / encoder's state.

The check costs one pass over each floating output (``isfinite`` for small arrays; ``min``
and ``max``, which propagate NaN, for large ones), small beside the engine itself.
"""
from __future__ import annotations

import numpy as np

from streamgraph.errors import EngineError, NonFiniteError, StreamgraphError


def nonfinite_outputs(outputs: dict[str, np.ndarray]) -> list[str]:
    """Names of the floating-point arrays in ``outputs`` holding NaN or Inf."""
    bad = []
    for name, value in outputs.items():
        a = np.asarray(value)
        if a.dtype.kind != "f" or not a.size:
            continue
        if a.size < _LARGE:
            ok = bool(np.isfinite(a).all())
        else:                                   # no temporary of a's size; NaN propagates
            ok = bool(np.isfinite(a.min()) and np.isfinite(a.max()))
        if not ok:
            bad.append(name)
    return bad


_LARGE = 1 << 16


class GuardedBackend:
    """Wraps ``backend``; other attributes (``name``, ``threads``, ...) are the backend's."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``engine``. Raises EngineError when the backend fails, NonFiniteError when an
        output holds NaN/Inf (nothing is returned, so nothing is stored)."""
        try:
            out = self.backend.run(engine, inputs)
        except StreamgraphError:
            raise
        except Exception as e:                 # ORT failures, MemoryError, OSError, ...
            msg = " ".join(str(e).split())
            raise EngineError(f"engine {engine} failed: {type(e).__name__}" + (f": {msg}" if msg else ""),
                              engine=engine) from e
        bad = nonfinite_outputs(out)
        if bad:
            raise NonFiniteError(f"{engine} produced NaN/Inf in {', '.join(bad)}", engine=engine)
        return out
