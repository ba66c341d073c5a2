"""The one engine-runtime interface every backend implements (torch-free)."""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import numpy as np


class Backend(ABC):
    """Loads a bundle's engines and runs them on numpy arrays.

    ``run(engine, inputs)`` takes and returns dicts keyed by the plan's input/output names;
    arrays are batch-first numpy arrays with the plan's dtypes.

    A backend holds only the engines (weights, compiled graphs), never a stream's state: the
    KV buffer, the cache policy and the reducer/encoder state belong to each
    :class:`~streamgraph.runtime.session.Session`, so one backend can serve any number of
    sessions (:class:`~streamgraph.runtime.session.Engines`). ``thread_safe`` says whether
    ``run`` may be called from several threads at once; :class:`SerializedBackend` makes a
    backend that is not safe so by running one engine call at a time.
    """

    name = "backend"
    #: whether ``run`` may be called concurrently from several threads
    thread_safe = False

    @abstractmethod
    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one engine. Raises KeyError for an engine the bundle does not have."""

    def close(self) -> None:  # pragma: no cover - optional
        pass


class SerializedBackend(Backend):
    """Wraps a backend whose ``run`` is not thread-safe: one engine call at a time (a lock
    held for the duration of each call). Other attributes are the wrapped backend's."""

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

    def close(self) -> None:
        self.backend.close()

