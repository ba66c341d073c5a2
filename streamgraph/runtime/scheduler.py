"""Per-frame deadline scheduling (first slice: ``drop_late`` and ``none``).

Every frame gets ``deadline = capture time + slo.frame_deadline_ms``. Before a frame runs,
the scheduler predicts its cost from a per-stage EWMA cost model and decides:

* ``drop_late`` — drop the frame if it would start after its deadline, or if its predicted
  finish (start + predicted cost) is after its deadline; otherwise run it.
* ``none`` — always run (for parity tests and offline processing).

A question gets its own deadline, ``ask time + slo.ttft_ms`` for its first token.
"""
from __future__ import annotations

from dataclasses import dataclass

FRAME_STAGES = ("preprocess", "encode", "reduce", "prefill")
OVERLOAD_POLICIES = ("drop_late", "none")


class CostModel:
    """EWMA of each stage's duration in seconds (``alpha`` weight of the newest sample)."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.mean: dict[str, float] = {}

    def predict(self, stage: str) -> float | None:
        return self.mean.get(stage)

    def predict_frame(self) -> float | None:
        """Predicted seconds for one frame, or None before any frame was measured."""
        if not all(s in self.mean for s in FRAME_STAGES if s != "reduce"):
            return None
        return sum(self.mean.get(s, 0.0) for s in FRAME_STAGES)

    def update(self, stage: str, seconds: float) -> None:
        old = self.mean.get(stage)
        self.mean[stage] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds


@dataclass
class Decision:
    action: str          # "run" | "drop"
    deadline: float      # stream seconds
    reason: str = ""


class Scheduler:
    """Decides run/drop for each frame. ``overload`` is one of :data:`OVERLOAD_POLICIES`.

    Raises ValueError for an unknown policy."""

    def __init__(self, overload: str, frame_deadline_ms: float, ttft_ms: float):
        if overload not in OVERLOAD_POLICIES:
            raise ValueError(f"unknown overload policy {overload!r} (allowed: {', '.join(OVERLOAD_POLICIES)})")
        self.overload = overload
        self.frame_deadline = frame_deadline_ms / 1000.0
        self.ttft = ttft_ms / 1000.0
        self.costs = CostModel()

    def frame_deadline_for(self, capture: float) -> float:
        return capture + self.frame_deadline

    def decide(self, capture: float, now: float) -> Decision:
        deadline = self.frame_deadline_for(capture)
        if self.overload == "none":
            return Decision("run", deadline)
        if now > deadline:
            return Decision("drop", deadline, f"would start {1000 * (now - deadline):.1f} ms after its deadline")
        predicted = self.costs.predict_frame()
        if predicted is not None and now + predicted > deadline:
            return Decision("drop", deadline,
                            f"predicted finish {1000 * (now + predicted - deadline):.1f} ms after its deadline")
        return Decision("run", deadline)

    def overrunning_stage(self, stage_s: dict[str, float], queue_s: float, predicted: dict[str, float]) -> str:
        """Stage whose time exceeded its prediction by the most (``queue`` = waiting to start,
        predicted 0). Used to explain a deadline miss."""
        over = {"queue": queue_s}
        for s, t in stage_s.items():
            over[s] = t - predicted.get(s, 0.0)
        return max(over, key=over.get)
