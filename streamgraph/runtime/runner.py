"""The multi-stream runner moved into :mod:`streamgraph.runtime.stream` (the runner's loop and
the stream's per-frame bookkeeping are one role, so a frame from its source to its record
enters one file for both); this module re-exports its names for code that imports them
from here."""
from streamgraph.runtime.stream import (DEFAULT_LIVE_BACKLOG, LIVE_POLL_S, Answer, Question, StreamRunner,
                                        _check_speed, _Feeder, _LiveFeeder)

__all__ = ["DEFAULT_LIVE_BACKLOG", "LIVE_POLL_S", "Answer", "Question", "StreamRunner"]
