"""A stream executor with given stage costs on a virtual clock (no engines).

Used to test and explore the scheduler deterministically: every frame "takes" the cost the
caller gave for each stage at the chosen budget (plus optional seeded jitter), and time only
moves through the :class:`~streamgraph.runtime.stream.SimulatedClock`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from streamgraph.runtime.metrics import DEFAULT_HISTORY, QuestionRecord
from streamgraph.runtime.scheduler import FRAME_STAGES, CostModel, Scheduler
from streamgraph.runtime.stream import Clock, SimulatedClock, StreamBase


class SimulatedSession(StreamBase):
    """A stream that is its own :class:`~streamgraph.runtime.stream.Executor`.

    ``costs`` maps stage -> seconds, or stage -> {budget: seconds} for budget-dependent
    stages; ``ttft_s``/``decode_s`` are a question's prefill and per-token costs.
    ``jitter`` multiplies each cost by ``1 + jitter * N(0,1)`` (clipped at 0.1x), seeded.
    ``cost_scale(frame_index) -> float`` may make some frames slower (e.g. a stage spike).
    ``capacity`` bounds the simulated KV slots (tokens beyond it are evicted, as sink_window).
    ``history``: records kept in memory (see :class:`~streamgraph.runtime.stream.StreamBase`).
    """

    def __init__(self, scheduler: Scheduler, costs: dict, *, clock: Clock | None = None,
                 ttft_s: float = 0.05, decode_s: float = 0.01, answer_tokens: int = 4,
                 jitter: float = 0.0, seed: int = 0, capacity: int = 4096, cost_scale=None,
                 history: int = DEFAULT_HISTORY):
        super().__init__(scheduler, clock or SimulatedClock(), history)
        self.costs = costs
        self.ttft_s, self.decode_s, self.answer_tokens = ttft_s, decode_s, answer_tokens
        self.jitter = jitter
        self.rng = np.random.default_rng(seed)
        self.capacity = capacity
        self.tokens = 0
        self.cost_scale = cost_scale
        self._executed = 0

    @property
    def budgets(self) -> list:
        return self.scheduler.budgets

    @property
    def slots_in_use(self) -> int:
        return min(self.tokens, self.capacity)

    @property
    def kv_bytes(self) -> int:
        return 0

    def begin_frame(self, budget: int | None) -> int | None:
        return budget

    def calibrate_costs(self, costs: CostModel, repeats: int = 0) -> None:
        """Seed ``costs`` with the given (jitter-free) costs, as a real session's calibration
        seeds it with measured ones (``calibrate()`` calls it)."""
        for stage, c in self.costs.items():
            for b in self.scheduler.budgets:
                costs.set(stage, c[b] if isinstance(c, dict) else c, b)

    def _cost(self, stage: str, budget) -> float:
        c = self.costs.get(stage, 0.0)
        if isinstance(c, dict):
            c = c[budget]
        if self.jitter:
            c *= max(0.1, 1.0 + self.jitter * self.rng.standard_normal())
        return float(c)

    def execute_frame(self, image, budget: int | None = None) -> tuple[dict[str, float], int, dict]:
        budget = budget if budget is not None else self.scheduler.full_budget
        scale = self.cost_scale(self._executed) if self.cost_scale else 1.0
        self._executed += 1
        stage_s = {s: scale * self._cost(s, budget) for s in FRAME_STAGES if s in self.costs}
        self.tokens += budget or 0
        return stage_s, budget or 0, {"budget": budget or 0, "encoder": "simulated"}

    def answer(self, rec: QuestionRecord, max_new_tokens: int | None, clock: Clock) -> Iterator[str]:
        """Answer with ``max_new_tokens`` (default ``answer_tokens``) pieces ``"x"``: the
        prefill costs ``ttft_s``, each later token ``decode_s``."""
        clock.wait_until(rec.asked_at)
        clock.spend(self.ttft_s)
        rec.ttft_ms = 1000.0 * (clock.now() - rec.asked_at)
        rec.ttft_met = clock.now() <= rec.deadline
        for i in range(max_new_tokens or self.answer_tokens):
            if i:
                clock.spend(self.decode_s)
                rec.decode_ms.append(1000.0 * self.decode_s)
            rec.new_tokens += 1
            rec.answer += "x"
            yield "x"
        self.tokens += rec.new_tokens
        rec.slots_in_use = self.slots_in_use
