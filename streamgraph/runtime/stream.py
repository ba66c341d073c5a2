"""The stream: records, clock, per-frame bookkeeping, the scheduler's decision per frame, the runner.

Every stream executor (:class:`~streamgraph.runtime.session.Session`: real engines through
:class:`~streamgraph.runtime.pipeline.FramePipeline`; :class:`~streamgraph.runtime.simulate.SimulatedSession`:
given stage costs on a virtual clock) is a :class:`StreamBase` over an :class:`Executor`, so
the runner and the scheduler treat them alike. Everything a frame or a question does besides
its engine work lives here, so one frame's bookkeeping enters this file only:

* clocks in stream time (:class:`SimulatedClock`, :class:`WallClock`);
* the single-frame path (:meth:`StreamBase.push_frame`: wait for the capture time, decide with
  the :class:`~streamgraph.runtime.scheduler.Scheduler`, run or drop) and the question entry
  (:meth:`StreamBase.ask`);
* records: a finished record updates the running aggregates (:class:`RunStats`: counts and
  streaming latency distributions, DDSketch), joins the in-memory window (``frames`` /
  ``questions``: the most recent ``history`` of each) and, after
  :meth:`StreamBase.write_records`, is appended to a JSON Lines file at once
  (:class:`RecordWriter`). Memory and the cost of :meth:`StreamBase.report` do not grow with
  the length of the stream. The record types and the report are
  :mod:`streamgraph.runtime.metrics` (entered at report time only).

A frame whose engine output holds NaN/Inf (:class:`~streamgraph.errors.NonFiniteError`) is
not committed (the KV cache, the cache policy and the reducer state stay as they were): it
becomes an ``error`` record naming the failed stage, the summary counts it (``nonfinite``),
and the stream goes on as if the frame had been dropped. Any other error also leaves an
``error`` record and is raised.

Several streams on one executor: :class:`StreamRunner`
--------------------------------------------------------
The runner's loop is the streams' bookkeeping across streams (pending queues, questions,
sources), so it lives here too: one frame from a source to its record enters this file, the
scheduler, the pipeline, the decoder, the KV policy and the backend.

StreamRunner: one executor shared by several streams, earliest deadline first.

The runner owns the pending queues. Whenever the executor is free at stream time ``now``:

1. frames whose capture time has come are moved into their stream's pending queue;
2. due questions are served first (earliest TTFT deadline first), ahead of pending frames;
3. each stream's overload policy prunes its queue (drops are recorded with a reason);
4. among the streams' oldest pending frames, :class:`~streamgraph.runtime.scheduler.FairEDF`
   picks one: the earliest deadline (EDF) while every head can meet its deadline; when not,
   the stream that kept the smallest share of its recent frames among those that can (no
   stream starves under overload);
   it runs at the budget its policy chooses (``degrade`` counts every stream's pending frames
   as its backlog), or is dropped.

Frames that arrive while an answer is being generated wait in their queue and are then
handled by their policy like any others. With a
:class:`~streamgraph.runtime.stream.SimulatedClock` the run is "as fast as possible with
deadlines in stream time" (deterministic with :class:`~streamgraph.runtime.simulate.SimulatedSession`);
with a :class:`~streamgraph.runtime.stream.WallClock` frames are delivered at their capture
times (real time). Frames are decoded lazily, when their capture time has come.

Live use (docs/live.md, "Live API"):

* :meth:`StreamRunner.ask` may be called from any thread while :meth:`StreamRunner.run`
  runs in another: the question joins a thread-safe queue, arrives at the clock's current
  time and is served as soon as the executor is free — after the frame in progress (never in
  the middle of a frame's prefill), ahead of every pending frame — with deadline ``arrival +
  slo.ttft_ms`` for its first token (its record holds ``ttft_ms`` and ``ttft_met``). The
  returned :class:`Answer` (a :class:`concurrent.futures.Future`) streams the text pieces as
  they are decoded: iterate it, or pass ``on_piece``/``on_done`` callbacks.
* A source with a true ``live`` attribute (a camera, a network stream, a pipe) never makes
  the executor wait: one that holds its newest frame (``latest()``,
  :class:`~streamgraph.runtime.live.LiveSource`) is polled when the executor is free, any
  other is read by a thread of its own. Capture times are on the runner's clock, and at most
  ``max_live_backlog`` frames (default 1: the newest) wait; an older one is dropped with a
  record. When a source is live and every session was opened without a clock, the runner
  runs them on one :class:`~streamgraph.runtime.stream.WallClock`, and it calibrates
  (:meth:`Session.calibrate <streamgraph.runtime.session.Session.calibrate>`) the sessions
  whose cost model is still empty, once per shared backend.
* A wall-clock runner waiting for the next frame wakes at once for a question (or a live
  frame, or :meth:`StreamRunner.stop`).
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import math
import operator
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from ddsketch import LogCollapsingLowestDenseDDSketch

from streamgraph.errors import NonFiniteError, ReportError, SourceError, StreamClosedError, StreamgraphError
from streamgraph.runtime.metrics import (DEFAULT_HISTORY, SKETCH_ACCURACY, SKETCH_BINS, FrameRecord, QuestionRecord,
                                         Report)
from streamgraph.runtime.scheduler import TIME_EPS, CostModel, Decision, FairEDF, Scheduler


# ---------------------------------------------------------------------- clocks
class Clock(ABC):
    @abstractmethod
    def now(self) -> float:
        """Current stream time in seconds."""

    @abstractmethod
    def wait_until(self, t: float) -> None:
        """Block (or jump) until stream time ``t``; no-op when ``t`` has passed."""

    @abstractmethod
    def spend(self, seconds: float) -> None:
        """Account ``seconds`` of work that was just done (measured with ``perf_counter``)."""


class SimulatedClock(Clock):
    """Virtual stream clock advanced only by :meth:`wait_until` and :meth:`spend`."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def wait_until(self, t: float) -> None:
        self._now = max(self._now, float(t))

    def spend(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot spend negative time ({seconds} s)")
        self._now += float(seconds)


class WallClock(Clock):
    """Real time since construction (``time.perf_counter``)."""

    def __init__(self):
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    def spend(self, seconds: float) -> None:
        pass  # the time has already passed


# ---------------------------------------------------------------------- records
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
            self.e2e.add(1000.0 * (rec.end - rec.capture))      # rec.latency_ms, inlined
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
        # a record's __dict__ holds its fields in declaration order: the same object as
        # metrics.record_dict, without a call into that module per frame
        line = json.dumps({"kind": kind, **rec.__dict__}, separators=(",", ":")) + "\n"
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


# ---------------------------------------------------------------------- the stream
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


class Executor(Protocol):
    """What runs a stream's frames and questions; :class:`StreamBase` does the rest.

    Implemented by :class:`~streamgraph.runtime.pipeline.FramePipeline` (the real engines:
    preprocess -> encode -> reduce -> prefill, and the decoder for answers) and by
    :class:`~streamgraph.runtime.simulate.SimulatedSession` (given stage costs). None of its
    methods touches the clock except :meth:`answer`, which accounts its own time on the
    ``clock`` it is given.
    """

    #: the stage being executed (``preprocess``/``encode``/``reduce``/``prefill``; None
    #: between frames): names the failed stage of an error record
    stage: str | None
    #: the token budget buckets a frame can run at, ascending
    budgets: list

    @property
    def slots_in_use(self) -> int:
        """KV slots holding tokens now."""

    @property
    def kv_bytes(self) -> int:
        """Bytes of the stream's KV buffer (0 without one)."""

    def begin_frame(self, budget: int | None) -> int | None:
        """Called first by :meth:`StreamBase.push_frame`, before the frame is decided: returns
        the token budget to force (``budget`` checked; None = the policy's choice) and may
        finish pending work (the session closes an open answer turn). Raises ValueError for a
        budget that is not a compiled bucket."""

    def execute_frame(self, image, budget: int | None = None) -> tuple[dict[str, float], int, dict]:
        """Run one frame at token budget ``budget`` (None = full); return seconds per stage,
        the number of tokens written to the KV cache, and extra record fields (``budget``
        actually used, ``encoder`` path). Does not touch the clock. Sets :attr:`stage` to the
        stage it is in. Raises NonFiniteError (nothing committed) for a NaN/Inf output."""

    def answer(self, rec: QuestionRecord, max_new_tokens: int | None, clock: Clock) -> Iterator[str]:
        """Answer the question of ``rec`` (text, ``asked_at``, deadline): a generator of its
        text pieces. Waits on ``clock`` for ``asked_at``, spends the work on it, and fills in
        ``rec`` (prompt tokens, ``ttft_ms``/``ttft_met`` from arrival, decode times, answer, and
        ``slots_in_use`` when the answer is complete)."""

    def calibrate_costs(self, costs: CostModel, repeats: int) -> None:
        """Measure (or give) every stage's cost at every budget without touching the stream's
        state, and :meth:`CostModel.set` them into ``costs`` (seconds)."""


class StreamBase(ABC):
    """Record keeping for one stream over an :class:`Executor` (``executor``; None: the
    stream itself implements the protocol, as :class:`~streamgraph.runtime.simulate.SimulatedSession`).

    ``history`` (>= 1) is how many records of each kind stay in memory (``frames``,
    ``questions``: deques, oldest first); the summary covers every record."""

    def __init__(self, scheduler: Scheduler, clock: Clock, history: int = DEFAULT_HISTORY,
                 executor: Executor | None = None):
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        self.scheduler = scheduler
        self.clock = clock
        self.history = history
        self.executor: Executor = self if executor is None else executor
        self.frames: deque[FrameRecord] = deque(maxlen=history)
        self.questions: deque[QuestionRecord] = deque(maxlen=history)
        self.stats = RunStats()
        self.records: RecordWriter | None = None
        if executor is None:
            self.stage: str | None = None       # stage being executed (names a failed stage)
        self._frame_count = 0

    @property
    def slots_in_use(self) -> int:
        """KV slots holding tokens now."""
        return self.executor.slots_in_use

    @property
    def kv_bytes(self) -> int:
        return self.executor.kv_bytes

    def calibrate(self, repeats: int = 2) -> dict[str, float]:
        """Seed the scheduler's cost model from the executor (a real session measures every
        stage at every budget bucket on a blank frame, ``repeats`` times after a warm-up,
        without touching its KV cache or encoder/reducer state; a simulated one gives its
        costs). Returns the model's predictions (seconds)."""
        self.executor.calibrate_costs(self.scheduler.costs, repeats)
        return dict(self.scheduler.costs.mean)

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
                          slots_in_use=self.executor.slots_in_use, queue_len=queue_len)
        self._frame_count += 1
        self._finish_frame(rec)
        return rec

    def _fail_frame(self, rec: FrameRecord, e: BaseException, t0: float) -> None:
        self.clock.spend(max(0.0, time.perf_counter() - t0))   # the executor was busy meanwhile
        rec.decision, rec.reason = "error", error_text(e)
        rec.error_type = type(e).__name__
        rec.failed_stage = self.executor.stage
        rec.end = self.clock.now()
        rec.slots_in_use = self.executor.slots_in_use

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
        costs = self.scheduler.costs
        predicted = costs.predict_stages(decision.budget)
        ex = self.executor
        ex.stage = None
        t0 = time.perf_counter()
        try:
            stage_s, n_valid, extra = ex.execute_frame(image, decision.budget)
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
            ex.stage = None
        self.clock.spend(sum(stage_s.values()))
        for s, v in stage_s.items():
            costs.update(s, v, decision.budget)
        rec.end = self.clock.now()
        rec.stage_ms = {s: 1000.0 * v for s, v in stage_s.items()}
        rec.tokens_kept = n_valid
        rec.budget = extra.get("budget", rec.budget)
        rec.encoder = extra.get("encoder", rec.encoder)
        rec.slots_in_use = ex.slots_in_use
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
        across streams) need :class:`~streamgraph.runtime.stream.StreamRunner`; here each
        frame is decided alone. A given ``budget`` overrides the policy's choice of bucket
        (the frame can still be dropped); ValueError when it is not a compiled bucket."""
        budget = self.executor.begin_frame(budget)
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

    # -- questions ---------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int | None = None, at: float | None = None) -> Iterator[str]:
        """Ask about the stream so far; returns a generator of the answer's text pieces as
        they are decoded, at most ``max_new_tokens`` tokens (None: the executor's default).
        ``at`` is the stream time (s) the question arrives (default: now). It is served at
        once, ahead of any later frame, with deadline ``arrival + slo.ttft_ms`` for its first
        token; its record is in ``self.questions``.

        Raises ValueError at once for an empty question, ``max_new_tokens`` < 1 (0 is refused,
        not read as the default) or an ``at`` that is not a finite number >= 0. While
        answering, an engine error (:class:`~streamgraph.errors.EngineError`, or
        :class:`~streamgraph.errors.NonFiniteError` for a NaN/Inf output; the step is not
        committed) is raised with its ``Type: message`` kept in the record's ``error``."""
        check_question(question, max_new_tokens)
        asked = self.clock.now() if at is None else check_time("at", at)
        rec = QuestionRecord(text=question, asked_at=asked, deadline=asked + self.scheduler.ttft)
        return self._ask(rec, max_new_tokens)

    def _ask(self, rec: QuestionRecord, max_new_tokens: int | None) -> Iterator[str]:
        """Runs the executor's answer; the record is finished however it ends (an answer
        abandoned by the caller keeps what was decoded, without an error)."""
        self._begin_question(rec)
        try:
            yield from self.executor.answer(rec, max_new_tokens, self.clock)
        except GeneratorExit:
            rec.slots_in_use = self.executor.slots_in_use
            self._finish_question(rec)
            raise
        except BaseException as e:
            rec.slots_in_use = self.executor.slots_in_use
            try:
                self._finish_question(rec, e)
            except ReportError:
                pass                       # the writer keeps its error; the first error wins
            raise
        self._finish_question(rec)            # the executor set slots_in_use when the answer ended

    # -- report ------------------------------------------------------------------------
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


# ---------------------------------------------------------------------- several streams: the runner
log = logging.getLogger(__name__)

#: Frames of a live source that may wait for the executor (per stream) by default: the newest.
DEFAULT_LIVE_BACKLOG = 1
#: How often (s) a runner with nothing to do polls its live sources that hold the newest frame.
LIVE_POLL_S = 0.005
_SUPERSEDED = "superseded by a newer live frame"


@dataclass
class Question:
    """A question arriving at stream time ``at`` (seconds, finite, >= 0) for stream
    ``stream``, answered with at most ``max_new_tokens`` tokens (None: the graph's default;
    otherwise >= 1). ``answer`` and ``error`` (``Type: message`` of a failed question) are
    filled in when it is served; ``handle`` is the :class:`Answer` of a question asked with
    :meth:`StreamRunner.ask`. Raises ValueError for an empty text, a bad ``at`` or
    ``max_new_tokens``."""

    at: float
    text: str
    stream: int = 0
    max_new_tokens: int | None = None
    answer: str = field(default="", compare=False)
    error: str = field(default="", compare=False)
    handle: "Answer | None" = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        self.at = check_time("question time", self.at)
        check_question(self.text, self.max_new_tokens)
        try:
            if isinstance(self.stream, bool):
                raise TypeError
            self.stream = operator.index(self.stream)
        except TypeError:
            raise ValueError(f"question stream must be an integer index, got {self.stream!r}") from None


class Answer(concurrent.futures.Future):
    """The answer to a question asked with :meth:`StreamRunner.ask`, streamed as it is decoded.

    A :class:`concurrent.futures.Future` whose result is the whole answer (``str``), so
    ``result(timeout)``, ``exception()``, ``add_done_callback``, ``concurrent.futures.wait``
    and ``asyncio.wrap_future`` work as usual. Besides:

    * iterating yields the answer's text pieces as they are decoded (blocking for the next
      one); at the end it raises the question's error, if any (see :meth:`result`);
    * :meth:`wait` ``(timeout)`` -> whether it finished in time; :attr:`text` is the answer so
      far; :attr:`record` is the question's
      :class:`~streamgraph.runtime.metrics.QuestionRecord` once it is being answered
      (``ttft_ms`` from arrival, waiting included; ``ttft_met`` against ``arrival +
      slo.ttft_ms``);
    * :meth:`cancel` withdraws a question not yet being answered (Future semantics);
      :meth:`stop` ends one being answered after the token in progress (the answer so far is
      the result).

    ``result()`` raises :class:`~streamgraph.errors.NonFiniteError` /
    :class:`~streamgraph.errors.EngineError` when an engine failed while answering,
    :class:`~streamgraph.errors.StreamClosedError` when the runner stopped before answering
    it, :class:`concurrent.futures.CancelledError` after :meth:`cancel`, ``TimeoutError``
    when ``timeout`` passed."""

    def __init__(self, question: Question, on_piece: Callable[[str], None] | None = None):
        super().__init__()
        self.question = question
        self.record = None
        self.callback_error: str | None = None     # ``Type: message`` of a failed on_piece call
        self._pieces: list[str] = []
        self._ended = False
        self._stop = False
        self._on_piece = on_piece
        self._cond = threading.Condition()

    # -- caller side -------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The answer decoded so far."""
        with self._cond:
            return "".join(self._pieces)

    @property
    def ttft_ms(self) -> float | None:
        """Time to first token (ms, from arrival), None until it is known."""
        return None if self.record is None else self.record.ttft_ms

    @property
    def ttft_met(self) -> bool | None:
        """Whether the first token came by ``arrival + slo.ttft_ms`` (None until known)."""
        return None if self.record is None else self.record.ttft_met

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the answer is complete (or failed, or cancelled), at most ``timeout``
        seconds; returns whether it is."""
        done, _ = concurrent.futures.wait([self], timeout=timeout)
        return bool(done)

    def __iter__(self) -> Iterator[str]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._pieces) and not self._ended:
                    self._cond.wait()
                if i >= len(self._pieces):
                    break
                piece = self._pieces[i]
            i += 1
            yield piece
        self.result()          # raises the question's error, if it failed

    def cancel(self) -> bool:
        """Withdraw the question if it is not being answered yet; returns whether it was."""
        ok = super().cancel()
        if ok:
            self._end()
        return ok

    def stop(self) -> None:
        """Stop decoding after the token in progress; the answer so far becomes the result
        (a question not yet served is answered with its first piece only)."""
        self._stop = True

    # -- runner side -------------------------------------------------------------------
    def _piece(self, piece: str) -> None:
        with self._cond:
            self._pieces.append(piece)
            self._cond.notify_all()
        if self._on_piece is not None:
            try:
                self._on_piece(piece)
            except Exception as e:        # a caller's bug must not stop the other streams
                if self.callback_error is None:
                    self.callback_error = error_text(e)
                    log.warning("on_piece callback of question %r failed: %s", self.question.text,
                                self.callback_error)

    def _end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def _finish(self, error: BaseException | None = None) -> None:
        self._end()
        try:
            if error is None:
                self.set_result(self.text)
            else:
                self.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass                  # cancelled meanwhile (a question never served)


class _Feeder:
    """Lookahead over a frame iterator: hands out ``(capture, frame)`` for frames whose
    capture time has come. Raises SourceError for a frame whose timestamp is not a finite
    number >= 0 (a stream could never reach it)."""

    live = False

    def __init__(self, frames: Iterable, speed: float = 1.0, stream: int = 0):
        self._it: Iterator = iter(frames)
        self._next = None
        self.speed = _check_speed(speed)
        self.stream = stream
        self.done = False
        self.count = 0
        self._advance()

    def _advance(self) -> None:
        try:
            self._next = next(self._it)
        except StopIteration:
            self._next, self.done = None, True
            return
        ts = getattr(self._next, "timestamp", None)
        try:
            ok = ts is not None and not isinstance(ts, bool) and math.isfinite(float(ts) / self.speed) and ts >= 0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise SourceError(f"stream {self.stream}: frame {self.count} has timestamp {ts!r}; frame "
                              f"timestamps must be finite numbers of seconds >= 0")
        self.count += 1

    def capture(self, frame) -> float:
        return float(frame.timestamp) / self.speed

    def next_arrival(self) -> float | None:
        return None if self._next is None else self.capture(self._next)

    def pop_arrived(self, now: float) -> list:
        out = []
        while self._next is not None and self.capture(self._next) <= now:
            out.append((self.capture(self._next), self._next))
            self._advance()
        return out

    def take_overflow(self) -> list:
        return []

    @property
    def finished(self) -> bool:
        return self.done


def _check_speed(speed) -> float:
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) or speed <= 0:
        raise ValueError(f"speed must be a finite number > 0, got {speed!r}")
    return float(speed)


class _LiveFeeder:
    """A live source: the executor never waits on it.

    A source with a ``latest(timeout)`` method (:class:`~streamgraph.runtime.live.LiveSource`,
    whose capture thread holds only the newest frame) is polled: each step takes the newest
    frame decoded since the last one, if any. Its ``clock`` is set to the runner's (before it
    starts), so its capture timestamps are in the runner's stream time; otherwise a frame is
    stamped with the runner clock's time when it is taken. Any other live iterable is read by
    a thread of its own that stamps each frame with the runner clock's time as it arrives.
    At most ``backlog`` frames of the stream wait for the executor (the runner drops older
    ones, with a record, when newer ones arrive). An error of the source is raised by
    :meth:`pop_arrived` once the frames before it were handed out."""

    live = True

    def __init__(self, frames: Iterable, stream: int, runner: "StreamRunner", backlog: int):
        self._frames = frames
        self.stream = stream
        self._runner = runner
        self.backlog = backlog
        self.poll = callable(getattr(frames, "latest", None))
        self._stamped = False                # poll mode: the source stamps frames on the runner clock
        self.inbox: deque = deque()          # thread mode: (capture, frame), guarded by runner._cond
        self.overflow: list[float] = []      # thread mode: capture times pushed out of the inbox
        self.done = False                    # the source ended (or failed)
        self.error: BaseException | None = None
        self.count = 0
        self.thread = None if self.poll else threading.Thread(
            target=self._pump, daemon=True, name=f"streamgraph-live-source-{stream}")

    def start(self) -> None:
        if self.poll:
            src, clock = self._frames, self._runner.clock
            if (hasattr(src, "clock") and not getattr(src, "running", False)
                    and not isinstance(clock, SimulatedClock)):
                src.clock = clock
            self._stamped = getattr(src, "clock", None) is clock
        else:
            self.thread.start()

    def close(self) -> None:
        """Stop a polled source's capture (the runner started it)."""
        close = getattr(self._frames, "close", None) if self.poll else None
        if close is not None:
            try:
                close(timeout=2.0)
            except TypeError:
                close()

    def _pump(self) -> None:
        cond, clock = self._runner._cond, self._runner.clock
        try:
            for frame in self._frames:
                with cond:
                    if self._runner._stopped:
                        return
                    self.inbox.append((clock.now(), frame))
                    self.count += 1
                    while len(self.inbox) > self.backlog:
                        self.overflow.append(self.inbox.popleft()[0])
                    cond.notify_all()
        except BaseException as e:           # reported by the runner's thread
            self.error = e
        finally:
            with cond:
                self.done = True
                cond.notify_all()

    def next_arrival(self) -> float | None:
        return None

    def _raise(self, error: BaseException):
        if isinstance(error, StreamgraphError) or not isinstance(error, Exception):
            raise error
        raise SourceError(f"stream {self.stream}: live source failed: {error_text(error)}") from error

    def pop_arrived(self, now: float) -> list:
        if self.poll:
            limit = getattr(self._frames, "max_frames", None)
            if limit is not None and self.count >= limit:
                self.done = True                     # the source's max_frames: as its iteration would
            if self.done:
                return []
            try:
                frame = self._frames.latest(0)
            except Exception as e:
                self.done = True
                self._raise(e)
            if frame is None:
                self.done = bool(getattr(self._frames, "ended", False))
                return []
            self.count += 1
            capture = float(frame.timestamp) if self._stamped else now
            return [(min(capture, now), frame)]
        with self._runner._cond:
            out = list(self.inbox)
            self.inbox.clear()
            error = self.error if self.done and not out else None
            if error is not None:
                self.error = None
        if error is not None:
            self._raise(error)
        return out

    def take_overflow(self) -> list:
        if self.poll:
            return []
        with self._runner._cond:
            out, self.overflow = self.overflow, []
        return out

    def has_news(self) -> bool:
        """Thread mode: frames or an error wait (call with runner._cond held)."""
        return bool(self.inbox or self.overflow or (self.done and self.error))

    @property
    def finished(self) -> bool:
        """The source ended and every frame it gave was handed out."""
        return self.done and not self.inbox and not self.overflow


class StreamRunner:
    """Run ``streams`` (pairs of a :class:`StreamBase` session and an iterable of frames)
    on one executor, in the calling thread (:meth:`run` or repeated :meth:`step`).

    ``speed`` > 1 replays sources faster than captured (capture times divided by it), to
    offer a chosen load. ``on_frame(stream, record)`` and ``on_answer(question, record)``
    are called as things happen (progress displays), in the runner's thread.

    ``clock``: None = the sessions' shared clock; when every session was opened without a
    clock, one :class:`~streamgraph.runtime.stream.WallClock` if any source is live (has a true
    ``live`` attribute), else one :class:`~streamgraph.runtime.stream.SimulatedClock`. A
    given clock is installed on every session. ``calibrate``: None = calibrate the sessions
    whose cost model is empty when any source is live (once per shared backend; the others
    get a copy), True = always those, False = never. The wall clock starts after the
    calibration.

    ``keep_open``: keep serving :meth:`ask` after every source ended, until :meth:`stop`
    (otherwise :meth:`run` returns when the sources and the questions are done).
    ``max_live_backlog`` (>= 1): frames of a live source that may wait for the executor.

    Raises ValueError when the sessions do not share a clock (and it cannot choose one), for
    a question of a stream that does not exist, a bad ``speed`` or ``max_live_backlog``."""

    def __init__(self, streams: list[tuple[StreamBase, Iterable]], questions: list[Question] | None = None,
                 speed: float = 1.0, on_frame: Callable | None = None, on_answer: Callable | None = None, *,
                 clock: Clock | None = None, calibrate: bool | None = None, keep_open: bool = False,
                 max_live_backlog: int = DEFAULT_LIVE_BACKLOG):
        if not streams:
            raise ValueError("StreamRunner needs at least one stream")
        if isinstance(max_live_backlog, bool) or not isinstance(max_live_backlog, int) or max_live_backlog < 1:
            raise ValueError(f"max_live_backlog must be an integer >= 1, got {max_live_backlog!r}")
        _check_speed(speed)
        self.sessions = [s for s, _ in streams]
        live = [bool(getattr(f, "live", False)) for _, f in streams]
        self.live = any(live)
        defaults = all(getattr(s, "clock_default", False) for s in self.sessions)
        if calibrate is None:
            calibrate = self.live
        if calibrate:
            self._calibrate()
        if clock is None and defaults and (self.live or len({id(s.clock) for s in self.sessions}) > 1):
            clock = WallClock() if self.live else SimulatedClock()   # a wall clock starts now
        if clock is not None:
            for s in self.sessions:
                s.clock = clock
        self.clock = self.sessions[0].clock
        if any(s.clock is not self.clock for s in self.sessions):
            raise ValueError("all sessions of a StreamRunner must share one clock")
        self._cond = threading.Condition()
        self._asked: list[Question] = []             # asked from other threads, not yet seen
        self._stopped = False
        self._closed = False
        self.keep_open = bool(keep_open)
        self.feeders = [_LiveFeeder(f, i, self, max_live_backlog) if is_live else _Feeder(f, speed, i)
                        for i, ((_, f), is_live) in enumerate(zip(streams, live))]
        self.pending: list[deque] = [deque() for _ in streams]     # (capture, frame), arrival order
        self.questions = sorted(questions or [], key=lambda q: q.at)
        for q in self.questions:
            self._check_stream(q.stream)
        self.on_frame, self.on_answer = on_frame, on_answer
        self.max_queue = [0] * len(streams)
        self.order: list[tuple[int, int]] = []        # (stream, frame index) in execution order
        self.history = max(s.history for s in self.sessions)   # `order` keeps about this many
        self.picker = FairEDF(len(streams))
        self._started = self._feeders_closed = False

    def _check_stream(self, stream: int) -> None:
        if not 0 <= stream < len(self.sessions):
            raise ValueError(f"question for stream {stream}, but there are {len(self.sessions)} streams")

    def _calibrate(self) -> None:
        """Calibrate sessions with an empty cost model, once per shared backend."""
        done: dict[int, object] = {}
        for s in self.sessions:
            if s.scheduler.costs.mean or not hasattr(s, "calibrate"):
                continue
            key = id(getattr(s.backend, "backend", s.backend))
            if key in done:
                s.scheduler.costs = copy.deepcopy(done[key])
            else:
                s.calibrate()
                done[key] = s.scheduler.costs

    @property
    def sources_ended(self) -> bool:
        """Every source has ended and each frame it gave was run or dropped (safe to read
        from any thread; with ``keep_open`` the runner still answers questions)."""
        return all(f.finished for f in self.feeders) and not any(self.pending)

    # ------------------------------------------------------------------ live questions
    def ask(self, text: str, stream: int = 0, *, max_new_tokens: int | None = None,
            on_piece: Callable[[str], None] | None = None,
            on_done: Callable[["Answer"], None] | None = None) -> Answer:
        """Ask about ``stream`` (index into the runner's streams) from any thread; returns
        its :class:`Answer` at once. The question arrives now (the runner clock's time) and is
        served when the executor is next free, ahead of pending frames, with deadline
        ``arrival + slo.ttft_ms`` for its first token. ``on_piece(text_piece)`` is called for
        each piece as it is decoded and ``on_done(answer)`` when it ends (answered, failed or
        cancelled), both in the runner's thread (keep them short; an exception in them is
        logged, not raised).

        Raises ValueError at once for an empty question, ``max_new_tokens`` < 1 or an unknown
        stream, and :class:`~streamgraph.errors.StreamClosedError` when the runner has
        stopped."""
        check_question(text, max_new_tokens)
        try:
            if isinstance(stream, bool):
                raise TypeError
            stream = operator.index(stream)
        except TypeError:
            raise ValueError(f"question stream must be an integer index, got {stream!r}") from None
        self._check_stream(stream)
        with self._cond:
            if self._closed or self._stopped:
                raise StreamClosedError(f"stream {stream}: the runner has stopped; question {text!r} "
                                        f"cannot be answered")
            q = Question(at=max(0.0, self.clock.now()), text=text, stream=stream, max_new_tokens=max_new_tokens)
            q.handle = Answer(q, on_piece)
            if on_done is not None:
                q.handle.add_done_callback(on_done)
            self._asked.append(q)
            self._cond.notify_all()
        return q.handle

    def stop(self) -> None:
        """Ask the runner to stop (from any thread): :meth:`run` returns after the frame or
        answer token in progress; questions not answered yet fail with
        :class:`~streamgraph.errors.StreamClosedError`."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        """Stop accepting questions and fail those not answered yet (with
        StreamClosedError, naming ``error`` when the run ended on one). Idempotent."""
        with self._cond:
            self._closed = self._stopped = True
            waiting = self._asked + [q for q in self.questions if q.handle is not None]
            self._asked = []
            self._cond.notify_all()
        if self._started and not self._feeders_closed:
            self._feeders_closed = True
            for f in self.feeders:
                if f.live:
                    f.close()
        why = f"the run ended on {error_text(error)}" if error is not None else "the runner stopped"
        for q in waiting:
            q.handle._finish(StreamClosedError(f"stream {q.stream}: {why} before question {q.text!r} was answered"))

    # ------------------------------------------------------------------ serving
    def _serve_question(self, q: Question) -> None:
        """Answer ``q``. A NaN/Inf engine output (NonFiniteError) fails only this question
        (its record, ``q.error`` and its Answer say so) and the stream goes on; other errors
        fail its Answer and are raised."""
        h = q.handle
        if h is not None and not h.set_running_or_notify_cancel():
            return                                   # cancelled before it was served
        session = self.sessions[q.stream]
        pieces: list[str] = []
        failed: BaseException | None = None
        gen = session.ask(q.text, max_new_tokens=q.max_new_tokens, at=q.at)
        try:
            for piece in gen:
                pieces.append(piece)
                if h is not None:
                    h.record = session.questions[-1]
                    h._piece(piece)
                    if h._stop:
                        gen.close()              # the answer so far; the next step closes the turn
                        break
        except NonFiniteError as e:
            q.error = error_text(e)
            failed = e
        except BaseException as e:
            q.answer, q.error = "".join(pieces), error_text(e)
            if h is not None:
                h._finish(e)
            raise
        q.answer = "".join(pieces)
        rec = session.questions[-1]
        if h is not None:
            h.record = rec
            h._finish(failed)
        if self.on_answer:
            self.on_answer(q, rec)

    def _drop(self, i: int, capture: float, reason: str) -> None:
        session = self.sessions[i]
        decision = Decision("drop", session.scheduler.frame_deadline_for(capture), None, reason)
        rec = session.record_drop(capture, decision, len(self.pending[i]) + 1)
        self.picker.record(i, False)
        if self.on_frame:
            self.on_frame(i, rec)

    def _start(self) -> None:
        self._started = True
        for f in self.feeders:
            if f.live:
                f.start()

    def step(self) -> bool:
        """Do one unit of work (serve a question, drop/run a frame, or wait for the next
        arrival). Returns False when everything is done or :meth:`stop` was called (then
        questions still waiting fail, see :meth:`close`)."""
        with self._cond:
            stopped = self._stopped
            if self._asked:
                self.questions.extend(self._asked)
                self._asked = []
        if stopped:
            self.close()
            return False
        if not self._started:
            self._start()
        now = self.clock.now()
        for i, feeder in enumerate(self.feeders):
            for capture in feeder.take_overflow():
                self._drop(i, capture, _SUPERSEDED)
            queue = self.pending[i]
            queue.extend(feeder.pop_arrived(now))
            if feeder.live:                          # the newest frames only: no backlog
                while len(queue) > feeder.backlog:
                    self._drop(i, queue.popleft()[0], _SUPERSEDED)
            self.max_queue[i] = max(self.max_queue[i], len(queue))
        due = [q for q in self.questions if q.at <= now]
        if due:
            q = min(due, key=lambda q: q.at + self.sessions[q.stream].scheduler.ttft)
            self.questions.remove(q)
            self._serve_question(q)
            return True
        for i, session in enumerate(self.sessions):
            queue = self.pending[i]
            if not queue:
                continue
            drops = session.scheduler.prune([c for c, _ in queue], now)
            for idx, reason in sorted(drops, reverse=True):
                capture, _ = queue[idx]
                del queue[idx]
                self._drop(i, capture, reason)
        heads = []
        for i, q in enumerate(self.pending):
            if q:
                sched, capture = self.sessions[i].scheduler, q[0][0]
                after = q[1][0] if len(q) > 1 else self.feeders[i].next_arrival()
                heads.append((i, sched.frame_deadline_for(capture), sched.cheapest_run_s(),
                              sched.latest_start(capture, after)))
        if heads:
            i = self.picker.pick(heads, now)
            capture, frame = self.pending[i].popleft()
            session = self.sessions[i]
            backlog = [c for c, _ in self.pending[i]]
            others = [self.sessions[j].scheduler.frame_deadline_for(c)
                      for j, q in enumerate(self.pending) if j != i for c, _ in q]
            decision = session.scheduler.decide(capture, now, backlog, others)
            queue_len = len(backlog) + 1
            if decision.action == "drop":
                rec = session.record_drop(capture, decision, queue_len)
                self.picker.record(i, False)
            else:
                rec = session.run_decided(getattr(frame, "image", frame), capture, decision, queue_len)
                self.order.append((i, rec.index))
                if len(self.order) > 2 * self.history:      # bounded: the most recent entries
                    del self.order[:-self.history]
                self.picker.record(i, True)
            if self.on_frame:
                self.on_frame(i, rec)
            return True
        return self._wait()

    def _wait(self) -> bool:
        """Nothing to do now: wait for the next arrival (a frame, a question, a live frame,
        :meth:`stop`). Returns False when nothing can arrive any more."""
        arrivals = [t for t in (f.next_arrival() for f in self.feeders) if t is not None]
        arrivals += [q.at for q in self.questions]
        with self._cond:
            live = [f for f in self.feeders if f.live]
            if self._asked or self._stopped or any(f.has_news() for f in live):
                return True                          # work arrived meanwhile
            waiting_live = [f for f in live if not f.done]
            if not arrivals and not waiting_live and not self.keep_open:
                self._closed = True                  # no more questions accepted
                closing = True
            else:
                closing = False
                real = isinstance(self.clock, WallClock)
                if real or not arrivals:             # interruptible wait (a question, a live frame)
                    timeout = min(arrivals) - self.clock.now() if arrivals else None
                    if any(f.poll for f in waiting_live):
                        timeout = LIVE_POLL_S if timeout is None else min(timeout, LIVE_POLL_S)
                    if timeout is None or timeout > 0:
                        self._cond.wait(timeout)
                    return True
        if closing:
            self.close()
            return False
        self.clock.wait_until(min(arrivals))     # a simulated clock jumps; other clocks wait their way
        return True

    def run(self) -> list:
        """Run until every source and question is done (or :meth:`stop`); returns each
        session's report. Questions still waiting when it returns (or raises) fail with
        :class:`~streamgraph.errors.StreamClosedError`."""
        error = None
        try:
            while self.step():
                pass
        except BaseException as e:
            error = e
            raise
        finally:
            self.close(error)
        return [s.report() for s in self.sessions]
