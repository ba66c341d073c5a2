"""What every stream executor shares: frame/question records and the single-frame path.

:class:`~streamgraph.runtime.session.Session` (real engines) and
:class:`~streamgraph.runtime.simulate.SimulatedSession` (given stage costs on a virtual clock)
both derive from :class:`StreamBase`, so the runner and the scheduler treat them alike.

Records: a finished record updates the running aggregates (:class:`~streamgraph.runtime.metrics.RunStats`),
joins the in-memory window (``frames``/``questions``: the most recent ``history`` of each) and,
after :meth:`StreamBase.write_records`, is appended to a JSON Lines file at once. Memory and
the cost of :meth:`StreamBase.report` do not grow with the length of the stream.

A frame whose engine output holds NaN/Inf (:class:`~streamgraph.errors.NonFiniteError`) is
not committed (the KV cache, the cache policy and the reducer state stay as they were): it
becomes an ``error`` record naming the failed stage, the summary counts it (``nonfinite``),
and the stream goes on as if the frame had been dropped. Any other error also leaves an
``error`` record and is raised.
"""
from __future__ import annotations

import math
import operator
import time
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path

from streamgraph.errors import NonFiniteError, ReportError
from streamgraph.runtime.clock import Clock
from streamgraph.runtime.metrics import (DEFAULT_HISTORY, FrameRecord, QuestionRecord, RecordWriter, Report,
                                         RunStats)
from streamgraph.runtime.scheduler import TIME_EPS, Decision, Scheduler


def check_time(name: str, value) -> float:
    """``value`` as a finite number of stream seconds >= 0; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return v


def check_question(text, max_new_tokens) -> None:
    """Validate a question's text (a non-empty string) and ``max_new_tokens`` (None for the
    graph's default, else an int >= 1: asking for 0 tokens is refused, not read as
    "default"). Raises ValueError."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a question must be a non-empty string, got {text!r}")
    if max_new_tokens is not None:
        try:
            if isinstance(max_new_tokens, bool):
                raise TypeError
            n = operator.index(max_new_tokens)
        except TypeError:
            n = 0
        if n < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1 (None = the graph's default), "
                             f"got {max_new_tokens!r}")


def error_text(e: BaseException) -> str:
    """``Type: message`` on one line (``interrupted`` for Ctrl-C)."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class StreamBase(ABC):
    """Record keeping for one stream; subclasses implement :meth:`execute_frame` and ``ask``.

    ``history`` (>= 1) is how many records of each kind stay in memory (``frames``,
    ``questions``: deques, oldest first); the summary covers every record."""

    def __init__(self, scheduler: Scheduler, clock: Clock, history: int = DEFAULT_HISTORY):
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        self.scheduler = scheduler
        self.clock = clock
        self.history = history
        self.frames: deque[FrameRecord] = deque(maxlen=history)
        self.questions: deque[QuestionRecord] = deque(maxlen=history)
        self.stats = RunStats()
        self.records: RecordWriter | None = None
        self.stage: str | None = None       # stage being executed (names a failed stage)
        self._frame_count = 0

    # -- to implement ------------------------------------------------------------------
    @abstractmethod
    def execute_frame(self, image, budget: int | None = None) -> tuple[dict[str, float], int, dict]:
        """Run one frame at token budget ``budget`` (None = full); return seconds per stage,
        the number of tokens written to the KV cache, and extra record fields (``budget``
        actually used, ``encoder`` path). Does not touch the clock. Sets :attr:`stage` to the
        stage it is in. Raises NonFiniteError (nothing committed) for a NaN/Inf output."""

    @property
    @abstractmethod
    def slots_in_use(self) -> int:
        """KV slots holding tokens now."""

    @property
    def kv_bytes(self) -> int:
        return 0

    # -- records -----------------------------------------------------------------------
    def write_records(self, path: str | Path) -> RecordWriter:
        """Append every record finished from now on to the JSON Lines file ``path``
        (truncated first), one line each, flushed per line. Raises ReportError when the file
        cannot be created."""
        self.close_records()
        self.records = RecordWriter(path)
        return self.records

    def close_records(self) -> None:
        if self.records is not None:
            self.records.close()

    def _finish_frame(self, rec: FrameRecord) -> None:
        self.frames.append(rec)
        self.stats.add_frame(rec)
        if self.records is not None:
            self.records.write("frame", rec)

    def _begin_question(self, rec: QuestionRecord) -> None:
        """A question starts: its record joins the window (filled in as it is answered)."""
        self.questions.append(rec)

    def _finish_question(self, rec: QuestionRecord, error: BaseException | None = None) -> None:
        """A question ended (answered, failed with ``error``, or abandoned)."""
        if error is not None and not rec.error:
            rec.error = error_text(error)
        self.stats.add_question(rec)
        if self.records is not None:
            self.records.write("question", rec)

    def record_drop(self, capture: float, decision: Decision, queue_len: int = 0) -> FrameRecord:
        """Record a dropped frame."""
        rec = FrameRecord(index=self._frame_count, capture=capture, deadline=decision.deadline,
                          decision="drop", reason=decision.reason, overran="queue",
                          slots_in_use=self.slots_in_use, queue_len=queue_len)
        self._frame_count += 1
        self._finish_frame(rec)
        return rec

    def _fail_frame(self, rec: FrameRecord, e: BaseException, t0: float) -> None:
        self.clock.spend(max(0.0, time.perf_counter() - t0))   # the executor was busy meanwhile
        rec.decision, rec.reason = "error", error_text(e)
        rec.error_type = type(e).__name__
        rec.failed_stage = self.stage
        rec.end = self.clock.now()
        rec.slots_in_use = self.slots_in_use

    def run_decided(self, image, capture: float, decision: Decision, queue_len: int = 0) -> FrameRecord:
        """Execute a frame the scheduler decided to run, advance the clock by its cost,
        update the cost model and record it. A NonFiniteError leaves an ``error`` record
        (nothing committed) and returns it; any other exception leaves an ``error`` record
        and is raised."""
        start = self.clock.now()
        rec = FrameRecord(index=self._frame_count, capture=capture, deadline=decision.deadline,
                          decision="run", reason=decision.reason, start=start, queue_len=queue_len,
                          budget=decision.budget or 0)
        self._frame_count += 1
        predicted = self.scheduler.costs.predict_stages(decision.budget)
        self.stage = None
        t0 = time.perf_counter()
        try:
            stage_s, n_valid, extra = self.execute_frame(image, decision.budget)
        except NonFiniteError as e:          # documented action: drop the frame, go on
            self._fail_frame(rec, e, t0)
            self._finish_frame(rec)
            return rec
        except BaseException as e:
            self._fail_frame(rec, e, t0)
            try:
                self._finish_frame(rec)
            except ReportError:
                pass                          # the writer keeps its error; the first error wins
            raise
        finally:
            self.stage = None
        self.clock.spend(sum(stage_s.values()))
        for s, v in stage_s.items():
            self.scheduler.costs.update(s, v, decision.budget)
        rec.end = self.clock.now()
        rec.stage_ms = {s: 1000.0 * v for s, v in stage_s.items()}
        rec.tokens_kept = n_valid
        rec.budget = extra.get("budget", rec.budget)
        rec.encoder = extra.get("encoder", rec.encoder)
        rec.slots_in_use = self.slots_in_use
        rec.deadline_met = rec.end <= rec.deadline + TIME_EPS
        if not rec.deadline_met:
            rec.overran = self.scheduler.overrunning_stage(stage_s, predicted, start, rec.deadline)
        self._finish_frame(rec)
        return rec

    def push_frame(self, frame, timestamp: float | None = None, *, budget: int | None = None) -> FrameRecord:
        """Single-frame path: wait for the frame's capture time, decide, run or drop.

        ``frame`` is a :class:`~streamgraph.runtime.sources.Frame` or an ``[H,W,3]`` uint8
        RGB array. Its capture time (stream seconds) is ``timestamp`` when given (it
        overrides a Frame's own timestamp), else the Frame's timestamp, else (a bare array)
        the clock's current time. Raises ValueError for a timestamp that is not a finite
        number >= 0. Policies that need a queue of pending frames (``latest_only``, EDF
        across streams) need :class:`~streamgraph.runtime.runner.StreamRunner`; here each
        frame is decided alone. A given ``budget`` overrides the policy's choice of bucket
        (the frame can still be dropped)."""
        image = getattr(frame, "image", frame)
        if timestamp is None:
            timestamp = getattr(frame, "timestamp", None)
        capture = self.clock.now() if timestamp is None else check_time("timestamp", timestamp)
        self.clock.wait_until(capture)
        decision = self.scheduler.decide(capture, self.clock.now())
        if budget is not None and decision.action == "run":
            decision.budget = budget
        if decision.action == "drop":
            return self.record_drop(capture, decision)
        return self.run_decided(image, capture, decision)

    def report_meta(self) -> dict:
        return {"overload": self.scheduler.overload, "frame_deadline_ms": self.scheduler.frame_deadline * 1000.0,
                "ttft_ms": self.scheduler.ttft * 1000.0, "budgets": self.scheduler.budgets,
                "clock": type(self.clock).__name__}

    def report(self) -> Report:
        """Summary of everything this stream did so far, with its most recent records (the
        window). Costs O(history), whatever the length of the stream."""
        w = self.records
        records = {"history": self.history, "frames_total": self.stats.sampled,
                   "questions_total": self.stats.questions,
                   "frames_in_report": len(self.frames), "questions_in_report": len(self.questions),
                   "jsonl": str(w.path) if w is not None else None,
                   "jsonl_frames": w.frames if w is not None else 0,
                   "jsonl_questions": w.questions if w is not None else 0,
                   "jsonl_error": w.error if w is not None else None}
        return Report(self.report_meta(), list(self.frames), list(self.questions),
                      self.stats.summary(self.kv_bytes), records)
