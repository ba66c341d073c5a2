"""streamgraph runtime: sessions, KV buffer and cache policies, scheduler, sources, metrics.

Torch-free by contract: edge targets ship a bundle and this package (plus onnxruntime).
"""
from streamgraph.runtime import sources
from streamgraph.runtime.clock import Clock, SimulatedClock, WallClock
from streamgraph.runtime.kv import CachePolicy, FullCache, KVBuffer, SinkWindowCache, make_policy
from streamgraph.runtime.metrics import FrameRecord, QuestionRecord, Report
from streamgraph.runtime.scheduler import CostModel, Scheduler
from streamgraph.runtime.session import Engines, Session

__all__ = ["Session", "Engines", "sources", "Clock", "SimulatedClock", "WallClock", "CachePolicy", "FullCache",
           "KVBuffer", "SinkWindowCache", "make_policy", "FrameRecord", "QuestionRecord", "Report",
           "CostModel", "Scheduler"]
