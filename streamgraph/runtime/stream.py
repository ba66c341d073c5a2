"""What every stream executor shares: frame/question records and the single-frame path.

:class:`~streamgraph.runtime.session.Session` (real engines) and
:class:`~streamgraph.runtime.simulate.SimulatedSession` (given stage costs on a virtual clock)
both derive from :class:`StreamBase`, so the runner and the scheduler treat them alike.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from streamgraph.runtime.clock import Clock
from streamgraph.runtime.metrics import FrameRecord, QuestionRecord, Report, summarize
from streamgraph.runtime.scheduler import TIME_EPS, Decision, Scheduler


class StreamBase(ABC):
    """Record keeping for one stream; subclasses implement :meth:`execute_frame` and ``ask``."""

    def __init__(self, scheduler: Scheduler, clock: Clock):
        self.scheduler = scheduler
        self.clock = clock
        self.frames: list[FrameRecord] = []
        self.questions: list[QuestionRecord] = []
        self._frame_count = 0

    # -- to implement ------------------------------------------------------------------
    @abstractmethod
    def execute_frame(self, image, budget: int | None = None) -> tuple[dict[str, float], int, dict]:
        """Run one frame at token budget ``budget`` (None = full); return seconds per stage,
        the number of tokens written to the KV cache, and extra record fields (``budget``
        actually used, ``encoder`` path). Does not touch the clock."""

    @property
    @abstractmethod
    def slots_in_use(self) -> int:
        """KV slots holding tokens now."""

    @property
    def kv_bytes(self) -> int:
        return 0

    # -- records -----------------------------------------------------------------------
    def record_drop(self, capture: float, decision: Decision, queue_len: int = 0) -> FrameRecord:
        """Append the record of a dropped frame."""
        rec = FrameRecord(index=self._frame_count, capture=capture, deadline=decision.deadline,
                          decision="drop", reason=decision.reason, overran="queue",
                          slots_in_use=self.slots_in_use, queue_len=queue_len)
        self._frame_count += 1
        self.frames.append(rec)
        return rec

    def run_decided(self, image, capture: float, decision: Decision, queue_len: int = 0) -> FrameRecord:
        """Execute a frame the scheduler decided to run, advance the clock by its cost,
        update the cost model and append its record."""
        start = self.clock.now()
        rec = FrameRecord(index=self._frame_count, capture=capture, deadline=decision.deadline,
                          decision="run", reason=decision.reason, start=start, queue_len=queue_len,
                          budget=decision.budget or 0)
        self._frame_count += 1
        self.frames.append(rec)
        predicted = self.scheduler.costs.predict_stages(decision.budget)
        try:
            stage_s, n_valid, extra = self.execute_frame(image, decision.budget)
        except Exception as e:
            rec.decision, rec.reason = "error", f"{type(e).__name__}: {e}"
            raise
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
        return rec

    def push_frame(self, frame, timestamp: float | None = None, *, budget: int | None = None) -> FrameRecord:
        """Single-frame path: wait for the frame's capture time, decide, run or drop.

        ``frame`` is a :class:`~streamgraph.runtime.sources.Frame` or an ``[H,W,3]`` uint8
        RGB array with ``timestamp`` (capture time, stream seconds). Policies that need a
        queue of pending frames (``latest_only``, EDF across streams) need
        :class:`~streamgraph.runtime.runner.StreamRunner`; here each frame is decided alone.
        A given ``budget`` overrides the policy's choice of bucket (the frame can still be
        dropped)."""
        image = getattr(frame, "image", frame)
        capture = float(getattr(frame, "timestamp", timestamp if timestamp is not None else 0.0))
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
        """Records and summary of everything this stream did so far."""
        return Report(self.report_meta(), list(self.frames), list(self.questions),
                      summarize(self.frames, self.questions, self.kv_bytes))
