"""Deadline-aware scheduling: overload policies, a per-stage cost model, decisions.

Every frame gets ``deadline = capture time + slo.frame_deadline_ms``; a question gets
``deadline = arrival + slo.ttft_ms`` for its first token and is served ahead of pending frames.
When the executor becomes free, the policy first prunes the stream's pending frames, then
decides how to run the one chosen (EDF across streams, see :class:`streamgraph.runtime.stream.StreamRunner`).
Each policy is a strategy object (an :class:`OverloadPolicy` subclass with its ``prune`` /
``decide`` / ``latest_start`` methods), registered by name in :data:`OVERLOAD`, the one place
the names are written (the spec's ``slo.overload``, the CLI's ``--overload`` and the server
read :data:`OVERLOAD_POLICIES` from it):

* ``fifo`` (alias ``none``) — run every frame in arrival order, however late (the unbounded
  baseline; latency grows without bound under overload).
* ``drop_late`` — drop a frame that would start after its deadline or whose predicted finish
  (start + predicted cost at full budget) is after it.
* ``latest_only`` — keep only the newest pending frame, drop the older ones, run it at full
  budget (a flow limiter, like MediaPipe's FlowLimiterCalculator or dora's drop_oldest).
* ``degrade`` — run at the largest precompiled token budget at which this frame and the frames
  queued behind it would all meet their deadlines (back to back at that budget); if no budget
  saves them all, the cheapest one that still fits this frame's slack; only when even the
  smallest budget does not fit the slack, drop.

Costs come from :class:`CostModel`: an EWMA per stage and per budget bucket, calibrated at
session start and updated online after every frame. The scheduler never reads a clock:
callers pass ``now``, so tests run it deterministically on a virtual clock.

Across streams, :class:`FairEDF` picks which stream's head frame runs: EDF while every head
can still meet its deadline, least recently served among those that can when not (so no
stream starves under overload; see its docstring).
"""
from __future__ import annotations

from dataclasses import dataclass

FRAME_STAGES = ("preprocess", "encode", "reduce", "prefill")
BUDGET_STAGES = ("reduce", "prefill")          # stages whose cost depends on the token budget
TIME_EPS = 1e-6        # seconds: deadline comparisons tolerate float rounding of stream time


class CostModel:
    """EWMA of each stage's duration in seconds, per token-budget bucket for the stages
    that depend on it (``alpha`` = weight of the newest sample)."""

    def __init__(self, alpha: float = 0.3):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.mean: dict[str, float] = {}

    @staticmethod
    def key(stage: str, budget: int | None) -> str:
        return f"{stage}@{budget}" if (stage in BUDGET_STAGES and budget is not None) else stage

    def predict(self, stage: str, budget: int | None = None) -> float | None:
        """Predicted seconds for ``stage`` (at ``budget``), or None if never measured."""
        return self.mean.get(self.key(stage, budget))

    def predict_stages(self, budget: int | None) -> dict[str, float]:
        """Predicted seconds per frame stage (0 for stages never measured)."""
        return {s: self.predict(s, budget) or 0.0 for s in FRAME_STAGES}

    def predict_frame(self, budget: int | None, stages=FRAME_STAGES) -> float | None:
        """Predicted seconds for a whole frame at ``budget``; None until encode and prefill
        have been measured at that budget."""
        if self.predict("encode") is None or self.predict("prefill", budget) is None:
            return None
        return sum(self.predict(s, budget) or 0.0 for s in stages)

    def update(self, stage: str, seconds: float, budget: int | None = None) -> None:
        k = self.key(stage, budget)
        old = self.mean.get(k)
        self.mean[k] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def set(self, stage: str, seconds: float, budget: int | None = None) -> None:
        """Overwrite a prediction (calibration, or given costs in simulations)."""
        self.mean[self.key(stage, budget)] = float(seconds)


@dataclass
class Decision:
    """What to do with one frame: ``action`` is "run" or "drop"; ``budget`` the token budget
    to run at; ``deadline`` in stream seconds; ``reason`` says why (for drops and degrades)."""

    action: str
    deadline: float
    budget: int | None = None
    reason: str = ""
    predicted_s: float | None = None


# ---------------------------------------------------------------------- overload policies
class OverloadPolicy:
    """One overload policy (a strategy object): what :class:`Scheduler` does with a stream's
    pending frames. Subclasses override the decision methods; the base class is ``fifo``'s
    behaviour (run everything, never drop). Stateless: one instance serves every scheduler.

    Registered in :data:`OVERLOAD` under :attr:`name` (and its :attr:`aliases`); the spec's
    ``slo.overload``, the CLI's ``--overload`` and the server read the names from there."""

    name = "fifo"
    aliases: tuple[str, ...] = ()
    #: drops a frame that cannot meet its deadline (``drop_late``, ``degrade``)
    sheds_late = False
    #: may run a frame at a smaller token budget than the full one (``degrade``)
    degrades = False

    def cheapest_budget(self, sched: "Scheduler"):
        """The budget of the cheapest run this policy may choose (the full budget)."""
        return sched.full_budget

    def latest_start(self, sched: "Scheduler", capture: float, next_capture: float | None) -> float:
        """Latest stream time (s) at which the frame captured at ``capture`` may still start."""
        return float("inf")

    def prune(self, sched: "Scheduler", captures: list[float], now: float) -> list[tuple[int, str]]:
        """Indices of pending frames (capture times in arrival order) to drop at ``now``."""
        return []

    def decide(self, sched: "Scheduler", capture: float, now: float, behind: list[float]) -> "Decision":
        """Run or drop the frame captured at ``capture``; ``behind``: sorted deadlines (s) of
        the frames pending behind it (this stream's and other streams')."""
        full = sched.full_budget
        return Decision("run", sched.frame_deadline_for(capture), full, predicted_s=sched.costs.predict_frame(full))


class Fifo(OverloadPolicy):
    """``fifo`` (alias ``none``): run every frame in arrival order, however late (the
    unbounded baseline; latency grows without bound under overload)."""

    name = "fifo"
    aliases = ("none",)


class LatestOnly(OverloadPolicy):
    """``latest_only``: keep only the newest pending frame, drop the older ones, run it at full
    budget (a flow limiter, like MediaPipe's FlowLimiterCalculator or dora's drop_oldest)."""

    name = "latest_only"

    def latest_start(self, sched, capture, next_capture):
        return float("inf") if next_capture is None else next_capture - TIME_EPS

    def prune(self, sched, captures, now):
        if len(captures) > 1:
            return [(i, "superseded by a newer frame") for i in range(len(captures) - 1)]
        return []


class DropLate(OverloadPolicy):
    """``drop_late``: drop a frame that would start after its deadline or whose predicted
    finish (start + predicted cost at full budget) is after it."""

    name = "drop_late"
    sheds_late = True

    def _candidates(self, sched):
        return [sched.full_budget]

    def latest_start(self, sched, capture, next_capture):
        return sched.frame_deadline_for(capture) - sched.cheapest_run_s() + TIME_EPS

    def prune(self, sched, captures, now):
        out = []
        cost = sched.cheapest_run_s()
        for i, c in enumerate(captures):
            late = now + cost - sched.frame_deadline_for(c)
            if late > TIME_EPS:
                out.append((i, f"cannot meet its deadline (predicted {1000 * late:.1f} ms late)"))
        return out

    def _choose(self, fits_head, now, behind):
        return fits_head[0]

    def decide(self, sched, capture, now, behind):
        deadline = sched.frame_deadline_for(capture)
        slack = deadline - now
        if slack < 0:
            return Decision("drop", deadline, None, f"would start {-1000 * slack:.1f} ms after its deadline")
        candidates = self._candidates(sched)
        fits_head = []
        for b in candidates:
            pred = sched.costs.predict_frame(b)
            if pred is None or pred <= slack + TIME_EPS:
                fits_head.append((b, pred))
        if not fits_head:
            pred = sched.costs.predict_frame(candidates[-1]) or 0.0
            return Decision("drop", deadline, None,
                            f"predicted {1000 * pred:.1f} ms at budget {candidates[-1]} exceeds slack {1000 * slack:.1f} ms")
        b, pred = self._choose(fits_head, now, behind)
        reason = "" if b == sched.full_budget else (
            f"degraded to {b} tokens (predicted {1000 * (pred or 0):.1f} ms, slack "
            f"{1000 * slack:.1f} ms, {len(behind)} frames behind)")
        return Decision("run", deadline, b, reason, pred)


class Degrade(DropLate):
    """``degrade``: run at the largest precompiled token budget at which this frame and the
    frames queued behind it would all meet their deadlines (back to back at that budget); if
    no budget saves them all, the cheapest one that still fits this frame's slack; only when
    even the smallest budget does not fit the slack, drop."""

    name = "degrade"
    degrades = True

    def cheapest_budget(self, sched):
        return sched.budgets[0]

    def _candidates(self, sched):
        return list(reversed(sched.budgets))

    def _choose(self, fits_head, now, behind):
        if not behind:
            return fits_head[0]
        for b, pred in fits_head:
            cost = pred or 0.0
            if all(now + (i + 2) * cost <= d + TIME_EPS for i, d in enumerate(behind)):
                return b, pred
        return fits_head[-1]          # cannot save everyone: cheapest bucket, shed load


#: The overload policy registry: name (aliases included) -> policy object. The one place the
#: names are written.
OVERLOAD: dict[str, OverloadPolicy] = {}
for _cls in (DropLate, LatestOnly, Degrade, Fifo):
    for _name in (_cls.name, *_cls.aliases):
        OVERLOAD[_name] = _cls()
#: Every accepted ``slo.overload`` / ``--overload`` name, aliases included.
OVERLOAD_POLICIES: tuple[str, ...] = tuple(OVERLOAD)


def overload_policy(name: str) -> OverloadPolicy:
    """The registered policy ``name`` (an alias resolves to its policy). Raises ValueError
    (one line listing the allowed names) for an unknown one."""
    try:
        return OVERLOAD[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown overload policy {name!r} (allowed: {', '.join(OVERLOAD_POLICIES)})") from None


class Scheduler:
    """Overload policy of one stream.

    ``budgets`` are the precompiled token-budget buckets, ascending (the largest is the full
    budget). Raises ValueError for an unknown policy or an empty budget list."""

    def __init__(self, overload: str, frame_deadline_ms: float, ttft_ms: float,
                 budgets: list[int] | None = None, costs: CostModel | None = None):
        self.policy = overload_policy(overload)
        self.overload = self.policy.name         # canonical name ("none" -> "fifo")
        self.frame_deadline = frame_deadline_ms / 1000.0
        self.ttft = ttft_ms / 1000.0
        self.budgets = sorted(budgets) if budgets else [None]
        self.costs = costs or CostModel()

    @property
    def full_budget(self):
        return self.budgets[-1]

    def frame_deadline_for(self, capture: float) -> float:
        return capture + self.frame_deadline

    def cheapest_run_s(self) -> float:
        """Predicted seconds of the cheapest run this policy may choose for a frame: at the
        smallest budget for ``degrade``, at full budget otherwise (0 before calibration)."""
        return self.costs.predict_frame(self.policy.cheapest_budget(self)) or 0.0

    def latest_start(self, capture: float, next_capture: float | None = None) -> float:
        """Latest stream time (s) at which the frame captured at ``capture`` can start and
        still be run by this policy: ``deadline - cheapest run`` for ``drop_late``/``degrade``
        (later, it is dropped), just before ``next_capture`` (the stream's next frame, None if
        none) for ``latest_only`` (then it is superseded), never for ``fifo`` (inf)."""
        return self.policy.latest_start(self, capture, next_capture)

    def prune(self, captures: list[float], now: float) -> list[tuple[int, str]]:
        """Indices (into ``captures``, pending frames in arrival order) the policy drops
        before choosing what to run at ``now``, each with a reason."""
        return self.policy.prune(self, captures, now)

    def decide(self, capture: float, now: float, backlog: list[float] | None = None,
               backlog_deadlines: list[float] | None = None) -> Decision:
        """Run (at which budget) or drop the frame captured at ``capture``, starting ``now``.

        ``backlog`` holds the capture times of the frames pending behind it in the same stream
        (arrival order); ``backlog_deadlines`` the deadlines (stream seconds) of frames of other
        streams pending on the same executor. ``degrade`` uses them to keep up: it prefers the
        largest budget at which this frame *and* every frame behind it (all of them, in
        deadline order) would still meet their deadlines if all ran at that budget back to
        back; when no budget achieves that, the largest at which this frame alone meets its
        deadline; when none does, it drops the frame."""
        if backlog or backlog_deadlines:
            behind = sorted([self.frame_deadline_for(c) for c in backlog or []] + list(backlog_deadlines or []))
        else:
            behind = []
        return self.policy.decide(self, capture, now, behind)

    @staticmethod
    def overrunning_stage(stage_s: dict[str, float], predicted: dict[str, float], start: float,
                          deadline: float) -> str:
        """Name the stage that made a frame miss its deadline: ``queue`` when it started too
        late to make it even at its predicted cost (start + predicted > deadline); otherwise
        the stage whose time exceeded its prediction by the most."""
        if start + sum(predicted.get(s, 0.0) for s in stage_s) > deadline + TIME_EPS:
            return "queue"
        return max(stage_s, key=lambda s: stage_s[s] - predicted.get(s, 0.0))


class FairEDF:
    """Which stream's head frame runs next on an executor shared by ``n_streams`` streams.

    EDF alone lets a stream starve: under overload it breaks deadline ties (identical
    cameras) and near-ties (cameras a few ms apart) the same way every time, so the same
    stream loses every contest (measured: three identical cameras at 1.2x load served
    200/200/105 frames; eight served 7 x 200 and 10). The rule here keeps EDF where EDF's
    guarantee holds and only chooses *who loses* where it does not:

    1. Order the heads by deadline. If each would start in that order, back to back at its
       predicted cost, no later than the latest start its policy allows
       (:meth:`Scheduler.latest_start`: the deadline less the cost, or the next frame's
       arrival for ``latest_only``), pick the first: this is plain EDF, optimal when the
       heads are feasible (Liu & Layland 1973; Dertouzos 1974), so every guarantee of EDF in
       underload is kept. Equal deadlines go to the stream that kept the smaller share of its
       recent frames.
    2. Otherwise at least one head will be dropped (or superseded) whatever runs. As deadline
       schedulers do under overload, choose what to shed by a value rather than by deadline
       order (Buttazzo, *Hard Real-Time Computing Systems*, ch. 9, "Handling overload
       conditions"); the value here is fairness: among the heads that can still start in
       time, run the stream that kept the smallest share of its recent frames (ties: earlier
       deadline, then lower index). When none can, EDF.

    The share is ``kept[i]``, an exponential moving average over the stream's frames of
    1 (run) or 0 (dropped), over about ``memory_frames`` frames, starting at 1. So every
    stream loses the same share of its frames (identical streams: the same number), a stream
    that loses a frame moves ahead of the others at the next overloaded contest (no stream
    whose frames can meet their deadlines starves), and a stream that joins late or was idle
    gets no credit to spend against the others. Least *recently* served is not enough: with
    cameras a few ms apart, the last-served stream is also the one whose next frame EDF
    drops, every period (measured 200/200/105 with it). Deterministic.
    """

    def __init__(self, n_streams: int, memory_frames: float = 32.0):
        if memory_frames < 1:
            raise ValueError(f"memory_frames must be >= 1, got {memory_frames}")
        self.alpha = 1.0 / memory_frames
        self.kept = [1.0] * n_streams

    def pick(self, heads: list[tuple[int, float, float, float]], now: float) -> int:
        """Stream to serve now. ``heads`` holds ``(stream, deadline, predicted cost, latest
        start)`` of each stream's oldest pending frame (seconds, stream time; at least one);
        ``now`` is stream time in seconds. Raises ValueError for an empty list."""
        if not heads:
            raise ValueError("FairEDF.pick needs at least one head frame")
        order = sorted(heads, key=lambda h: (h[1], self.kept[h[0]], h[0]))
        t = now
        for _, _, cost, latest in order:
            if t > latest:
                break
            t += cost
        else:
            return order[0][0]
        can_start = [h for h in order if now <= h[3]]
        if not can_start:
            return order[0][0]
        return min(can_start, key=lambda h: (self.kept[h[0]], h[1], h[0]))[0]

    def record(self, stream: int, ran: bool) -> None:
        """Record the fate of one of ``stream``'s frames: run (True) or dropped (False)."""
        self.kept[stream] += self.alpha * (float(ran) - self.kept[stream])
