"""Clocks in stream time (seconds since stream start).

The runtime never reads time directly: it asks a clock, so tests and offline runs are
deterministic and real-time runs are paced by the wall clock.

* :class:`SimulatedClock` — "as fast as possible, deadlines in stream time": waiting for a
  frame's capture time jumps the clock forward, and work advances it by its measured (or
  modelled) duration. A frame that arrives while earlier work is still running starts late,
  exactly as it would live.
* :class:`WallClock` — real time: waiting sleeps, work takes the time it takes.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod


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
