"""streamgraph runtime: sessions (wiring), the decoder, the frame pipeline, the stream (clock,
records, runner), the scheduler, sources and live sources, metrics (the KV buffer and the cache
policies are :mod:`streamgraph.kv`).

Torch-free by contract: edge targets ship a bundle and this package (plus onnxruntime).
The names below are loaded lazily (PEP 562), so importing one runtime module (the compiler
reads :mod:`streamgraph.runtime.scheduler`'s overload registry) does not load the others.
"""
from __future__ import annotations

import importlib

_NAMES = {
    "Session": "session", "Engines": "session", "sources": None,
    "Clock": "stream", "SimulatedClock": "stream", "WallClock": "stream",
    "CachePolicy": "streamgraph.kv", "FullCache": "streamgraph.kv", "KVBuffer": "streamgraph.kv",
    "SinkWindowCache": "streamgraph.kv", "make_policy": "streamgraph.kv",
    "FrameRecord": "metrics", "QuestionRecord": "metrics", "Report": "metrics",
    "CostModel": "scheduler", "Scheduler": "scheduler",
}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'streamgraph.runtime' has no attribute {name!r}")
    mod = _NAMES[name]
    if mod is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(mod if "." in mod else f"{__name__}.{mod}"), name)
