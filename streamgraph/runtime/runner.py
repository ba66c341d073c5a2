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
:class:`~streamgraph.runtime.clock.SimulatedClock` the run is "as fast as possible with
deadlines in stream time" (deterministic with :class:`~streamgraph.runtime.simulate.SimulatedSession`);
with a :class:`~streamgraph.runtime.clock.WallClock` frames are delivered at their capture
times (real time). Frames are decoded lazily, when their capture time has come.
"""
from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from streamgraph.errors import NonFiniteError, SourceError
from streamgraph.runtime.scheduler import Decision, FairEDF
from streamgraph.runtime.stream import StreamBase, check_question, check_time, error_text


@dataclass
class Question:
    """A question arriving at stream time ``at`` (seconds, finite, >= 0) for stream
    ``stream``, answered with at most ``max_new_tokens`` tokens (None: the graph's default;
    otherwise >= 1). ``answer`` and ``error`` (``Type: message`` of a failed question) are
    filled in when it is served. Raises ValueError for an empty text, a bad ``at`` or
    ``max_new_tokens``."""

    at: float
    text: str
    stream: int = 0
    max_new_tokens: int | None = None
    answer: str = field(default="", compare=False)
    error: str = field(default="", compare=False)

    def __post_init__(self):
        self.at = check_time("question time", self.at)
        check_question(self.text, self.max_new_tokens)
        try:
            if isinstance(self.stream, bool):
                raise TypeError
            self.stream = operator.index(self.stream)
        except TypeError:
            raise ValueError(f"question stream must be an integer index, got {self.stream!r}") from None


class _Feeder:
    """Lookahead over a frame iterator: hands out frames whose capture time has come.
    Raises SourceError for a frame whose timestamp is not a finite number >= 0 (a stream
    could never reach it)."""

    def __init__(self, frames: Iterable, speed: float = 1.0, stream: int = 0):
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) or speed <= 0:
            raise ValueError(f"speed must be a finite number > 0, got {speed!r}")
        self._it: Iterator = iter(frames)
        self._next = None
        self.speed = float(speed)
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
            out.append(self._next)
            self._advance()
        return out


class StreamRunner:
    """Run ``streams`` (pairs of a :class:`StreamBase` session and an iterable of frames)
    on one executor. All sessions must share one clock.

    ``speed`` > 1 replays sources faster than captured (capture times divided by it), to
    offer a chosen load. ``on_frame(stream, record)`` and ``on_answer(question, record)``
    are called as things happen (progress displays). Raises ValueError when the sessions do
    not share a clock."""

    def __init__(self, streams: list[tuple[StreamBase, Iterable]], questions: list[Question] | None = None,
                 speed: float = 1.0, on_frame: Callable | None = None, on_answer: Callable | None = None):
        if not streams:
            raise ValueError("StreamRunner needs at least one stream")
        self.sessions = [s for s, _ in streams]
        self.clock = self.sessions[0].clock
        if any(s.clock is not self.clock for s in self.sessions):
            raise ValueError("all sessions of a StreamRunner must share one clock")
        self.feeders = [_Feeder(f, speed, i) for i, (_, f) in enumerate(streams)]
        self.pending: list[deque] = [deque() for _ in streams]
        self.questions = sorted(questions or [], key=lambda q: q.at)
        for q in self.questions:
            if not 0 <= q.stream < len(streams):
                raise ValueError(f"question for stream {q.stream}, but there are {len(streams)} streams")
        self.on_frame, self.on_answer = on_frame, on_answer
        self.max_queue = [0] * len(streams)
        self.order: list[tuple[int, int]] = []        # (stream, frame index) in execution order
        self.history = max(s.history for s in self.sessions)   # `order` keeps about this many
        self.picker = FairEDF(len(streams))

    def _capture(self, i: int, frame) -> float:
        return self.feeders[i].capture(frame)

    def _serve_question(self, q: Question) -> None:
        """Answer ``q``. A NaN/Inf engine output (NonFiniteError) fails only this question
        (its record and ``q.error`` say so) and the stream goes on; other errors are raised."""
        session = self.sessions[q.stream]
        pieces: list[str] = []
        try:
            for piece in session.ask(q.text, max_new_tokens=q.max_new_tokens, at=q.at):
                pieces.append(piece)
        except NonFiniteError as e:
            q.error = error_text(e)
        q.answer = "".join(pieces)
        if self.on_answer:
            self.on_answer(q, session.questions[-1])

    def _drop(self, i: int, frame, reason: str) -> None:
        session = self.sessions[i]
        capture = self._capture(i, frame)
        decision = Decision("drop", session.scheduler.frame_deadline_for(capture), None, reason)
        rec = session.record_drop(capture, decision, len(self.pending[i]) + 1)
        self.picker.record(i, False)
        if self.on_frame:
            self.on_frame(i, rec)

    def step(self) -> bool:
        """Do one unit of work (serve a question, drop/run a frame, or wait for the next
        arrival). Returns False when everything is done."""
        now = self.clock.now()
        for i, feeder in enumerate(self.feeders):
            self.pending[i].extend(feeder.pop_arrived(now))
            self.max_queue[i] = max(self.max_queue[i], len(self.pending[i]))
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
            drops = session.scheduler.prune([self._capture(i, f) for f in queue], now)
            for idx, reason in sorted(drops, reverse=True):
                frame = queue[idx]
                del queue[idx]
                self._drop(i, frame, reason)
        heads = []
        for i, q in enumerate(self.pending):
            if q:
                sched, capture = self.sessions[i].scheduler, self._capture(i, q[0])
                after = self._capture(i, q[1]) if len(q) > 1 else self.feeders[i].next_arrival()
                heads.append((i, sched.frame_deadline_for(capture), sched.cheapest_run_s(),
                              sched.latest_start(capture, after)))
        if heads:
            i = self.picker.pick(heads, now)
            frame = self.pending[i].popleft()
            session = self.sessions[i]
            capture = self._capture(i, frame)
            backlog = [self._capture(i, f) for f in self.pending[i]]
            others = [self.sessions[j].scheduler.frame_deadline_for(self._capture(j, f))
                      for j, q in enumerate(self.pending) if j != i for f in q]
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
        arrivals = [t for t in (f.next_arrival() for f in self.feeders) if t is not None]
        arrivals += [q.at for q in self.questions]
        if not arrivals:
            return False
        self.clock.wait_until(min(arrivals))
        return True

    def run(self) -> list:
        """Run to the end of every source; returns each session's report."""
        while self.step():
            pass
        return [s.report() for s in self.sessions]
