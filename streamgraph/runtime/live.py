"""Live frame sources: network streams, V4L2 cameras and pipes, decoded by PyAV/FFmpeg.

A :class:`LiveSource` runs one **capture thread** that connects, demuxes and decodes the
stream and always holds only the **newest** decoded frame. The consumer (the runner, a robot
loop) takes that frame when it is ready for one; a frame overwritten before it was taken is
counted as ``skipped_by_capture``. Capture never waits for the model, so no backlog builds up
however slow the consumer is, and every decoded frame is accounted for::

    decoded == delivered + skipped_by_capture + not_sampled (+ 1 while a frame is pending)

(``not_sampled``: frames the ``fps`` grid skipped; once the source is closed a pending frame
counts as skipped.)

Kinds of source (:func:`classify`):

* ``url``: ``rtsp://``, ``rtsps://``, ``rtmp://``, ``rtmps://``, ``http://``, ``https://``,
  ``tcp://``, ``udp://``, ``rtp://``, ``srt://`` (when FFmpeg has the protocol) -- opened by
  FFmpeg with an open and a read timeout; RTSP defaults to ``rtsp_transport=tcp``.
* ``device``: a V4L2 camera, ``/dev/videoN`` or any character device (FFmpeg format ``v4l2``).
* ``pipe``: a named pipe (FIFO) an FFmpeg/GStreamer process writes a stream into; each writer
  is one connection (the writer closing it is a disconnect).
* ``stdin``: ``-`` or ``pipe:`` (``pipe:0``): the standard input; it ends at EOF, normally.

**Timestamps.** A frame's capture time (:attr:`Frame.timestamp`) is in the stream time of
the source's ``clock`` (pass the runner's :class:`~streamgraph.runtime.stream.WallClock`).
When the stream has a clock of its own (``pts * time_base``) the capture time follows it:
``pts + offset`` where ``offset`` is the smallest ``wall - pts`` seen over the last
``128`` frames (the least-delayed recent frame anchors the stream clock to the local one, so
the spacing of frames is the stream's, not the decoder's, and slow drift is followed). It
never lies after the frame's decode time and never goes backwards; a reconnect, a pts going
backwards or a jump of more than :data:`MAX_PTS_JUMP_S` re-anchors it. Without pts the
capture time is the clock at decode. Both are recorded in each :class:`Frame`
(``wall_time``, ``pts_time``).

**Reconnects.** A disconnect or EOF (of a live source; stdin ends normally) makes the capture
thread reconnect at once, then with exponential backoff (:class:`Reconnect`): ``attempts``
failed tries in a row -- a failed open, or a connection that ends before a frame -- end the
source with a one-line :class:`~streamgraph.errors.SourceError` naming it, which the consumer
gets from its next take. The first connection has the same budget (a camera still booting).
Counted in :attr:`LiveSource.stats`: ``disconnects``, ``reconnects``, ``gap_s`` (seconds from
the last frame before a loss to the first after it, summed), ``max_gap_s``.

This module never imports torch; it needs only numpy and PyAV (``av``).
"""
from __future__ import annotations

import math
import os
import re
import select
import stat
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from streamgraph.errors import SourceError

#: Tolerance (seconds) comparing a capture time with a grid point (as the file sources).
EPS = 1e-6

__all__ = ["LIVE_SCHEMES", "LiveSource", "Reconnect", "classify", "display_name", "is_live", "live", "open_source"]

#: URL schemes accepted as live network sources (each needs the FFmpeg protocol of that name).
LIVE_SCHEMES: tuple[str, ...] = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "tcp", "udp",
                                 "rtp", "srt")

#: A pts step larger than this (seconds), or any step backwards, re-anchors the stream clock.
MAX_PTS_JUMP_S = 5.0
#: Frames over which the smallest ``wall - pts`` anchors the stream clock.
PTS_WINDOW = 128
#: Most FFmpeg options per source, and longest option key/value (characters).
MAX_OPTIONS = 64
MAX_OPTION_CHARS = 4096

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_STDIN = ("-", "pipe:", "pipe:0")


# --------------------------------------------------------------------------- classification


def classify(target: str) -> str:
    """What kind of source ``target`` names, without opening it.

    Returns:
        ``"url"`` (``scheme://...``), ``"stdin"`` (``-``, ``pipe:``, ``pipe:0``), ``"device"``
        (``/dev/video*``, or an existing character device), ``"pipe"`` (an existing FIFO) or
        ``"file"`` (anything else: a video file path, possibly missing).
    """
    text = os.fspath(target)
    if text in _STDIN:
        return "stdin"
    if _SCHEME.match(text):
        return "url"
    path = os.path.expanduser(text)
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        mode = None
    if mode is not None and stat.S_ISFIFO(mode):
        return "pipe"
    if mode is not None and stat.S_ISCHR(mode):
        return "device"
    if re.match(r"^/dev/video\d*$", path):     # a camera that is not plugged in (yet)
        return "device"
    return "file"


def is_live(target: str) -> bool:
    """True when ``target`` is a live source (URL, device, FIFO or stdin), False for a file."""
    return classify(target) != "file"


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a live source (an unsupported scheme, no host), or None."""
    m = _SCHEME.match(url)
    if m is None:
        return "is not a URL (expected scheme://...)"
    scheme = m.group(1).lower()
    if scheme not in LIVE_SCHEMES:
        return (f"unsupported URL scheme {scheme!r} (live sources: {', '.join(LIVE_SCHEMES)}; "
                "a file is given by its path)")
    if not urllib.parse.urlsplit(url).netloc and scheme not in ("udp", "rtp"):
        return f"{scheme} URL has no host"
    return None


def display_name(target: str) -> str:
    """``target`` as shown in messages and reports: a URL's password is replaced by ``***``."""
    text = os.fspath(target)
    if not _SCHEME.match(text):
        return text
    try:
        parts = urllib.parse.urlsplit(text)
        if parts.password is None:
            return text
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return text


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())


def _error_text(exc: BaseException) -> str:
    msg = _one_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# --------------------------------------------------------------------------- reconnect policy


@dataclass(frozen=True)
class Reconnect:
    """Bounded exponential backoff of a live source.

    Attributes:
        attempts: failed tries in a row (a failed open, or a connection that ends before its
            first frame) after which the source gives up with a SourceError; 0 gives up at
            the first failure. The first connection has the same budget.
        initial_s: wait before the first retry, seconds (> 0); the retry right after a
            connection that delivered frames is immediate.
        max_s: longest wait between two tries, seconds (>= initial_s); waits double from
            ``initial_s`` up to it.

    Raises ValueError for values outside those ranges.
    """

    attempts: int = 5
    initial_s: float = 0.5
    max_s: float = 5.0

    def __post_init__(self):
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, (int, np.integer)) \
                or not 0 <= self.attempts <= 1_000_000:
            raise ValueError(f"reconnect attempts must be an integer in [0, 1000000], got {self.attempts!r}")
        for name in ("initial_s", "max_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not 0 < v <= 86_400:
                raise ValueError(f"reconnect {name} must be a number of seconds in (0, 86400], got {v!r}")
        if self.max_s < self.initial_s:
            raise ValueError(f"reconnect max_s ({self.max_s:g}) must be >= initial_s ({self.initial_s:g})")

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next try after ``failures`` (>= 1) failed tries in a row."""
        return min(self.max_s, self.initial_s * 2.0 ** min(max(failures - 1, 0), 64))

    def budget_s(self) -> float:
        """Longest total wait before the source gives up (sum of every backoff delay)."""
        return sum(self.delay(k) for k in range(1, min(self.attempts, 10_000) + 1))


# --------------------------------------------------------------------------- pipes


class _Stopped(Exception):
    """The source was closed while the capture thread waited."""


class _Pipe:
    """The read end of a FIFO (or stdin), held open for the life of the capture thread, so
    a writer that connects between two of our reads is never cut off (closing a FIFO's read
    end under a writer would break its pipe). A read that returns nothing means "no writer
    now" (none yet, or the last one closed: the end of one connection). Every wait polls in
    short steps, so closing the source stops it promptly."""

    def __init__(self, fd: int, owned: bool, stop: threading.Event):
        self.fd, self.owned, self.stop = fd, owned, stop
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    @classmethod
    def open_fifo(cls, path: str, stop: threading.Event) -> "_Pipe":
        return cls(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), True, stop)

    def read(self, n: int, timeout: float, *, wait_for_writer: bool, what: str) -> bytes:
        """Up to ``n`` bytes; b"" at the end of a connection (unless ``wait_for_writer``:
        then keep waiting for a writer's bytes). TimeoutError after ``timeout`` seconds
        without data; _Stopped when the source closes."""
        deadline = time.monotonic() + timeout
        while True:
            if self.stop.is_set():
                raise _Stopped()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} within {timeout:g} s")
            if not self.poll.poll(int(min(left, 0.05) * 1000) + 1):
                continue
            try:
                data = os.read(self.fd, n)
            except BlockingIOError:
                continue
            if data or not wait_for_writer:
                return data
            self.stop.wait(min(0.05, max(left, 0.0)))   # no writer now (HUP is level-triggered)

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1


class _PipeConnection:
    """One writer's stream on a :class:`_Pipe` as the file object PyAV reads (``read(n)``):
    waits up to ``open_timeout`` for the writer's first bytes, then ends at its EOF; no data
    for ``read_timeout`` seconds raises TimeoutError (a stalled writer is a disconnect)."""

    def __init__(self, pipe: _Pipe, open_timeout: float, read_timeout: float):
        self.pipe, self.read_timeout = pipe, read_timeout
        self._head = pipe.read(65536, open_timeout, wait_for_writer=True, what="no writer wrote to the pipe")
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                out, self._head = self._head, b""
            else:
                out, self._head = self._head[:n], self._head[n:]
            return out
        if self._eof:
            return b""
        data = self.pipe.read(n if n and n > 0 else 65536, self.read_timeout, wait_for_writer=False, what="no data")
        self._eof = not data
        return data


# --------------------------------------------------------------------------- stream clock


class _StreamClock:
    """Maps a frame's pts (seconds) onto the local clock; see the module docstring."""

    def __init__(self, window: int = PTS_WINDOW):
        self.window = window
        self.reset()
        self.last_t = -math.inf

    def reset(self) -> None:
        self._mins: deque[tuple[int, float]] = deque()     # (frame number, wall - pts), increasing
        self._n = 0
        self.last_pts: float | None = None

    def map(self, pts: float | None, wall: float) -> float:
        if pts is None or not math.isfinite(pts):
            t = wall
        else:
            if self.last_pts is not None and not (self.last_pts - 1e-9 <= pts <= self.last_pts + MAX_PTS_JUMP_S):
                self.reset()
            self.last_pts = pts
            d = wall - pts
            while self._mins and self._mins[-1][1] >= d:
                self._mins.pop()
            self._mins.append((self._n, d))
            while self._mins[0][0] <= self._n - self.window:
                self._mins.popleft()
            self._n += 1
            t = pts + self._mins[0][1]
        t = min(max(t, self.last_t), wall) if self.last_t <= wall else wall
        self.last_t = t
        return t


# --------------------------------------------------------------------------- the source


class _Clock0:
    """Seconds since the source started capturing (used when no clock is given)."""

    def __init__(self):
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0


class LiveSource:
    """A live stream as an iterable of :class:`~streamgraph.runtime.sources.Frame` (newest
    frame first, never a backlog). Build it with :func:`live` or
    :func:`open_source`.

    Iterating starts the capture thread (if it is not running) and yields, each time, the
    newest frame decoded since the previous one, waiting for one when none is new. It ends
    when the source ends (stdin at EOF, ``max_frames`` delivered) and raises SourceError
    when the retry budget runs out; leaving the loop early (``break``) closes the source. A
    new iteration after the source closed reconnects (counters keep adding up).

    Attributes:
        target: the URL, device path, FIFO path or ``-`` as given.
        kind: ``url``, ``device``, ``pipe`` or ``stdin`` (:func:`classify`).
        name: ``target`` for messages (a URL's password hidden).
        clock: what capture times are read from (``now()`` in seconds); set it to the
            runner's clock before iterating. Default: seconds since capture started.
    """

    #: Read by :class:`~streamgraph.runtime.stream.StreamRunner`: a live source runs on the
    #: wall clock, and the runner polls :meth:`latest` when its executor is free.
    live = True

    def __init__(self, target: str, kind: str, *, fps: float | None = None, size: tuple[int, int] | None = None,
                 max_frames: int | None = None, reconnect: Reconnect = Reconnect(), format: str | None = None,
                 options: Mapping[str, str] | None = None, open_timeout_s: float = 10.0,
                 read_timeout_s: float = 10.0, clock=None):
        self.target, self.kind, self.name = target, kind, display_name(target)
        self.fps, self.size, self.max_frames = fps, size, max_frames
        self.reconnect, self.format = reconnect, format
        self.options = dict(options or {})
        self.open_timeout_s, self.read_timeout_s = open_timeout_s, read_timeout_s
        self.clock = clock
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slot = None                      # (av frame, timestamp, wall, pts, source_index)
        self._ended = False                    # the capture thread has finished
        self._error: SourceError | None = None
        self._native_fps: float | None = None
        self._pipe: _Pipe | None = None
        self._grid_t0: float | None = None         # capture time of the first delivered frame
        self._grid_next: float | None = None       # a frame before this is not sampled
        self._counts = {"decoded": 0, "delivered": 0, "skipped_by_capture": 0, "not_sampled": 0,
                        "connects": 0, "failed_attempts": 0, "disconnects": 0, "reconnects": 0,
                        "gap_s": 0.0, "max_gap_s": 0.0, "frames_stream_clock": 0, "frames_wall_clock": 0,
                        "bad_packets": 0}
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return f"LiveSource({self.name!r}, kind={self.kind!r})"

    # -- state -------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Counters so far (a copy): ``decoded`` (every frame the decoder produced),
        ``delivered`` (taken by the consumer), ``skipped_by_capture`` (overwritten by a newer
        frame before being taken, or pending when the source closed), ``not_sampled``
        (skipped by the ``fps`` grid), ``pending`` (0 or 1), ``connects``,
        ``failed_attempts``, ``disconnects``, ``reconnects``, ``gap_s``/``max_gap_s``
        (seconds without frames around reconnects), ``frames_stream_clock`` /
        ``frames_wall_clock`` (capture times from pts / from the clock at decode),
        ``bad_packets`` (undecodable packets skipped), ``last_error``."""
        with self._cond:
            out = dict(self._counts)
            out["pending"] = int(self._slot is not None)
            out["last_error"] = self._last_error
        return out

    @property
    def decode_stats(self) -> dict:
        """:attr:`stats` plus ``source``, ``kind`` and the fields of a file's decode stats
        (``frames_decoded``; ``complete``/``truncated`` are False: a live stream has no
        header count), for run reports."""
        s = self.stats
        return {"source": self.name, "kind": self.kind, "live": True, **s, "frames_decoded": s["decoded"],
                "frames_header": None, "complete": False, "truncated": False,
                "skipped_packets": s["bad_packets"]}

    @property
    def running(self) -> bool:
        """The capture thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def native_fps(self) -> float | None:
        """The stream's frame rate once connected (frames per second), else None."""
        return self._native_fps

    # -- control -----------------------------------------------------------------------
    def start(self) -> "LiveSource":
        """Start the capture thread (no-op when it runs). Returns self."""
        with self._cond:
            if self.running:
                return self
            if self.clock is None:
                self.clock = _Clock0()
            self._stop.clear()
            self._ended, self._error, self._slot = False, None, None
            self._thread = threading.Thread(target=self._capture, name=f"capture {self.name}", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop the capture thread and wait for it (at most ``timeout`` seconds, default the
        read timeout + 1 s: a network read only notices the stop when it returns). A frame
        still pending counts as skipped. Idempotent."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(self.read_timeout_s + 1.0 if timeout is None else timeout)
        with self._cond:
            self._fold_pending()

    def __enter__(self) -> "LiveSource":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- consumer side ----------------------------------------------------------------
    def latest(self, timeout: float | None = None):
        """The newest frame decoded since the last one taken, waiting up to ``timeout``
        seconds (None: until there is one) -- the non-blocking way to poll a live source.

        Returns:
            A :class:`~streamgraph.runtime.sources.Frame`, or None when ``timeout`` passed
            without a new frame or the source has ended (see :attr:`ended`; once
            ``max_frames`` were delivered the source closes itself).

        Raises:
            SourceError: the source gave up (retry budget spent), naming it.
        """
        if self.max_frames is not None and self._counts["delivered"] >= self.max_frames:
            if not self._stop.is_set():
                self.close()
            return None
        if self._thread is None:
            self.start()
        item = self._take(timeout)
        return None if item is None else self._to_frame(item)

    @property
    def ended(self) -> bool:
        """The source ended (EOF of stdin, closed, gave up) and no frame is pending."""
        with self._cond:
            return self._slot is None and (self._ended or self._stop.is_set())

    def _take(self, timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    self._fold_pending()                       # stale by now
                    raise self._error
                if self._slot is not None and self._eligible(self._slot[1]):
                    item, self._slot = self._slot, None
                    index = self._counts["delivered"]
                    self._counts["delivered"] += 1
                    if self.fps is not None:                   # the next grid point after it
                        t = item[1]
                        if self._grid_t0 is None:
                            self._grid_t0 = t
                        k = math.floor((t - self._grid_t0 + EPS) * self.fps) + 1
                        self._grid_next = self._grid_t0 + k / self.fps
                    return (*item, index)
                if self._ended or self._stop.is_set():
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(0.5 if left is None else min(left, 0.5))

    def _to_frame(self, item):
        from streamgraph.runtime.sources import Frame, _rgb

        av_frame, t, wall, pts, source_index, index = item
        return Frame(image=_rgb(av_frame, self.size), timestamp=t, index=index, source_index=source_index,
                     wall_time=wall, pts_time=pts)

    def __iter__(self) -> Iterator:
        self.start()
        try:
            while self.max_frames is None or self._counts["delivered"] < self.max_frames:
                item = self._take(None)
                if item is None:
                    return
                yield self._to_frame(item)
        finally:
            self.close()

    # -- capture thread ------------------------------------------------------------------
    def _open(self):
        import av

        opts = {str(k): str(v) for k, v in self.options.items()}
        timeout = (self.open_timeout_s, self.read_timeout_s)
        if self.kind == "url":
            if self.target.lower().startswith(("rtsp://", "rtsps://")):
                opts.setdefault("rtsp_transport", "tcp")
            return av.open(self.target, mode="r", format=self.format, options=opts, timeout=timeout)
        if self.kind == "device":
            return av.open(os.path.expanduser(self.target), mode="r", format=self.format or "v4l2",
                           options=opts, timeout=timeout)
        if self._pipe is None:                     # held open across connections
            self._pipe = (_Pipe.open_fifo(os.path.expanduser(self.target), self._stop) if self.kind == "pipe"
                          else _Pipe(0, False, self._stop))
        conn = _PipeConnection(self._pipe, self.open_timeout_s if self.kind == "pipe" else math.inf,
                               self.read_timeout_s if self.kind == "pipe" else math.inf)
        return av.open(conn, mode="r", format=self.format, options=opts)

    def _redact(self, text: str) -> str:
        """``text`` with the target's password hidden (FFmpeg's messages quote the URL)."""
        return text.replace(self.target, self.name) if self.name != self.target else text

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the source is closed meanwhile; True when closed."""
        return self._stop.wait(seconds)

    def _give_up(self, failures: int, first_failure: float, connected_before: bool) -> None:
        what = {"url": "cannot connect", "device": "cannot open the V4L2 device",
                "pipe": "no writer on the pipe", "stdin": "cannot read standard input"}[self.kind]
        lost = "lost, then " if connected_before else ""
        spent = time.monotonic() - first_failure
        self._error = SourceError(
            f"{self.name}: {lost}{what} after {failures} attempt{'s' if failures != 1 else ''} over {spent:.1f} s "
            f"(retry budget {self.reconnect.attempts}; last error: {self._last_error})")

    def _capture(self) -> None:
        import av

        clock = self.clock
        sclock = _StreamClock()
        failures = 0
        first_failure = time.monotonic()
        lost_at: float | None = None               # clock time of the last frame before a loss
        last_wall = 0.0
        connected_before = False

        def failed_attempt() -> bool:
            """Count a failed connection attempt; give up past the retry budget, else back off.
            True when capture must end (budget spent, or the source closed while waiting)."""
            nonlocal failures, first_failure
            failures += 1
            self._counts["failed_attempts"] += 1
            if failures == 1:
                first_failure = time.monotonic()
            if failures > self.reconnect.attempts:
                self._give_up(failures, first_failure, connected_before)
                return True
            return self._wait(self.reconnect.delay(failures))

        try:
            while not self._stop.is_set():
                try:
                    container = self._open()
                except _Stopped:
                    break
                except (av.FFmpegError, OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
                    self._last_error = self._redact(_error_text(exc))
                    if failed_attempt():
                        break
                    continue
                got = 0
                self._counts["connects"] += 1
                try:
                    if not container.streams.video:
                        raise SourceError("no video stream")
                    stream = container.streams.video[0]
                    stream.thread_type = "SLICE"        # frame threads would add frames of delay
                    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                    if rate:
                        self._native_fps = float(rate)
                    sclock.reset()
                    for packet in container.demux(stream):
                        if self._stop.is_set():
                            break
                        try:
                            frames = packet.decode()
                        except av.FFmpegError:
                            self._counts["bad_packets"] += 1
                            continue
                        for frame in frames:
                            wall = clock.now()
                            pts = frame.time
                            pts = float(pts) if pts is not None else None
                            t = sclock.map(pts, wall)
                            if got == 0 and lost_at is not None:      # back after a loss
                                gap = wall - lost_at
                                self._counts["reconnects"] += 1
                                self._counts["gap_s"] += gap
                                self._counts["max_gap_s"] = max(self._counts["max_gap_s"], gap)
                                lost_at = None
                            got += 1
                            failures = 0
                            connected_before = True
                            self._publish(frame, t, wall, pts)
                            last_wall = wall
                except _Stopped:
                    break
                except (av.FFmpegError, OSError, EOFError, ValueError, SourceError) as exc:
                    self._last_error = self._redact(_error_text(exc))
                finally:
                    container.close()
                if self._stop.is_set():
                    break
                if self.kind == "stdin":
                    break                              # EOF of the standard input: the end
                if got:
                    self._counts["disconnects"] += 1
                    lost_at = last_wall
                    if self._last_error is None:
                        self._last_error = "end of stream"
                    continue                           # reconnect at once
                self._last_error = self._last_error or "connection ended before its first frame"
                if failed_attempt():
                    break
        except BaseException as exc:                   # a bug: surface it, one line, to the consumer
            self._error = SourceError(f"{self.name}: capture failed ({_error_text(exc)})")
        finally:
            if self._pipe is not None:
                self._pipe.close()
                self._pipe = None
            with self._cond:
                self._ended = True
                if self._slot is not None and not self._eligible(self._slot[1]):
                    self._fold_pending()               # below the fps grid, and nothing newer comes
                self._cond.notify_all()

    def _eligible(self, t: float) -> bool:
        """A frame captured at ``t`` may be delivered under the ``fps`` grid (anchored at the
        first delivered frame: the first frame at or after each grid point, as
        :class:`~streamgraph.runtime.sources.GridSampler`)."""
        return self._grid_next is None or t >= self._grid_next - EPS

    def _publish(self, frame, t: float, wall: float, pts: float | None) -> None:
        c = self._counts
        with self._cond:
            c["decoded"] += 1
            c["frames_stream_clock" if pts is not None else "frames_wall_clock"] += 1
            if self._stop.is_set():                # closing: nobody will take it
                c["skipped_by_capture" if self._eligible(t) else "not_sampled"] += 1
                return
            if self._slot is not None:             # overwritten before it was taken
                c["skipped_by_capture" if self._eligible(self._slot[1]) else "not_sampled"] += 1
            self._slot = (frame, t, wall, pts, c["decoded"] - 1)
            if self._eligible(t):
                self._cond.notify_all()

    def _fold_pending(self) -> None:
        """A frame left in the slot for good (the source closed or gave up)."""
        if self._slot is not None:
            self._counts["skipped_by_capture" if self._eligible(self._slot[1]) else "not_sampled"] += 1
            self._slot = None


# --------------------------------------------------------------------------- factory


def _check_options(options) -> dict[str, str]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a mapping of FFmpeg option names to values, got {options!r}")
    if len(options) > MAX_OPTIONS:
        raise ValueError(f"at most {MAX_OPTIONS} FFmpeg options, got {len(options)}")
    out = {}
    for k, v in options.items():
        if not isinstance(k, str) or not k or isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"FFmpeg option {k!r}: expected a name and a string or number value, got {v!r}")
        if len(k) > MAX_OPTION_CHARS or len(str(v)) > MAX_OPTION_CHARS:
            raise ValueError(f"FFmpeg option {k[:20]!r}: longer than {MAX_OPTION_CHARS} characters")
        out[k] = str(v)
    return out


def _check_timeout(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 86_400:
        raise ValueError(f"{name} must be a number of seconds in (0, 86400], got {v!r}")
    return float(v)


def live_options(section: Mapping | None, attempts: int | None = None) -> dict:
    """Keyword arguments of :func:`live` from a graph's ``stream.live`` section (reconnect
    backoff ``attempts``/``initial_s``/``max_s``, ``open_timeout_s``/``read_timeout_s`` in
    seconds, FFmpeg ``format`` and ``options``); ``attempts``, when given (the CLI's
    ``--reconnect-attempts``), overrides the section's. Absent keys keep :func:`live`'s
    defaults (5 attempts, 0.5 s doubling to 5 s)."""
    sec = dict(section or {})
    out = {"reconnect": Reconnect(attempts=attempts if attempts is not None else sec.get("attempts", 5),
                                  initial_s=sec.get("initial_s", 0.5), max_s=sec.get("max_s", 5.0))}
    for key in ("open_timeout_s", "read_timeout_s", "format", "options"):
        if sec.get(key) is not None:
            out[key] = sec[key]
    return out


def live(target: str, fps: float | None = None, size: tuple[int, int] | None = None,
         max_frames: int | None = None, *, reconnect: Reconnect | None = None, format: str | None = None,
         options: Mapping[str, str] | None = None, open_timeout_s: float = 10.0, read_timeout_s: float = 10.0,
         clock=None) -> LiveSource:
    """Open a live source (nothing connects until it is iterated or started).

    Args:
        target: a URL (``rtsp://``, ``rtmp://``, ``http(s)://``, ``tcp://``, ``udp://``,
            ...), a V4L2 device (``/dev/video0``), a FIFO path, or ``-``/``pipe:`` for stdin.
        fps: sampling rate in frames per second on the capture timestamps (grid-aligned, as
            :class:`~streamgraph.runtime.sources.GridSampler`), or None for every frame.
        size: output ``(height, width)`` in pixels (FFmpeg bilinear), or None for native.
            Images are ``[H, W, 3]`` uint8 RGB.
        max_frames: stop after delivering this many frames (None: no cap).
        reconnect: the backoff policy (:class:`Reconnect`; default 5 retries, 0.5 s doubling
            up to 5 s).
        format: FFmpeg input format (e.g. ``mpegts``, ``h264``, ``v4l2``, ``rawvideo``);
            None lets FFmpeg probe (``v4l2`` for devices).
        options: FFmpeg options (``{"video_size": "640x480", "framerate": "30"}`` for a
            camera, ``{"rtsp_transport": "udp"}``...); values are strings.
        open_timeout_s, read_timeout_s: seconds to wait for a connection (or a pipe's writer)
            and for data once connected; past them the try fails (a disconnect).
        clock: where capture times come from (anything with ``now()`` in seconds, e.g. the
            runner's :class:`~streamgraph.runtime.stream.WallClock`); default: seconds since
            capture started.

    Returns:
        A :class:`LiveSource`.

    Raises:
        ValueError: bad ``fps``/``size``/``max_frames``/timeouts/options.
        SourceError: ``target`` is not a live source (a file path: use
            :func:`~streamgraph.runtime.sources.video`), or a URL with an unsupported scheme.
    """
    from streamgraph.runtime.sources import _check_count, _check_fps, _check_size

    kind = classify(target)
    name = display_name(target)
    if kind == "file":
        raise SourceError(f"{name}: not a live source (a URL, a V4L2 device, a FIFO or '-' for stdin)")
    if kind == "url":
        problem = url_problem(target)
        if problem:
            raise SourceError(f"{name}: {problem}")
    if reconnect is None:
        reconnect = Reconnect()
    elif not isinstance(reconnect, Reconnect):
        raise ValueError(f"reconnect must be a Reconnect, got {reconnect!r}")
    if format is not None and (not isinstance(format, str) or not re.fullmatch(r"[A-Za-z0-9_,]{1,64}", format)):
        raise ValueError(f"format must be an FFmpeg format name, got {format!r}")
    return LiveSource(os.fspath(target), kind, fps=_check_fps(fps), size=_check_size(size),
                      max_frames=_check_count("max_frames", max_frames), reconnect=reconnect, format=format,
                      options=_check_options(options), open_timeout_s=_check_timeout("open_timeout_s", open_timeout_s),
                      read_timeout_s=_check_timeout("read_timeout_s", read_timeout_s), clock=clock)


def open_source(
    target: str | Path,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    **live_options,
):
    """Open any frame source by what ``target`` names: a live source or a video file.

    Args:
        target: a URL (``rtsp://``, ``rtmp://``, ``http(s)://``, ``tcp://``, ``udp://``, ...),
            a V4L2 device (``/dev/videoN``), a FIFO, ``-``/``pipe:`` (stdin), or a video file
            path (see :func:`classify`).
        fps, size, max_frames: as :func:`~streamgraph.runtime.sources.video` (for a live source, the fps grid runs on
            capture timestamps).
        **live_options: keyword arguments of :func:`live`
            (``reconnect``, ``format``, ``options``, ``open_timeout_s``, ``read_timeout_s``,
            ``clock``); ignored for a file.

    Returns:
        A :class:`LiveSource` (nothing connects before it is
        iterated) or a :class:`~streamgraph.runtime.sources.VideoSource` (probed now).

    Raises:
        ValueError: invalid ``fps``, ``size`` or ``max_frames`` (or a live option).
        SourceError: as :func:`~streamgraph.runtime.sources.video` for a file; a URL with an unsupported scheme.
    """
    from streamgraph.runtime.sources import video

    text = str(target)
    if classify(text) == "file":
        return video(text, fps=fps, size=size, max_frames=max_frames)
    return live(text, fps=fps, size=size, max_frames=max_frames, **live_options)
