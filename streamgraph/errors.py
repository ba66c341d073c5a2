"""Error types shared by every part of streamgraph.

Every error a user can cause derives from :class:`StreamgraphError`; the CLI prints
``str(err)`` as one line and exits non-zero, so messages must say what was wrong and where.
"""
from __future__ import annotations


class StreamgraphError(Exception):
    """Base class for user-facing errors (bad input, failed checks, missing files)."""


class SpecError(StreamgraphError):
    """A graph file is malformed or violates the spec.

    ``str()`` reads ``FILE:LINE:COL: FIELD: MESSAGE`` (line and column are 1-based; either
    part is omitted when unknown).
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 col: int | None = None, field: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.col = col
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<graph>"
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class GraphError(SpecError):
    """The graph is well-formed YAML/spec but structurally invalid (cycle, unknown op,
    unconnected port, type mismatch, not exactly one decoder, impossible shapes)."""


class PlanError(StreamgraphError):
    """The static plan cannot be satisfied (e.g. memory over ``budget.memory_mb``)."""


class BundleError(StreamgraphError):
    """A compiled bundle is missing, incomplete, or its files do not match their hashes."""


class SourceError(StreamgraphError):
    """A frame source (video file, camera) is missing, unreadable or yields no frames."""


class CapacityError(StreamgraphError):
    """A cache policy has no free slot left (e.g. ``full`` once capacity is reached)."""


class BackendUnavailableError(StreamgraphError):
    """An engine runtime (TensorRT, CUDA EP, torch) is not installed or cannot start."""


class EngineError(StreamgraphError):
    """An engine failed while running (the backend raised). ``engine`` names it."""

    def __init__(self, message: str, *, engine: str | None = None):
        self.engine = engine
        super().__init__(message)


class NonFiniteError(EngineError):
    """An engine output that would write state (KV, reducer/encoder state, logits used for
    sampling) holds NaN or Inf; the step that produced it is not committed."""


class StreamClosedError(StreamgraphError):
    """A question was asked of a runner that has stopped (its sources ended, ``stop()`` was
    called, or an error ended the run) or was still waiting when it stopped."""


class ReportError(StreamgraphError):
    """A run's report directory or records file cannot be written."""
