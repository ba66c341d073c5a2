"""Per-frame and per-question records (their types), report.json, and reading records back.

What runs per frame — the running aggregates (:class:`~streamgraph.runtime.stream.RunStats`:
counts and streaming latency distributions, DataDog's DDSketch, relative accuracy 1 %, at most
2048 bins each) and the JSON Lines writer (:class:`~streamgraph.runtime.stream.RecordWriter`,
flushed per record, so nothing measured is lost when a run stops on an error or a signal) —
lives in :mod:`streamgraph.runtime.stream`; this module's code runs at report time only. Memory
stays flat however long a stream runs: a stream keeps only its most recent records in memory
(a window, default :data:`DEFAULT_HISTORY`), and the summary of a 24-hour stream costs what the
summary of a minute costs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from streamgraph.errors import ReportError

DEFAULT_HISTORY = 1024        # records of each kind a stream keeps in memory
SKETCH_ACCURACY = 0.01        # relative accuracy of the percentiles
SKETCH_BINS = 2048            # bins per distribution (lowest bins collapse beyond it)
RECORDS_FILE = "records.jsonl"


@dataclass
class FrameRecord:
    """One sampled frame. Times are stream seconds; ``stage_ms`` in milliseconds.

    ``decision`` is ``run``, ``drop`` or ``error``. An error record names the stage that failed
    (``failed_stage``: preprocess, encode, reduce or prefill), the error's type
    (``error_type``, e.g. ``NonFiniteError`` for an engine output holding NaN/Inf) and its
    message (``reason``)."""

    index: int
    capture: float
    deadline: float
    decision: str                    # "run" | "drop" | "error"
    start: float | None = None
    end: float | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    tokens_kept: int = 0
    budget: int = 0                  # token budget K the frame ran at
    encoder: str = ""                # encoder path: full | refresh | reuse | skip (stc_cacher)
    slots_in_use: int = 0            # KV slots holding tokens after the frame
    deadline_met: bool | None = None
    overran: str | None = None       # stage that overran, for a miss or a drop
    reason: str = ""
    queue_len: int = 0               # frames pending (this one included) when it was decided
    failed_stage: str | None = None  # error records: the stage that failed
    error_type: str | None = None    # error records: the exception's class name

    @property
    def latency_ms(self) -> float | None:
        return None if self.end is None else 1000.0 * (self.end - self.capture)


@dataclass
class QuestionRecord:
    """One question: TTFT is from ``asked_at`` to the first generated token (ms). ``error``
    holds ``Type: message`` when the question failed (its answer is what was decoded before)."""

    text: str
    asked_at: float
    deadline: float
    prompt_tokens: int = 0
    ttft_ms: float | None = None
    decode_ms: list[float] = field(default_factory=list)
    answer: str = ""
    new_tokens: int = 0
    ttft_met: bool | None = None
    slots_in_use: int = 0
    error: str = ""


_FRAME_FIELDS = tuple(f.name for f in fields(FrameRecord))
_QUESTION_FIELDS = tuple(f.name for f in fields(QuestionRecord))


def record_dict(rec: FrameRecord | QuestionRecord) -> dict:
    """A record as a plain dict (what report.json and records.jsonl hold)."""
    names = _FRAME_FIELDS if isinstance(rec, FrameRecord) else _QUESTION_FIELDS
    out = {n: getattr(rec, n) for n in names}
    for k in ("stage_ms", "decode_ms"):
        if k in out:
            out[k] = out[k].copy()
    return out


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Exact p50/p95/p99/mean/max of ``values`` (linear interpolation, as numpy)."""
    import numpy as np

    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSON Lines file written by :class:`~streamgraph.runtime.stream.RecordWriter` (a torn last line,
    from a process killed mid-write, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise
    return out


def check_report_dir(directory: str | Path) -> Path:
    """Create ``directory`` if needed and check that files can be created in it; returns it.

    Raises :class:`~streamgraph.errors.ReportError` (one line) when it is a file, cannot be
    created, or is not writable."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ReportError(f"{d}: report path is a file, not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{d}: cannot create the report directory: {e.strerror or e}") from None
    probe = d / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ReportError(f"{d}: report directory is not writable: {e.strerror or e}") from None
    return d


@dataclass
class Report:
    """What a run produced; :meth:`save` writes ``report.json`` into a directory.

    ``frames``/``questions`` are the most recent records (the stream's window); ``summary``
    covers every record of the run. ``records`` says how many records there were in all, how
    many are in the window, and where the complete list is (``records.jsonl``)."""

    meta: dict
    frames: list[FrameRecord]
    questions: list[QuestionRecord]
    summary: dict
    records: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "summary": self.summary, "records": self.records,
                "frames": [record_dict(f) for f in self.frames],
                "questions": [record_dict(q) for q in self.questions]}

    def save(self, directory: str | Path, plot: bool = True) -> Path:
        """Write ``report.json`` (and, with matplotlib installed and ``plot``, ``latency.png``
        of the window) into ``directory`` (created if needed); returns the JSON's path.
        Raises :class:`~streamgraph.errors.ReportError` when it cannot be written."""
        d = Path(directory)
        path = d / "report.json"
        tmp = path.with_suffix(".json.tmp")
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            tmp.replace(path)
        except OSError as e:
            raise ReportError(f"{path}: cannot write the report: {e.strerror or e}") from None
        if plot:
            from streamgraph.runtime.plot import plot_latency

            plot_latency(self, d / "latency.png")
        return path


__all__ = ["DEFAULT_HISTORY", "RECORDS_FILE", "FrameRecord", "QuestionRecord", "Report", "check_report_dir",
           "percentiles", "read_records", "record_dict"]
