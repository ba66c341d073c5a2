"""streamgraph: a declarative graph compiler and runtime for streaming multimodal models.

Importing this package is cheap and torch-free; ``Session`` and ``sources`` are loaded
lazily from :mod:`streamgraph.runtime` (which never imports torch).
"""
from __future__ import annotations

from streamgraph.errors import StreamgraphError

__version__ = "0.1.0"
__all__ = ["Session", "sources", "StreamgraphError", "__version__"]


def __getattr__(name: str):
    if name == "Session":
        from streamgraph.runtime.session import Session

        return Session
    if name == "sources":
        from streamgraph.runtime import sources

        return sources
    raise AttributeError(f"module 'streamgraph' has no attribute {name!r}")
