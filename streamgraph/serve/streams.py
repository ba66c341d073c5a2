"""Streams of the server: one served stream = a session + a runner + the thread that runs it.

:class:`ServedStream` owns one :class:`~streamgraph.runtime.session.Session` (its own KV
buffer, cache policy and scheduler) and one :class:`~streamgraph.runtime.stream.StreamRunner`
over its source, on a wall clock started when the stream starts. A thread of the stream runs
the runner: a file is replayed at its capture rate (``speed`` times faster), a live source
(URL, device, pipe) is read by its own capture thread, and the overload policy drops what
cannot make its deadline. Questions come from HTTP handlers through
:meth:`StreamRunner.ask <streamgraph.runtime.stream.StreamRunner.ask>`: each arrives at the
stream clock's current time and is answered when the executor is next free, ahead of pending
frames, its pieces handed back as they are decoded. Its TTFT (and ``ttft_met`` against
``slo.ttft_ms``) therefore includes the wait for the frame in progress.

Streams of the same bundle (and backend) share its engines, loaded once
(:class:`~streamgraph.runtime.session.Engines`); the engines are released with the last
stream on them.

:class:`StreamManager` holds a server's streams by id, bounded in number, each with at most
``max_pending`` questions waiting. Torch-free like the runtime (a ``graph`` given instead of a
``bundle`` is compiled first, which needs the ``compile`` extra).
"""
from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from streamgraph.errors import StreamgraphError
from streamgraph.runtime.stream import WallClock
from streamgraph.runtime.metrics import RECORDS_FILE, record_dict
from streamgraph.runtime.stream import check_question, error_text

log = logging.getLogger(__name__)

STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MAX_STREAMS = 8
DEFAULT_MAX_PENDING = 16          # questions waiting per stream


class StreamNotFound(StreamgraphError):
    """No stream has this id."""


class StreamConflict(StreamgraphError):
    """The request conflicts with the streams' state (duplicate id, stream failed or stopped)."""


class Busy(StreamgraphError):
    """A bound was reached (too many streams, too many questions waiting on a stream)."""


@dataclass
class StreamConfig:
    """What a stream is made of. ``source``: a video file (replayed at its capture rate,
    ``speed`` times faster; ``loop`` replays it forever) or a live source
    (:func:`~streamgraph.runtime.live.open_source`: URL, ``/dev/videoN``, FIFO).
    ``bundle``: a compiled bundle directory, or ``graph``: a graph file compiled first.
    ``fps`` (frames/s, default the graph's ``stream.fps``), ``overload`` (default the graph's),
    ``max_frames`` (stop after this many sampled frames; per pass with ``loop``),
    ``backend`` (None: the manager's)."""

    source: str
    bundle: str | None = None
    graph: str | None = None
    fps: float | None = None
    speed: float = 1.0
    loop: bool = False
    overload: str | None = None
    max_frames: int | None = None
    backend: str | None = None


def _looped(src, step: float) -> Iterator:
    """``src`` replayed forever: each pass starts ``step`` seconds (one frame interval) after
    the last frame of the previous pass, in stream time; ``index`` keeps counting."""
    from streamgraph.runtime.sources import Frame

    offset, k = 0.0, 0
    while True:
        last = None
        for f in src:
            last = f.timestamp
            yield Frame(image=f.image, timestamp=f.timestamp + offset, index=k, source_index=f.source_index)
            k += 1
        if last is None:
            return
        offset += last + step


def open_source(cfg: StreamConfig, session) -> tuple[Iterable, object]:
    """``(frames, source)``: the frames of ``cfg.source`` sized for ``session``'s bundle, and
    the source object. Raises SourceError / ValueError (one line) for a source that cannot be
    used."""
    from streamgraph.runtime import live, sources

    fps = cfg.fps or session.bundle.manifest["stream"]["fps"]
    size = tuple(session.plan.image_size) if session.plan.resample == "ffmpeg_bilinear" else None
    src = live.open_source(cfg.source, fps=fps, size=size, max_frames=cfg.max_frames,
                           **_live_options(cfg.source, session.bundle.manifest))
    if not cfg.loop:
        return src, src
    if not isinstance(src, sources.VideoSource):
        raise ValueError(f"{cfg.source}: loop applies to video files only")
    return _looped(src, 1.0 / (src.fps or src.native_fps())), src


def _live_options(source: str, manifest: dict) -> dict:
    """Keyword arguments of :func:`streamgraph.runtime.live.live` from the graph's
    ``stream.live`` section (reconnect backoff, timeouts, FFmpeg format and options), for a
    live ``source``; {} for a file or a graph without the section."""
    section = ((manifest.get("graph") or {}).get("stream") or {}).get("live")
    if not section:
        return {}
    from streamgraph.runtime import live

    if not live.is_live(source):
        return {}
    return live.live_options(section)


def _is_live(source) -> bool:
    return bool(getattr(source, "live", False)) or hasattr(source, "latest")


class Ticket:
    """A question handed to a stream (:meth:`ServedStream.submit`). ``emit(kind, value)`` is
    called from the stream's thread: ``("piece", str)`` for each piece of the answer as it is
    decoded, then exactly one of ``("done", dict)`` (the question's record as a dict, with
    ``finish_reason`` ``stop`` or ``length``), ``("error", str)`` (an engine failed on it, one
    line) or ``("gone", str)`` (the stream stopped or failed before answering it).
    :meth:`cancel` (the client went away) withdraws it, or stops decoding after the token in
    progress."""

    def __init__(self, answer):
        self.answer = answer

    def cancel(self) -> None:
        if not self.answer.done() and not self.answer.cancel():
            self.answer.stop()


class ServedStream:
    """One stream of the server (see the module docstring). Build with :meth:`start`.

    ``on_frame(id, FrameRecord)`` and ``on_question(id, QuestionRecord)`` are called from
    the stream's thread as records finish (metrics). ``records``: a directory where the
    stream appends every record to ``<id>/records.jsonl`` as it finishes."""

    def __init__(self, id: str, cfg: StreamConfig, session, frames: Iterable, source,
                 on_frame: Callable | None = None, on_question: Callable | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING, records: Path | None = None):
        from streamgraph.runtime.stream import StreamRunner

        self.id, self.cfg, self.session, self.source = id, cfg, session, source
        self._on_frame, self._on_question = on_frame, on_question
        self.clock = WallClock()                  # stream time starts now (after calibration)
        self.live = _is_live(source)
        if self.live:
            source.clock = self.clock             # live capture times on the stream's clock
        self.records_path = None
        if records is not None:
            self.records_path = Path(records) / id / RECORDS_FILE
            self.records_path.parent.mkdir(parents=True, exist_ok=True)
            session.write_records(self.records_path)
        self.runner = StreamRunner([(session, frames)], speed=cfg.speed, on_frame=self._frame_done,
                                   on_answer=self._answered, clock=self.clock, calibrate=False, keep_open=True)
        self.max_pending = max_pending
        self.error: str | None = None
        self.counts = {"run": 0, "drop": 0, "error": 0, "misses": 0, "questions": 0, "questions_failed": 0}
        self.slots_in_use = session.slots_in_use
        self._waiting = 0                          # questions submitted and not finished
        self._lock = threading.Lock()              # guards what handlers read
        self._thread = threading.Thread(target=self._work, name=f"streamgraph-serve-{id}", daemon=True)

    @classmethod
    def start(cls, id: str, cfg: StreamConfig, session, *, records: Path | None = None,
              on_frame: Callable | None = None, on_question: Callable | None = None,
              max_pending: int = DEFAULT_MAX_PENDING) -> "ServedStream":
        """Open the source for ``session``, calibrate the session's stage costs and start the
        stream's thread. Blocks for the calibration. Raises StreamgraphError / ValueError (one
        line) for a source that cannot be used."""
        frames, source = open_source(cfg, session)
        session.calibrate()
        stream = cls(id, cfg, session, frames, source, on_frame=on_frame, on_question=on_question,
                     max_pending=max_pending, records=records)
        stream._thread.start()
        return stream

    # ------------------------------------------------------------------ the stream's thread
    def _frame_done(self, _stream: int, rec) -> None:
        with self._lock:
            self.counts[rec.decision] = self.counts.get(rec.decision, 0) + 1
            self.counts["misses"] += rec.deadline_met is False
            self.slots_in_use = rec.slots_in_use
        if self._on_frame:
            self._on_frame(self.id, rec)

    def _answered(self, _q, rec) -> None:
        with self._lock:
            self.counts["questions"] += 1
            self.counts["questions_failed"] += bool(rec.error)
            self.slots_in_use = rec.slots_in_use
        if self._on_question:
            self._on_question(self.id, rec)

    def _work(self) -> None:
        try:
            self.runner.run()
        except BaseException as e:          # a source or engine error ends the stream, in one line
            with self._lock:
                self.error = error_text(e)
            log.warning("stream %s failed: %s", self.id, self.error)
        finally:
            self.session.close_records()
            close = getattr(self.source, "close", None)
            if self.live and close is not None:
                try:
                    close()
                except Exception:            # a live source that will not close cleanly
                    log.exception("stream %s: closing the source failed", self.id)

    # ------------------------------------------------------------------ handlers' side
    def submit(self, text: str, max_new_tokens: int | None, emit: Callable[[str, object], None]) -> Ticket:
        """Ask a question (from any thread); its answer goes to ``emit`` (see :class:`Ticket`).

        Raises ValueError for an empty question or a bad ``max_new_tokens``, StreamConflict
        for a failed or stopped stream, Busy when ``max_pending`` questions are waiting."""
        from streamgraph.errors import StreamClosedError

        check_question(text, max_new_tokens)
        with self._lock:
            if self.error is not None:
                raise StreamConflict(f"stream {self.id} failed: {self.error}")
            if self._waiting >= self.max_pending:
                raise Busy(f"stream {self.id} has {self._waiting} questions waiting; retry later")
            self._waiting += 1
        max_new = max_new_tokens or self.session.plan.max_new_tokens

        def done(answer) -> None:
            with self._lock:
                self._waiting -= 1
            if answer.cancelled():
                emit("gone", "question withdrawn")
                return
            e = answer.exception()
            if isinstance(e, StreamClosedError):
                emit("gone", f"stream {self.id}: {' '.join(str(e).split())}")
            elif e is not None:
                emit("error", error_text(e))
            elif answer.record is None:
                emit("error", "the question was not answered")
            else:
                out = record_dict(answer.record)
                out["finish_reason"] = "length" if answer.record.new_tokens >= max_new else "stop"
                emit("done", out)

        try:
            answer = self.runner.ask(text, 0, max_new_tokens=max_new_tokens,
                                     on_piece=lambda piece: emit("piece", piece), on_done=done)
        except StreamClosedError as e:
            with self._lock:
                self._waiting -= 1
            raise StreamConflict(f"stream {self.id}: {' '.join(str(e).split())}") from None
        except BaseException:
            with self._lock:
                self._waiting -= 1
            raise
        return Ticket(answer)

    @property
    def state(self) -> str:
        """``running`` (frames flowing), ``ended`` (the source ended; questions are still
        answered about what it saw) or ``failed`` (:attr:`error` says why; questions refused)."""
        if self.error is not None:
            return "failed"
        feeder = self.runner.feeders[0]
        return "ended" if getattr(feeder, "finished", getattr(feeder, "done", False)) else "running"

    def reconnects(self) -> int | None:
        """Reconnects of a live source so far (None for a file)."""
        stats = getattr(self.source, "stats", None) if self.live else None
        return int(stats.get("reconnects", 0)) if isinstance(stats, dict) else None

    def info(self) -> dict:
        """What ``GET /v1/streams`` shows of this stream (safe from any thread)."""
        s = self.session
        with self._lock:
            counts = dict(self.counts)
            error, slots, waiting = self.error, self.slots_in_use, self._waiting
        return {"id": self.id, "state": self.state, "error": error, "source": self.cfg.source, "live": self.live,
                "reconnects": self.reconnects(),
                "bundle": str(s.bundle.path), "name": s.bundle.name, "backend": s.backend.name,
                "fps": self.cfg.fps or s.bundle.manifest["stream"]["fps"], "speed": self.cfg.speed,
                "loop": self.cfg.loop, "overload": s.scheduler.overload,
                "frame_deadline_ms": s.scheduler.frame_deadline * 1000.0, "ttft_ms": s.scheduler.ttft * 1000.0,
                "frames": {"sampled": counts["run"] + counts["drop"] + counts["error"], "run": counts["run"],
                           "dropped": counts["drop"], "errors": counts["error"],
                           "deadline_misses": counts["misses"]},
                "questions": {"answered": counts["questions"] - counts["questions_failed"],
                              "failed": counts["questions_failed"], "waiting": waiting},
                "kv_bytes": s.kv_bytes, "kv_slots_in_use": slots, "stream_time_s": self.clock.now(),
                "records": str(self.records_path) if self.records_path else None}

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the stream after the frame or answer token in progress; close its records file
        and source. Questions still waiting end with ``gone``."""
        self.runner.stop()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class StreamManager:
    """The server's streams by id (at most ``max_streams``), each a :class:`ServedStream`.

    ``default_bundle`` / ``default_graph`` serve requests that name neither; ``records``: a
    directory where each stream writes ``<id>/records.jsonl``; ``history``: records of each
    kind kept in memory per stream; ``backend``: engine runtime of the streams.

    Callbacks, called as things happen: ``on_frame(id, FrameRecord)`` and
    ``on_question(id, QuestionRecord)`` from a stream's thread; ``on_add(ServedStream)`` and
    ``on_remove(id)`` from the thread that added or removed it."""

    def __init__(self, *, max_streams: int = DEFAULT_MAX_STREAMS, max_pending: int = DEFAULT_MAX_PENDING,
                 history: int = 1024, records: str | Path | None = None, default_bundle: str | None = None,
                 default_graph: str | None = None, backend: str = "onnxruntime",
                 on_frame: Callable | None = None, on_question: Callable | None = None,
                 on_remove: Callable | None = None, on_add: Callable | None = None):
        for name, v in (("max_streams", max_streams), ("max_pending", max_pending), ("history", history)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.max_streams, self.max_pending, self.history = max_streams, max_pending, history
        self.records = Path(records) if records is not None else None
        self.default_bundle, self.default_graph, self.backend = default_bundle, default_graph, backend
        self.on_frame, self.on_question, self.on_remove, self.on_add = on_frame, on_question, on_remove, on_add
        self._streams: dict[str, ServedStream] = {}
        self._reserved: set[str] = set()
        self._engines: dict[tuple[str, str], list] = {}      # (bundle path, backend) -> [Engines, users]
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()                    # one engine load at a time
        self._next = 0

    def _reserve(self, id: str | None) -> str:
        with self._lock:
            if len(self._streams) + len(self._reserved) >= self.max_streams:
                raise Busy(f"the server has {self.max_streams} streams already (--max-streams); remove one first")
            if id is None:
                while True:
                    self._next += 1
                    id = f"s{self._next}"
                    if id not in self._streams and id not in self._reserved:
                        break
            elif not STREAM_ID.match(id):
                raise ValueError(f"stream id {id[:80]!r}: use 1-64 letters, digits, '.', '_' or '-', "
                                 f"starting with a letter or digit")
            elif id in self._streams or id in self._reserved:
                raise StreamConflict(f"stream {id!r} exists already")
            self._reserved.add(id)
            return id

    def _engines_for(self, bundle: str, backend: str):
        """The bundle's engines, loaded once per (bundle, backend) and counted per user."""
        from streamgraph.runtime.session import Engines

        key = (str(Path(bundle).expanduser().resolve()), backend)
        with self._load_lock:
            with self._lock:
                entry = self._engines.get(key)
                if entry is not None:
                    entry[1] += 1
                    return key, entry[0]
            engines = Engines.load(bundle, backend)
            with self._lock:
                self._engines[key] = [engines, 1]
            return key, engines

    def _release(self, key) -> None:
        with self._lock:
            entry = self._engines.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._engines[key]
        entry[0].close()

    def add(self, cfg: StreamConfig, id: str | None = None) -> ServedStream:
        """Start a stream (blocks while its engines load, if not loaded yet, and its costs
        calibrate). Raises Busy, StreamConflict, ValueError or StreamgraphError (bad source,
        bundle or graph), one line each."""
        if cfg.bundle is None and cfg.graph is None:
            cfg.bundle, cfg.graph = self.default_bundle, self.default_graph
        if isinstance(cfg.speed, bool) or not isinstance(cfg.speed, (int, float)) \
                or not math.isfinite(cfg.speed) or cfg.speed <= 0:
            raise ValueError(f"speed must be a finite number > 0, got {cfg.speed!r}")
        cfg.backend = cfg.backend or self.backend
        id = self._reserve(id)
        key = None
        try:
            bundle = cfg.bundle
            if cfg.graph is not None:
                from streamgraph.compiler.compile import compile_graph

                bundle = str(compile_graph(cfg.graph, None).bundle.path)
            if not bundle:
                raise StreamgraphError("a stream needs a bundle (or a graph file to compile)")
            key, engines = self._engines_for(bundle, cfg.backend)
            session = engines.session(overload=cfg.overload, history=self.history)
            stream = ServedStream.start(id, cfg, session, records=self.records, on_frame=self._frame,
                                        on_question=self._question, max_pending=self.max_pending)
            stream.engines_key = key
        except BaseException:
            if key is not None:
                self._release(key)
            raise
        finally:
            with self._lock:
                self._reserved.discard(id)
        with self._lock:
            self._streams[id] = stream
        if self.on_add:
            self.on_add(stream)
        return stream

    def _frame(self, id: str, rec) -> None:
        if self.on_frame:
            self.on_frame(id, rec)

    def _question(self, id: str, rec) -> None:
        if self.on_question:
            self.on_question(id, rec)

    def get(self, id: str) -> ServedStream:
        """The stream ``id``; raises StreamNotFound."""
        with self._lock:
            s = self._streams.get(id)
        if s is None:
            raise StreamNotFound(f"no stream {id[:80]!r}")
        return s

    def list(self) -> list[ServedStream]:
        with self._lock:
            return list(self._streams.values())

    def remove(self, id: str) -> None:
        """Stop and forget stream ``id`` (releasing its engines when it was the last on them);
        raises StreamNotFound."""
        with self._lock:
            s = self._streams.pop(id, None)
        if s is None:
            raise StreamNotFound(f"no stream {id[:80]!r}")
        s.stop()
        if not s.alive:
            self._release(s.engines_key)
        if self.on_remove:
            self.on_remove(id)

    def close(self) -> None:
        """Stop every stream."""
        for s in self.list():
            try:
                self.remove(s.id)
            except StreamNotFound:
                pass
