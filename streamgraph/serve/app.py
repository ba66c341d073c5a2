"""The HTTP API of ``streamgraph serve`` (FastAPI; answers streamed as Server-Sent Events).

==========================================  ======================================================
``GET  /healthz``                           liveness, no token needed: ``{"status": "ok", "streams": n}``
``GET  /metrics``                           Prometheus text format (:mod:`streamgraph.serve.metrics`)
``POST /v1/streams``                        add a stream: ``{"source", "bundle"|"graph", "id", "fps",
                                            "speed", "loop", "overload", "max_frames"}`` -> 201 + info
``GET  /v1/streams``                        ``{"streams": [info, ...]}``
``GET  /v1/streams/{id}``                   one stream's info (state, frame and question counts, KV)
``DELETE /v1/streams/{id}``                 stop and remove a stream
``POST /v1/streams/{id}/ask``               ``{"question", "max_new_tokens", "stream": true}``: SSE events
                                            ``token`` (``{"text"}``) ... then ``done`` (the question's
                                            record) or ``error``; ``"stream": false`` -> one JSON
``POST /v1/chat/completions``               OpenAI-compatible; ``model`` names the stream; the last
                                            user message is the question; ``stream`` true or false
``GET  /v1/models``                         the streams, as OpenAI models
==========================================  ======================================================

Every error is a 4xx/5xx JSON body in OpenAI's shape, one line of message:
``{"error": {"message", "type", "param", "code"}}`` — 400 invalid request (validation, bad
source or bundle), 401 missing or wrong token, 404 unknown stream or path, 409 conflict
(duplicate id, failed stream), 413 body over ``max_body_bytes``, 429 too many streams or
questions waiting, 500 an engine failed on the question, 504 no answer in time.

With a ``token``, every request except ``/healthz`` needs ``Authorization: Bearer TOKEN``
(what OpenAI clients send as their ``api_key``).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from streamgraph.errors import StreamgraphError
from streamgraph.runtime.scheduler import OVERLOAD_POLICIES
from streamgraph.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from streamgraph.serve.streams import Busy, StreamConfig, StreamConflict, StreamManager, StreamNotFound

DEFAULT_MAX_BODY = 1 << 20            # bytes of a request body
DEFAULT_ANSWER_TIMEOUT = 120.0        # seconds without a new piece of answer before giving up (504)
MAX_QUESTION_CHARS = 8192
MAX_NEW_TOKENS = 4096
SSE_PING_S = 15
OPEN_PATHS = ("/healthz",)            # reachable without the token


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped JSON body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, " ".join(message.split()), type, param, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 409: "conflict_error", 413: "request_too_large",
                 429: "rate_limit_error", 500: "server_error", 504: "timeout_error"}


def _error(status: int, message: str, **kw) -> ApiError:
    return ApiError(status, message, kw.pop("type", _STATUS_TYPES.get(status, "invalid_request_error")), **kw)


def _from_stream_error(e: BaseException, *, model: bool = False) -> ApiError:
    if isinstance(e, StreamNotFound):
        return _error(404, str(e), param="model" if model else None,
                      code="model_not_found" if model else "stream_not_found")
    if isinstance(e, StreamConflict):
        return _error(409, str(e))
    if isinstance(e, Busy):
        return _error(429, str(e))
    return _error(400, " ".join(str(e).split()))


# ---------------------------------------------------------------------------- guard (ASGI)
class _Guard:
    """Outermost ASGI layer: bearer-token check (constant-time), then the body-size limit —
    refused at once on ``Content-Length``, and counted while reading for chunked bodies."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.token is not None and scope.get("path") not in OPEN_PATHS:
            got = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, value = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                err = _error(401, "missing or wrong API token: send 'Authorization: Bearer TOKEN'",
                             code="invalid_api_key")
                return await err.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _error(400, "Content-Length is not a number").response()(scope, receive, send)
            if n > self.max_body:
                return await _error(413, f"request body of {n} bytes is over the limit of {self.max_body} bytes"
                                    ).response()(scope, receive, send)
        seen = 0
        limit = self.max_body

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        return await self.app(scope, counted, send)


# ---------------------------------------------------------------------------- request bodies
def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or blank")
    return v


class StreamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, description="stream id (default s1, s2, ...)", max_length=64)
    source: str = Field(..., min_length=1, max_length=4096, description="video file path, or a live source")
    bundle: str | None = Field(None, max_length=4096, description="compiled bundle directory")
    graph: str | None = Field(None, max_length=4096, description="graph file, compiled first")
    fps: float | None = Field(None, gt=0, le=1000, description="sampling fps (default: the graph's)")
    speed: float = Field(1.0, gt=0, le=1000, description="replay a file this many times faster")
    loop: bool = Field(False, description="replay a file forever")
    overload: Literal[OVERLOAD_POLICIES] | None = None
    max_frames: int | None = Field(None, ge=1, le=10**9)

    @field_validator("source")
    @classmethod
    def _source_not_blank(cls, v: str) -> str:
        return _not_blank(v)


class AskBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(..., max_length=MAX_QUESTION_CHARS)
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stream: bool = True

    @field_validator("question")
    @classmethod
    def _question_not_blank(cls, v: str) -> str:
        return _not_blank(v)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(..., max_length=32)
    content: str | list[dict] | None = None


class ChatBody(BaseModel):
    """OpenAI chat completion request; fields not listed (temperature, top_p, ...) are
    accepted and ignored (decoding is greedy)."""
    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1, max_length=64)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    n: int = Field(1, ge=1, le=1)
    stream_options: dict | None = None


def _chat_question(body: ChatBody) -> str:
    """The text of the last user message (a string or its text parts)."""
    for i in range(len(body.messages) - 1, -1, -1):
        m = body.messages[i]
        if m.role != "user":
            continue
        if isinstance(m.content, str):
            text = m.content
        elif isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.get("type") != "text":
                    raise _error(400, f"messages.{i}.content: only text parts are supported (got "
                                      f"{str(part.get('type'))[:40]!r}); the stream is the video",
                                 param=f"messages.{i}.content")
                parts.append(str(part.get("text", "")))
            text = "".join(parts)
        else:
            text = ""
        if not text.strip():
            raise _error(400, f"messages.{i}.content: the question is empty", param=f"messages.{i}.content")
        if len(text) > MAX_QUESTION_CHARS:
            raise _error(400, f"messages.{i}.content: the question has {len(text)} characters, over "
                              f"{MAX_QUESTION_CHARS}", param=f"messages.{i}.content")
        return text
    raise _error(400, "messages: no user message to answer", param="messages")


# ---------------------------------------------------------------------------- answers
class _Channel:
    """Carries a ticket's events from the stream's worker thread to the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:             # the loop is gone (server shutting down)
            pass


def _submit(manager: StreamManager, stream_id: str, text: str, max_new: int | None, *, model: bool = False):
    try:
        stream = manager.get(stream_id)
        ch = _Channel()
        ticket = stream.submit(text, max_new, ch.emit)
    except (StreamgraphError, ValueError) as e:
        raise _from_stream_error(e, model=model) from None
    return ticket, ch


async def _events(ticket, ch: _Channel, timeout: float):
    """(kind, value) of an answer until its end; ``("timeout", msg)`` when nothing came for
    ``timeout`` seconds. Abandoning it (client gone) cancels the question."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(ch.queue.get(), timeout)
            except asyncio.TimeoutError:
                yield "timeout", f"no answer from the stream within {timeout:g} s"
                return
            yield kind, value
            if kind != "piece":
                return
    finally:
        ticket.cancel()                   # no-op once it ended


def _end_error(kind: str, value) -> ApiError:
    if kind == "gone":
        return _error(409, value)
    if kind == "timeout":
        return _error(504, value)
    return _error(500, value, type="engine_error")


# ---------------------------------------------------------------------------- the app
def create_app(manager: StreamManager | None = None, *, metrics: ServerMetrics | None = None,
               token: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT, **manager_options):
    """The server's ASGI application.

    ``manager``: the streams (default: a new :class:`StreamManager` with
    ``manager_options``); its frame/question callbacks are wired to ``metrics``. ``token``:
    required as ``Authorization: Bearer TOKEN`` on every request but ``/healthz`` (None: no
    auth, for loopback only; see :func:`streamgraph.serve.check_bind`). ``max_body_bytes``:
    larger request bodies get 413. ``answer_timeout_s``: seconds to wait for each piece of an
    answer before a 504. Streams are stopped when the app shuts down."""
    metrics = metrics or ServerMetrics()
    if manager is None:
        manager = StreamManager(**manager_options)
    _wire(manager, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(manager.close)

    app = FastAPI(title="streamgraph", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager, app.state.metrics = manager, metrics

    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_req, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            where, msg = "", f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return _error(400, f"{where + ': ' if where else ''}{msg}{more}", param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return _error(e.status_code, detail).response(getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_req, e: Exception):          # a bug: one line, never a traceback to the client
        return _error(500, f"internal error: {type(e).__name__}: {' '.join(str(e).split())}").response()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "streams": len(manager.list())}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/streams", status_code=201)
    async def add_stream(body: StreamCreate):
        if body.bundle is not None and body.graph is not None:
            raise _error(400, "give either bundle or graph, not both", param="bundle")
        cfg = StreamConfig(source=body.source, bundle=body.bundle, graph=body.graph, fps=body.fps,
                           speed=body.speed, loop=body.loop, overload=body.overload,
                           max_frames=body.max_frames, backend=None)
        if cfg.bundle is None and cfg.graph is None and manager.default_bundle is None \
                and manager.default_graph is None:
            raise _error(400, "bundle: this server has no default bundle; name one (or a graph)", param="bundle")
        try:
            stream = await run_in_threadpool(manager.add, cfg, body.id)
        except (StreamgraphError, ValueError, OSError) as e:
            raise _from_stream_error(e) from None
        return stream.info()

    @app.get("/v1/streams")
    async def list_streams():
        return {"streams": [s.info() for s in manager.list()]}

    @app.get("/v1/streams/{stream_id}")
    async def get_stream(stream_id: str):
        try:
            return manager.get(stream_id).info()
        except StreamNotFound as e:
            raise _from_stream_error(e) from None

    @app.delete("/v1/streams/{stream_id}")
    async def delete_stream(stream_id: str):
        try:
            await run_in_threadpool(manager.remove, stream_id)
        except StreamNotFound as e:
            raise _from_stream_error(e) from None
        return {"id": stream_id, "deleted": True}

    @app.post("/v1/streams/{stream_id}/ask")
    async def ask(stream_id: str, body: AskBody):
        ticket, ch = _submit(manager, stream_id, body.question, body.max_new_tokens)
        events = _events(ticket, ch, answer_timeout_s)
        if not body.stream:
            async for kind, value in events:
                if kind == "done":
                    return {"stream": stream_id, **value}
                if kind != "piece":
                    raise _end_error(kind, value)

        async def sse():
            async for kind, value in events:
                if kind == "piece":
                    yield {"event": "token", "data": json.dumps({"text": value})}
                elif kind == "done":
                    yield {"event": "done", "data": json.dumps({"stream": stream_id, **value})}
                else:
                    err = _end_error(kind, value)
                    yield {"event": "error", "data": json.dumps({"error": {"message": err.message, "type": err.type,
                                                                           "code": err.status}})}

        return EventSourceResponse(sse(), ping=SSE_PING_S)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": s.id, "object": "model", "created": 0, "owned_by": "streamgraph"}
                                           for s in manager.list()]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        question = _chat_question(body)
        max_new = body.max_completion_tokens or body.max_tokens
        ticket, ch = _submit(manager, body.model, question, max_new, model=True)
        events = _events(ticket, ch, answer_timeout_s)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            pieces = []
            async for kind, value in events:
                if kind == "piece":
                    pieces.append(value)
                elif kind == "done":
                    return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": value["answer"]},
                                         "finish_reason": value["finish_reason"], "logprobs": None}],
                            "usage": _usage(value), "streamgraph": _extra(value)}
                else:
                    raise _end_error(kind, value)

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
            return {"data": json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                        "model": body.model, "choices": [{"index": 0, "delta": delta,
                                                                          "finish_reason": finish,
                                                                          "logprobs": None}], **extra})}

        async def sse():
            yield chunk({"role": "assistant", "content": ""})
            async for kind, value in events:
                if kind == "piece":
                    yield chunk({"content": value})
                elif kind == "done":
                    yield chunk({}, value["finish_reason"], streamgraph=_extra(value))
                    if include_usage:
                        yield {"data": json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                                   "model": body.model, "choices": [], "usage": _usage(value)})}
                else:
                    err = _end_error(kind, value)
                    yield {"data": json.dumps({"error": {"message": err.message, "type": err.type,
                                                         "code": err.status}})}
            yield {"data": "[DONE]"}

        return EventSourceResponse(sse(), ping=SSE_PING_S)

    return _Guard(app, token, max_body_bytes)


def _usage(rec: dict) -> dict:
    return {"prompt_tokens": rec["prompt_tokens"], "completion_tokens": rec["new_tokens"],
            "total_tokens": rec["prompt_tokens"] + rec["new_tokens"]}


def _extra(rec: dict) -> dict:
    return {k: rec[k] for k in ("asked_at", "ttft_ms", "ttft_met", "slots_in_use")}


def _wire(manager: StreamManager, metrics: ServerMetrics) -> None:
    """Route the manager's records into the metrics (chaining callbacks already set)."""
    prev_frame, prev_question, prev_remove = manager.on_frame, manager.on_question, manager.on_remove

    def on_frame(sid, rec):
        metrics.frame(sid, rec)
        if prev_frame:
            prev_frame(sid, rec)

    def on_question(sid, rec):
        metrics.question(sid, rec)
        if prev_question:
            prev_question(sid, rec)

    def on_remove(sid):
        metrics.stream_removed(sid, len(manager.list()))
        if prev_remove:
            prev_remove(sid)

    def on_add(stream):
        metrics.stream_added(stream.id, stream.session.kv_bytes, stream.session.slots_in_use, len(manager.list()))
        if prev_add:
            prev_add(stream)

    prev_add = manager.on_add
    manager.on_frame, manager.on_question, manager.on_remove, manager.on_add = on_frame, on_question, on_remove, on_add
    metrics.reconnects.streams = lambda: [(s.id, s.reconnects()) for s in manager.list()]
    for stream in manager.list():          # streams added before the app was made
        metrics.stream_added(stream.id, stream.session.kv_bytes, stream.session.slots_in_use, len(manager.list()))
