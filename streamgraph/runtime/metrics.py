"""Per-frame and per-question records, running aggregates, records on disk, and report.json.

Memory stays flat however long a stream runs:

* every finished record updates :class:`RunStats` — counts and streaming latency
  distributions (DataDog's DDSketch, relative accuracy 1 %, at most 2048 bins each), so the
  summary of a 24-hour stream costs what the summary of a minute costs;
* a stream keeps only its most recent records in memory (a window, default
  :data:`DEFAULT_HISTORY`);
* with a :class:`RecordWriter` every record is also appended to a JSON Lines file as it
  finishes, flushed per record, so nothing measured is lost when a run stops on an error or
  a signal.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ddsketch import LogCollapsingLowestDenseDDSketch

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


class Distribution:
    """A streaming distribution of non-negative values (ms): exact count, mean, min and max,
    percentiles from a DDSketch (each within 1 % of a value of the right rank). Memory is
    bounded (:data:`SKETCH_BINS`) whatever the number of values."""

    __slots__ = ("sketch", "count", "total", "min", "max")

    def __init__(self):
        self.sketch = LogCollapsingLowestDenseDDSketch(SKETCH_ACCURACY, bin_limit=SKETCH_BINS)
        self.count, self.total, self.min, self.max = 0, 0.0, math.inf, -math.inf

    def add(self, value: float) -> None:
        v = float(value)
        self.sketch.add(v)
        self.count += 1
        self.total += v
        self.min = min(self.min, v)
        self.max = max(self.max, v)

    def quantile(self, q: float) -> float | None:
        """Estimated ``q``-quantile (0..1), clamped to the exact [min, max]; None when empty."""
        if not self.count:
            return None
        return float(min(self.max, max(self.min, self.sketch.get_quantile_value(q))))

    def summary(self) -> dict[str, float | None]:
        if not self.count:
            return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
        return {"p50": self.quantile(0.50), "p95": self.quantile(0.95), "p99": self.quantile(0.99),
                "mean": self.total / self.count, "max": self.max}


class RunStats:
    """Running aggregates of a stream's finished records (constant memory)."""

    def __init__(self):
        self.sampled = self.processed = self.dropped = self.errors = self.nonfinite = 0
        self.deadline_met = self.deadline_misses = 0
        self.misses_by_stage: dict[str, int] = {}
        self.e2e = Distribution()
        self.stages: dict[str, Distribution] = {}
        self.first_capture = math.inf
        self.last_end = -math.inf
        self.busy_s = 0.0
        self.questions = self.questions_failed = 0
        self.ttft = Distribution()

    def add_frame(self, rec: FrameRecord) -> None:
        self.sampled += 1
        self.first_capture = min(self.first_capture, rec.capture)
        if rec.decision == "drop":
            self.dropped += 1
            return
        if rec.decision == "error":
            self.errors += 1
            self.nonfinite += rec.error_type == "NonFiniteError"
            return
        self.processed += 1
        if rec.deadline_met:
            self.deadline_met += 1
        elif rec.deadline_met is False:
            self.deadline_misses += 1
            key = rec.overran or "-"
            self.misses_by_stage[key] = self.misses_by_stage.get(key, 0) + 1
        for s, ms in rec.stage_ms.items():
            dist = self.stages.get(s)
            if dist is None:
                dist = self.stages[s] = Distribution()
            dist.add(ms)
            self.busy_s += ms / 1000.0
        if rec.end is not None:
            self.e2e.add(rec.latency_ms)
            self.last_end = max(self.last_end, rec.end)

    def add_question(self, rec: QuestionRecord) -> None:
        self.questions += 1
        self.questions_failed += bool(rec.error)
        if rec.ttft_ms is not None:
            self.ttft.add(rec.ttft_ms)

    def summary(self, kv_bytes: int) -> dict:
        """Counts, per-stage and end-to-end latency percentiles (ms), achieved fps, KV bytes."""
        span = self.last_end - self.first_capture if self.processed else 0.0
        return {
            "sampled": self.sampled,
            "processed": self.processed,
            "dropped": self.dropped,
            "errors": self.errors,
            "nonfinite": self.nonfinite,
            "deadline_misses": self.deadline_misses,
            "deadline_met": self.deadline_met,
            "misses_by_stage": dict(sorted(self.misses_by_stage.items())),
            "latency_ms": {"end_to_end": self.e2e.summary(),
                           **{s: self.stages[s].summary() for s in sorted(self.stages)}},
            "achieved_fps": (self.processed / span) if span > 0 else None,
            "compute_fps": (self.processed / self.busy_s) if self.busy_s > 0 else None,
            "kv_bytes": kv_bytes,
            "questions": self.questions,
            "questions_failed": self.questions_failed,
            "ttft_ms": self.ttft.summary(),
        }


def summarize(frames, questions, kv_bytes: int) -> dict:
    """The summary of the given records (same fields as :meth:`RunStats.summary`)."""
    stats = RunStats()
    for f in frames:
        stats.add_frame(f)
    for q in questions:
        stats.add_question(q)
    return stats.summary(kv_bytes)


class RecordWriter:
    """Appends finished records to a JSON Lines file, one object per line (``{"kind":
    "frame" | "question", ...the record's fields}``), flushed after every line so a crash or
    a signal loses nothing already written (the OS holds it; no fsync).

    Raises :class:`~streamgraph.errors.ReportError` when the file cannot be created or a
    write fails (disk full, file removed from a read-only mount, ...); after a failed write
    the writer is closed, ``error`` says why, and the lines written before stay."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.frames = self.questions = 0
        self.error: str | None = None
        try:
            self._f = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise ReportError(f"{self.path}: cannot write records: {e.strerror or e}") from None

    @property
    def count(self) -> int:
        return self.frames + self.questions

    def write(self, kind: str, rec: FrameRecord | QuestionRecord) -> None:
        if self._f is None:
            if self.error:
                raise ReportError(self.error)
            return
        line = json.dumps({"kind": kind, **record_dict(rec)}, separators=(",", ":")) + "\n"
        try:
            self._f.write(line)
            self._f.flush()
        except OSError as e:
            self.error = (f"{self.path}: cannot write records: {e.strerror or e} (the {self.count} "
                          f"records written before stay)")
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:
                pass
            raise ReportError(self.error) from None
        if kind == "frame":
            self.frames += 1
        else:
            self.questions += 1

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError as e:
                self.error = f"{self.path}: cannot write records: {e.strerror or e}"


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSON Lines file written by :class:`RecordWriter` (a torn last line,
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


__all__ = ["DEFAULT_HISTORY", "RECORDS_FILE", "Distribution", "FrameRecord", "QuestionRecord", "RecordWriter",
           "Report", "RunStats", "check_report_dir", "percentiles", "read_records", "record_dict",
           "summarize"]
