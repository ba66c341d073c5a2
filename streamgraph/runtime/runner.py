"""StreamRunner: one executor shared by several streams, earliest deadline first.

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
import logging
import math
import operator
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from streamgraph.errors import NonFiniteError, SourceError, StreamClosedError, StreamgraphError
from streamgraph.runtime.scheduler import Decision, FairEDF
from streamgraph.runtime.stream import (Clock, SimulatedClock, StreamBase, WallClock, check_question, check_time,
                                        error_text)

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
