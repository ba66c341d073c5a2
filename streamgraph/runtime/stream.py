"""The stream: records, clock, per-frame bookkeeping, the scheduler's decision per frame.

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
"""
from __future__ import annotations

import json
import math
import operator
import time
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path
from typing import Iterator, Protocol

from ddsketch import LogCollapsingLowestDenseDDSketch

from streamgraph.errors import NonFiniteError, ReportError
from streamgraph.runtime.metrics import (DEFAULT_HISTORY, SKETCH_ACCURACY, SKETCH_BINS, FrameRecord, QuestionRecord,
                                         Report)
from streamgraph.runtime.scheduler import TIME_EPS, CostModel, Decision, Scheduler


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
        ``rec`` (prompt tokens, ``ttft_ms``/``ttft_met`` from arrival, decode times, answer)."""

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
        across streams) need :class:`~streamgraph.runtime.runner.StreamRunner`; here each
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
        rec.slots_in_use = self.executor.slots_in_use
        self._finish_question(rec)

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
