"""Prometheus metrics of the server (``GET /metrics``, prometheus_client text format).

Every series is labelled with the stream id; a removed stream's series are removed too, so
the exposition stays bounded by ``--max-streams``. Times are in seconds (Prometheus
convention), sizes in bytes.

=====================================================  =========  =====================================
metric                                                 type       labels / meaning
=====================================================  =========  =====================================
``streamgraph_streams``                                gauge      streams being served
``streamgraph_frames_total``                           counter    ``stream``, ``decision`` (run, drop,
                                                                  error): sampled frames
``streamgraph_deadline_misses_total``                  counter    ``stream``, ``stage``: frames that
                                                                  ran and ended past their deadline, by
                                                                  the stage that overran (``queue``:
                                                                  started late)
``streamgraph_frame_latency_seconds``                  histogram  ``stream``: capture -> end of a run
                                                                  frame (end to end)
``streamgraph_stage_seconds``                          histogram  ``stream``, ``stage`` (preprocess,
                                                                  encode, reduce, prefill)
``streamgraph_questions_total``                        counter    ``stream``, ``status`` (ok, error)
``streamgraph_ttft_seconds``                           histogram  ``stream``: question arrival -> first
                                                                  answer token (queue wait included)
``streamgraph_ttft_misses_total``                      counter    ``stream``: TTFT past ``slo.ttft_ms``
``streamgraph_kv_bytes``                               gauge      ``stream``: the stream's KV buffer
``streamgraph_kv_slots_in_use``                        gauge      ``stream``: KV slots holding tokens
``streamgraph_source_reconnects_total``                counter    ``stream``: reconnects of a live
                                                                  source (read at scrape time)
=====================================================  =========  =====================================
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Reconnects(Collector):
    """``streamgraph_source_reconnects_total`` of the live sources, read when scraped."""

    def __init__(self):
        self.streams = None               # callable -> [(stream id, reconnects or None)]

    def collect(self):
        family = CounterMetricFamily("streamgraph_source_reconnects", "Reconnects of a live source",
                                     labels=["stream"])
        for sid, n in (self.streams() if self.streams else []):
            if n is not None:
                family.add_metric([sid], n)
        yield family


class ServerMetrics:
    """The server's metrics in their own registry (several servers in one process never
    share series). ``reconnects.streams`` may be set to a callable giving ``(stream id,
    reconnect count or None)`` pairs."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.reconnects = _Reconnects()
        r.register(self.reconnects)
        self.streams = Gauge("streamgraph_streams", "Streams being served", registry=r)
        self.frames = Counter("streamgraph_frames_total", "Sampled frames by decision",
                              ["stream", "decision"], registry=r)
        self.misses = Counter("streamgraph_deadline_misses_total",
                              "Frames that ran past their deadline, by the stage that overran",
                              ["stream", "stage"], registry=r)
        self.latency = Histogram("streamgraph_frame_latency_seconds", "Capture to end of a frame that ran",
                                 ["stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("streamgraph_stage_seconds", "Time per stage of a frame that ran",
                               ["stream", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.questions = Counter("streamgraph_questions_total", "Questions answered, by status",
                                 ["stream", "status"], registry=r)
        self.ttft = Histogram("streamgraph_ttft_seconds", "Question arrival to first answer token",
                              ["stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_misses = Counter("streamgraph_ttft_misses_total", "Questions whose TTFT exceeded slo.ttft_ms",
                                   ["stream"], registry=r)
        self.kv_bytes = Gauge("streamgraph_kv_bytes", "Bytes of the stream's KV buffer", ["stream"], registry=r)
        self.kv_slots = Gauge("streamgraph_kv_slots_in_use", "KV slots holding tokens", ["stream"], registry=r)
        self._labelled = (self.frames, self.misses, self.latency, self.stage, self.questions, self.ttft,
                          self.ttft_misses, self.kv_bytes, self.kv_slots)

    def stream_added(self, stream: str, kv_bytes: int, slots_in_use: int, n_streams: int) -> None:
        self.streams.set(n_streams)
        self.kv_bytes.labels(stream).set(kv_bytes)
        self.kv_slots.labels(stream).set(slots_in_use)
        for decision in ("run", "drop", "error"):      # zeros exported from the start
            self.frames.labels(stream, decision)
        for status in ("ok", "error"):
            self.questions.labels(stream, status)
        self.latency.labels(stream)
        self.ttft.labels(stream)
        self.ttft_misses.labels(stream)

    def stream_removed(self, stream: str, n_streams: int) -> None:
        self.streams.set(n_streams)
        for m in self._labelled:
            m.remove_by_labels({"stream": stream})

    def frame(self, stream: str, rec) -> None:
        """Count one finished :class:`~streamgraph.runtime.metrics.FrameRecord`."""
        self.frames.labels(stream, rec.decision).inc()
        self.kv_slots.labels(stream).set(rec.slots_in_use)
        if rec.decision != "run":
            return
        if rec.deadline_met is False:
            self.misses.labels(stream, rec.overran or "-").inc()
        for s, ms in rec.stage_ms.items():
            self.stage.labels(stream, s).observe(ms / 1000.0)
        if rec.latency_ms is not None:
            self.latency.labels(stream).observe(rec.latency_ms / 1000.0)

    def question(self, stream: str, rec) -> None:
        """Count one finished :class:`~streamgraph.runtime.metrics.QuestionRecord`."""
        self.questions.labels(stream, "error" if rec.error else "ok").inc()
        self.kv_slots.labels(stream).set(rec.slots_in_use)
        if rec.ttft_ms is not None:
            self.ttft.labels(stream).observe(rec.ttft_ms / 1000.0)
            if rec.ttft_met is False:
                self.ttft_misses.labels(stream).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
