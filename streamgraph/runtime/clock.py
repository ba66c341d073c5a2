"""The stream clocks moved into :mod:`streamgraph.runtime.stream` (the stream's per-frame
bookkeeping and its clock are one role, one file); this module only re-exports them for
code that imports them from here."""
from streamgraph.runtime.stream import Clock, SimulatedClock, WallClock

__all__ = ["Clock", "SimulatedClock", "WallClock"]
