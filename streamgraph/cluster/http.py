"""The cluster's HTTP surface: ``/metrics`` (Prometheus), ``/healthz`` and the stream API.

The metric names are those of ``streamgraph serve`` (docs/live.md, "Metrics"), each stream
series labelled with ``actor`` too, summed over every placement of the stream (a failover
does not reset a counter), plus per-actor and cluster series:

=============================================  =========  ===============================================
metric                                         type       labels / meaning
=============================================  =========  ===============================================
``streamgraph_streams``                        gauge      streams served by the cluster
``streamgraph_frames_total``                   counter    ``stream``, ``actor``, ``decision`` (run, drop,
                                                          error, skipped: overwritten in the camera
                                                          before the executor took it, lost: in a failover)
``streamgraph_deadline_misses_total``          counter    ``stream``, ``actor``, ``stage``
``streamgraph_frame_latency_seconds``          histogram  ``stream``, ``actor``: capture -> end of a frame
``streamgraph_questions_total``                counter    ``stream``, ``actor``, ``status`` (ok, error)
``streamgraph_ttft_seconds``                   histogram  ``stream``, ``actor``
``streamgraph_ttft_misses_total``              counter    ``stream``, ``actor``
``streamgraph_kv_bytes``                       gauge      ``stream``, ``actor``: the stream's KV buffer
``streamgraph_kv_slots_in_use``                gauge      ``stream``, ``actor``
``streamgraph_stream_failovers_total``         counter    ``stream``: times it was placed again
``streamgraph_actor_up``                       gauge      ``actor``, ``node``: 1 alive, 0 dead
``streamgraph_actor_stream_slots``             gauge      ``actor``: planned capacity (streams)
``streamgraph_actor_streams``                  gauge      ``actor``: streams placed on it
``streamgraph_actor_frame_cost_seconds``       gauge      ``actor``, ``quantile`` (0.5, 0.99): measured
``streamgraph_cluster_stream_slots``           gauge      planned capacity of the live actors
``streamgraph_cluster_admissions_total``       counter    ``result`` (admitted, refused)
``streamgraph_cluster_failovers_total``        counter    actors lost and their streams placed again
=============================================  =========  ===============================================
"""
# no `from __future__ import annotations`: FastAPI reads the request models defined in create_app

from streamgraph.cluster.worker import LATENCY_BUCKETS


def collector(cluster):
    """A prometheus_client collector that reads ``cluster.snapshot()`` at scrape time."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector

    def hist(name, doc, labels, rows):
        fam = HistogramMetricFamily(name, doc, labels=labels)
        for values, buckets, total in rows:
            acc, out = 0, []
            for le, n in zip(LATENCY_BUCKETS, buckets):
                acc += n
                out.append((repr(float(le)), acc))
            acc += buckets[len(LATENCY_BUCKETS)] if len(buckets) > len(LATENCY_BUCKETS) else 0
            out.append(("+Inf", acc))
            fam.add_metric(values, out, total)
        return fam

    class _Cluster(Collector):
        def collect(self):
            snap = cluster.snapshot()
            streams, actors = snap["streams"], snap["actors"]
            g = GaugeMetricFamily("streamgraph_streams", "Streams served by the cluster")
            g.add_metric([], len(streams))
            yield g
            frames = CounterMetricFamily("streamgraph_frames", "Sampled frames by decision",
                                         labels=["stream", "actor", "decision"])
            misses = CounterMetricFamily("streamgraph_deadline_misses",
                                         "Frames that ran past their deadline, by the stage that overran",
                                         labels=["stream", "actor", "stage"])
            questions = CounterMetricFamily("streamgraph_questions", "Questions answered, by status",
                                            labels=["stream", "actor", "status"])
            ttft_miss = CounterMetricFamily("streamgraph_ttft_misses", "Questions whose TTFT exceeded slo.ttft_ms",
                                            labels=["stream", "actor"])
            kv = GaugeMetricFamily("streamgraph_kv_bytes", "Bytes of the stream's KV buffer", labels=["stream", "actor"])
            slots = GaugeMetricFamily("streamgraph_kv_slots_in_use", "KV slots holding tokens",
                                      labels=["stream", "actor"])
            fo = CounterMetricFamily("streamgraph_stream_failovers", "Times the stream was placed again",
                                     labels=["stream"])
            lat, ttft = [], []
            for sid, s in sorted(streams.items()):
                a, t = s["actor"] or "-", s["totals"]
                for d in ("run", "drop", "error", "skipped", "lost"):
                    frames.add_metric([sid, a, d], t.get(d, 0))
                for stage, n in sorted(t["misses_by_stage"].items()):
                    misses.add_metric([sid, a, stage], n)
                questions.add_metric([sid, a, "ok"], t["questions_ok"])
                questions.add_metric([sid, a, "error"], t["questions_error"])
                ttft_miss.add_metric([sid, a], t["ttft_misses"])
                kv.add_metric([sid, a], s["kv_bytes"])
                slots.add_metric([sid, a], s["slots_in_use"])
                fo.add_metric([sid], s["failovers"])
                if t["latency_buckets"]:
                    lat.append(([sid, a], t["latency_buckets"], t["latency_sum"]))
                if t["ttft_buckets"]:
                    ttft.append(([sid, a], t["ttft_buckets"], t["ttft_sum"]))
            yield from (frames, misses, questions, ttft_miss, kv, slots, fo)
            yield hist("streamgraph_frame_latency_seconds", "Capture to end of a frame that ran", ["stream", "actor"], lat)
            yield hist("streamgraph_ttft_seconds", "Question arrival to first answer token", ["stream", "actor"], ttft)
            up = GaugeMetricFamily("streamgraph_actor_up", "1 while the actor is alive", labels=["actor", "node"])
            aslots = GaugeMetricFamily("streamgraph_actor_stream_slots", "Planned streams of the actor", labels=["actor"])
            astreams = GaugeMetricFamily("streamgraph_actor_streams", "Streams placed on the actor", labels=["actor"])
            cost = GaugeMetricFamily("streamgraph_actor_frame_cost_seconds", "Measured executor time of one frame",
                                     labels=["actor", "quantile"])
            for name, a in sorted(actors.items()):
                up.add_metric([name, str(a["node"])], 1 if a["up"] else 0)
                aslots.add_metric([name], a["slots"])
                astreams.add_metric([name], a["streams"])
                for q, key in (("0.5", "p50"), ("0.99", "p99")):
                    if key in a["frame_ms"]:
                        cost.add_metric([name, q], a["frame_ms"][key] / 1000.0)
            yield from (up, aslots, astreams, cost)
            cap = GaugeMetricFamily("streamgraph_cluster_stream_slots", "Planned streams of the live actors")
            cap.add_metric([], snap["capacity"])
            adm = CounterMetricFamily("streamgraph_cluster_admissions", "Streams admitted or refused", labels=["result"])
            for k, v in snap["admissions"].items():
                adm.add_metric([k], v)
            fail = CounterMetricFamily("streamgraph_cluster_failovers", "Actors lost and their streams placed again")
            fail.add_metric([], snap["failovers"])
            yield from (cap, adm, fail)

    return _Cluster()


def create_app(cluster, *, token: str | None = None):
    """A FastAPI app over ``cluster``: ``GET /healthz``, ``GET /metrics``, ``GET /v1/cluster``
    (actors, plans, load), ``GET|POST /v1/streams``, ``GET|DELETE /v1/streams/{id}``,
    ``POST /v1/streams/{id}/ask`` (``{"question", "max_new_tokens"?}`` -> the question's
    record, answered on the actor holding the stream) and a non-streamed
    ``POST /v1/chat/completions`` (``model`` = stream id). Errors are OpenAI-shaped JSON
    (400 bad request, 401 token, 404 unknown stream, 409 refused at admission: the reason in
    one line). ``token``: every request but ``/healthz`` must send ``Authorization: Bearer``."""
    import hmac
    import time
    import uuid

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from pydantic import BaseModel, Field

    from streamgraph.cluster.placement import AdmissionError
    from streamgraph.errors import StreamgraphError

    registry = CollectorRegistry()
    registry.register(collector(cluster))
    app = FastAPI(title="streamgraph cluster")

    def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                            status_code=status)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if token and request.url.path != "/healthz":
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                return error(401, "missing or wrong API token", "authentication_error")
        return await call_next(request)

    class StreamBody(BaseModel):
        id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
        source: str = "synthetic"

    class AskBody(BaseModel):
        question: str = Field(min_length=1, max_length=8192)
        max_new_tokens: int | None = Field(default=None, ge=1, le=4096)

    class ChatMessage(BaseModel):
        role: str
        content: str | list

    class ChatBody(BaseModel):
        model: str
        messages: list[ChatMessage]
        max_tokens: int | None = Field(default=None, ge=1, le=4096)

    def known(sid: str):
        snap = cluster.snapshot()
        if sid not in snap["streams"]:
            return None
        return snap["streams"][sid]

    @app.get("/healthz")
    async def healthz():
        snap = cluster.snapshot()
        return {"status": "ok", "streams": len(snap["streams"]),
                "actors": sum(1 for a in snap["actors"].values() if a["up"])}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/cluster")
    async def cluster_info():
        snap = cluster.snapshot()
        return {k: snap[k] for k in ("actors", "capacity", "admissible", "admissions", "failovers", "policy", "fps")}

    @app.get("/v1/streams")
    async def list_streams():
        return {"streams": [{"id": sid, **s} for sid, s in sorted(cluster.snapshot()["streams"].items())]}

    @app.post("/v1/streams", status_code=201)
    async def add_stream(body: StreamBody):
        try:
            return await run_in_threadpool(cluster.add_stream, body.id, body.source)
        except AdmissionError as e:
            return error(409, str(e), code="admission_refused")
        except (StreamgraphError, ValueError) as e:
            return error(400, " ".join(str(e).split()))

    @app.get("/v1/streams/{sid}")
    async def get_stream(sid: str):
        s = known(sid)
        return error(404, f"no stream {sid[:80]!r}", code="stream_not_found") if s is None else {"id": sid, **s}

    @app.delete("/v1/streams/{sid}")
    async def delete_stream(sid: str):
        if known(sid) is None:
            return error(404, f"no stream {sid[:80]!r}", code="stream_not_found")
        rep = await run_in_threadpool(cluster.remove_stream, sid)
        return {"id": sid, "deleted": True, "summary": rep.get("summary")}

    async def _ask(sid: str, text: str, max_new: int | None):
        if known(sid) is None:
            return None, error(404, f"no stream {sid[:80]!r}", code="model_not_found")
        try:
            return await run_in_threadpool(cluster.ask, sid, text, max_new), None
        except (StreamgraphError, ValueError) as e:
            return None, error(500, " ".join(str(e).split()), "server_error")

    @app.post("/v1/streams/{sid}/ask")
    async def ask(sid: str, body: AskBody):
        rec, err = await _ask(sid, body.question, body.max_new_tokens)
        return err or rec

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            return error(400, "messages: no user message to answer")
        content = users[-1].content
        text = content if isinstance(content, str) else " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not text.strip():
            return error(400, "messages: the last user message has no text")
        rec, err = await _ask(body.model, text, body.max_tokens)
        if err:
            return err
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": rec["answer"]},
                             "finish_reason": "length" if body.max_tokens and rec["new_tokens"] >= body.max_tokens
                             else "stop"}],
                "usage": {"prompt_tokens": rec["prompt_tokens"], "completion_tokens": rec["new_tokens"],
                          "total_tokens": rec["prompt_tokens"] + rec["new_tokens"]},
                "streamgraph": {"actor": rec.get("actor"), "ttft_ms": rec["ttft_ms"], "ttft_met": rec["ttft_met"]}}

    return app
