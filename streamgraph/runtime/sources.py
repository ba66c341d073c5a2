"""Frame sources: video files (decoded with PyAV), synthetic streams, the bundled sample clip.
Live sources (network URLs, V4L2 devices, pipes) build on this module in
:mod:`streamgraph.runtime.live`, whose :func:`~streamgraph.runtime.live.open_source` opens
either kind by what its target names (this module never imports it: no import circle).

Every source is a re-iterable of :class:`Frame`. A frame carries its capture timestamp in
*stream time* (seconds since the first decoded frame of the file), its index among the
frames the source yielded, and its index among all decoded frames of the file.

Sampling at a *sampling fps* is grid-aligned: for ``k = 0, 1, 2, ...`` the source yields the
first decoded frame whose timestamp is ``>= start + k / fps`` (see :func:`sample_indices`).
The grid never drifts, and a decoded frame is never yielded twice: when a gap in the video
skips several grid points, the frame after the gap is yielded once and the grid moves past it.

This module never imports torch; it needs only numpy and PyAV (``av``).
"""
from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path

import numpy as np

from streamgraph.errors import SourceError

__all__ = [
    "EPS",
    "streamqa_demo",
    "Frame",
    "GridSampler",
    "SyntheticSource",
    "VideoSource",
    "sample_clip",
    "sample_indices",
    "synthetic",
    "video",
]

log = logging.getLogger(__name__)

#: Tolerance (seconds) for float error when comparing a timestamp with a grid point.
EPS = 1e-6

#: Largest sampling fps a source accepts: grid points closer than :data:`EPS` cannot be told
#: apart (any fps above a video's native rate yields every frame once anyway).
MAX_FPS = 1e6

_SAMPLE_CLIP = "sample_clip.mp4"


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame of a stream.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB, C-contiguous.
        timestamp: capture timestamp in seconds of stream time (0.0 at the first decoded
            frame of the file; synthetic streams use ``index / fps``).
        index: 0-based index among the frames this source yielded (after sampling,
            ``start``/``end`` and ``max_frames``).
        source_index: 0-based index among all decoded frames of the file (of a live source:
            of every connection so far).
        wall_time: live sources only: the source clock's time (seconds) when the frame was
            decoded; None otherwise.
        pts_time: live sources only: the stream's own time of the frame (``pts * time_base``,
            seconds, as the stream states it), or None when it has none.

    Frames compare by identity (``eq=False``): comparing pixel arrays element-wise is
    rarely what a caller wants and would make ``==`` ambiguous.
    """

    image: np.ndarray
    timestamp: float
    index: int
    source_index: int
    wall_time: float | None = None
    pts_time: float | None = None


# --------------------------------------------------------------------------- validation


def _check_fps(fps: float | None, *, allow_none: bool = True) -> float | None:
    if fps is None:
        if allow_none:
            return None
        raise ValueError("fps must be a positive number, got None")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction, np.integer, np.floating)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    value = float(fps)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"fps must be a positive finite number of frames per second, got {fps!r}")
    if value > MAX_FPS:
        raise ValueError(f"fps must be at most {MAX_FPS:g} frames per second (grid points closer than "
                         f"the {EPS:g} s timestamp tolerance cannot be told apart), got {fps!r}")
    return value


def _check_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"size must be (height, width) as two positive integers, got {size!r}")
    try:
        if any(isinstance(v, bool) for v in size):
            raise TypeError
        h, w = (operator.index(v) for v in size)
    except TypeError:
        raise ValueError(
            f"size must be (height, width) as two positive integers, got {size!r}"
        ) from None
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be (height, width) as two positive integers, got {size!r}")
    return (h, w)


def _check_count(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return n


def _check_seconds(name: str, value: float, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return v


# --------------------------------------------------------------------------- sampling


_MAX_GRID_STEPS = 64


class GridSampler:
    """Incremental grid-aligned sampler (the logic behind :func:`sample_indices`).

    Feed timestamps (seconds) in decode order to :meth:`accept`; it returns True for the
    frames to keep: the first frame with ``t >= k / fps - EPS`` for each grid point
    ``k = 0, 1, 2, ...``. After a frame is kept, every grid point it satisfies is consumed,
    so no frame is kept twice and a gap never causes a burst. ``fps=None`` keeps every frame.
    """

    __slots__ = ("fps", "_k")

    def __init__(self, fps: float | None):
        self.fps = _check_fps(fps)
        self._k = 0  # smallest grid point not yet served by a kept frame

    def _due(self, t: float, k: int) -> bool:
        return t >= k / self.fps - EPS

    def accept(self, t: float) -> bool:
        """Return True if the frame at timestamp ``t`` (seconds) is sampled."""
        if self.fps is None:
            return True
        k = self._k
        if not self._due(t, k):
            return False
        # Jump close to the last grid point ``t`` satisfies (float-safe: start one below the
        # arithmetic estimate), then step with the exact predicate until the first one it
        # does not satisfy. The estimate is within a step or two; past a few steps the step
        # doubles, so a grid index beyond float resolution (where k / fps no longer changes
        # with k + 1) can never loop forever.
        k = max(k + 1, math.floor((t + EPS) * self.fps) - 1)
        step = 1
        for i in range(_MAX_GRID_STEPS):
            if not self._due(t, k):
                break
            k += step
            if i >= 4:
                step *= 2
        self._k = k
        return True


def sample_indices(timestamps: Iterable[float], fps: float | None) -> list[int]:
    """Indices of the frames a source sampling at ``fps`` keeps, given all frame timestamps.

    Args:
        timestamps: capture timestamps in seconds, in decode order (normally non-decreasing;
            any order is handled consistently).
        fps: sampling rate in frames per second (> 0), or None to keep every frame.

    Returns:
        Increasing 0-based indices into ``timestamps``: for each grid point ``k / fps``
        (``k = 0, 1, ...``) the first frame with ``t >= k / fps - EPS``, without repeats.

    Raises:
        ValueError: ``fps`` is not a positive finite number.
    """
    sampler = GridSampler(fps)
    return [i for i, t in enumerate(timestamps) if sampler.accept(float(t))]


# --------------------------------------------------------------------------- video files


def _rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        arr = frame.to_ndarray(format="rgb24")
    else:
        h, w = size
        arr = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BILINEAR")
    return np.ascontiguousarray(arr, dtype=np.uint8)


@dataclass(frozen=True)
class VideoSource:
    """A video file as a re-iterable stream of :class:`Frame` (each ``iter()`` reopens it).

    Build it with :func:`video`, which validates the arguments and probes the file.

    Attributes:
        path: the video file.
        fps: sampling rate (frames per second), or None for every decoded frame.
        size: output ``(height, width)`` in pixels, or None for the native size.
        max_frames: cap on yielded frames, or None.
        start: stream time (seconds) of the first frame to consider; the sampling grid is
            anchored here (grid points ``start + k / fps``).
        end: stream time (seconds) at which to stop (exclusive), or None for the whole file.
    """

    path: Path
    fps: float | None = None
    size: tuple[int, int] | None = None
    max_frames: int | None = None
    start: float = 0.0
    end: float | None = None
    _native_fps: float | None = field(default=None, repr=False, compare=False)
    _decode: dict | None = field(default=None, repr=False, compare=False)

    @property
    def decode_stats(self) -> dict | None:
        """How the latest iteration decoded the file, once it ended (None before):
        ``frames_decoded``, ``frames_header`` (the count the container states, None when it
        states none), ``complete`` (the file was read to its end, not stopped early by
        ``end``/``max_frames``/the caller), ``truncated`` (read to its end, yet fewer frames
        decoded than the header states) and ``skipped_packets``."""
        return None if self._decode is None else dict(self._decode)

    def _open(self):
        import av

        try:
            container = av.open(str(self.path), mode="r")
        except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
            raise SourceError(
                f"{self.path}: cannot open as a video file ({type(exc).__name__}: {_one_line(exc)})"
            ) from exc
        if not container.streams.video:
            container.close()
            raise SourceError(f"{self.path}: file has no video stream")
        return container

    def native_fps(self) -> float:
        """The stream's native frame rate (frames per second) from its average rate.

        Falls back to the guessed/base rate when the container states no average rate.

        Raises:
            SourceError: the file cannot be opened, has no video stream, or states no rate.
        """
        if self._native_fps is not None:
            return self._native_fps
        with self._open() as container:
            rate = _stream_rate(container.streams.video[0])
        if rate is None:
            raise SourceError(f"{self.path}: video stream states no frame rate")
        object.__setattr__(self, "_native_fps", rate)
        return rate

    def __iter__(self) -> Iterator[Frame]:
        """Decode the file and yield sampled frames.

        A file that ends before the frame count its header states (truncated or damaged)
        is not an error: it logs one warning (logger ``streamgraph.runtime.sources``) and
        :attr:`decode_stats` says ``truncated``.

        Raises:
            SourceError: the file cannot be opened or demuxed, has no video stream, no frame
                of it decodes, or no decoded frame falls in ``[start, end)``.
        """
        import av

        container = self._open()
        with container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = _stream_rate(stream)
            sampler = GridSampler(self.fps)
            decoded = 0
            yielded = 0
            bad_packets = 0
            first_time: float | None = None
            last_t = 0.0
            last_error: Exception | None = None
            done = ended = False
            header = int(stream.frames or 0) or None
            try:
                for packet in container.demux(stream):
                    try:
                        frames = packet.decode()
                    except av.FFmpegError as exc:  # corrupt packet: skip it, keep streaming
                        bad_packets += 1
                        last_error = exc
                        continue
                    for frame in frames:
                        source_index = decoded
                        decoded += 1
                        raw = frame.time
                        if raw is None:
                            if rate is None:
                                raise SourceError(
                                    f"{self.path}: frame {source_index} has no timestamp and "
                                    "the stream states no frame rate"
                                )
                            raw = source_index / rate
                        if first_time is None:
                            first_time = float(raw)
                        t = last_t = float(raw) - first_time
                        if t < self.start - EPS:
                            continue
                        if self.end is not None and t >= self.end - EPS:
                            done = True  # presentation order: nothing later is before `end`
                            break
                        if not sampler.accept(t - self.start):
                            continue
                        yield Frame(
                            image=_rgb(frame, self.size),
                            timestamp=t,
                            index=yielded,
                            source_index=source_index,
                        )
                        yielded += 1
                        if self.max_frames is not None and yielded >= self.max_frames:
                            done = True
                            break
                    if done:
                        break
                else:
                    ended = True
            except av.FFmpegError as exc:
                raise SourceError(
                    f"{self.path}: cannot read video after {decoded} decoded frames "
                    f"({type(exc).__name__}: {_one_line(exc)})"
                ) from exc
            finally:
                truncated = ended and header is not None and decoded < header
                object.__setattr__(self, "_decode", {
                    "frames_decoded": decoded, "frames_header": header, "complete": ended,
                    "truncated": truncated, "skipped_packets": bad_packets})
                skipped = f", skipped {bad_packets} undecodable packet(s)" if bad_packets else ""
                if truncated and decoded:
                    log.warning("%s: truncated or damaged video: decoding stopped after %d of the %d frames "
                                "its header states%s", self.path, decoded, header, skipped)
                elif bad_packets and decoded:      # none decoded: the error below says it all
                    log.warning("%s: skipped %d undecodable packet(s)", self.path, bad_packets)
        if decoded == 0:
            why = f" (last error: {_one_line(last_error)})" if last_error else ""
            hdr = f" although its header states {header} (truncated or damaged file?)" if header else ""
            raise SourceError(f"{self.path}: no decodable video frames{hdr}{why}")
        if yielded == 0:
            rng = f"start={self.start:g}s" + (f", end={self.end:g}s" if self.end is not None else "")
            raise SourceError(
                f"{self.path}: no frames in the requested range {rng} "
                f"(decoded {decoded} frames up to {last_t:.3f}s)"
            )


def _stream_rate(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return None


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())


def video(
    path: str | Path,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    start: float = 0.0,
    end: float | None = None,
) -> VideoSource:
    """Open a video file as a stream of RGB frames, optionally resampled and resized.

    Args:
        path: video file (any container/codec PyAV's FFmpeg decodes); video stream 0 is used.
        fps: sampling rate in frames per second: for ``k = 0, 1, ...`` yield the first
            decoded frame with timestamp ``>= start + k / fps`` (grid-aligned, no drift, no
            frame twice). None yields every decoded frame; an fps above the native rate
            yields every frame once.
        size: output ``(height, width)`` in pixels (bilinear resize by FFmpeg's swscale), or
            None for the native size. Images are ``[H, W, 3]`` uint8 RGB.
        max_frames: stop after this many yielded frames (None: no cap).
        start: skip frames before this stream time (seconds); the grid is anchored here.
        end: stop at this stream time (seconds, exclusive); None reads to the end.

    Returns:
        A re-iterable :class:`VideoSource`. Decoding happens lazily on iteration; frame
        counts are always counted from decoded frames, never read from headers.

    Raises:
        ValueError: invalid ``fps``, ``size``, ``max_frames``, ``start`` or ``end``.
        SourceError: the path does not exist, is a directory, cannot be opened as a video,
            or has no video stream (checked here); no decodable frame or no frame in range
            (raised while iterating).
    """
    fps_v = _check_fps(fps)
    size_v = _check_size(size)
    max_v = _check_count("max_frames", max_frames)
    start_v = _check_seconds("start", start, allow_none=False)
    end_v = _check_seconds("end", end, allow_none=True)
    if end_v is not None and end_v <= start_v:
        raise ValueError(f"end must be greater than start, got start={start!r}, end={end!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"{p}: video file does not exist")
    if p.is_dir():
        raise SourceError(f"{p}: is a directory, not a video file")
    src = VideoSource(path=p, fps=fps_v, size=size_v, max_frames=max_v, start=start_v, end=end_v)
    with src._open():  # probe: readable container with a video stream
        pass
    return src


# --------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticSource:
    """Deterministic synthetic stream (see :func:`synthetic`); re-iterable, has ``len()``."""

    n_frames: int
    fps: float
    size: tuple[int, int] = (64, 64)
    seed: int = 0

    def native_fps(self) -> float:
        """The stream's frame rate (frames per second)."""
        return self.fps

    def __len__(self) -> int:
        return self.n_frames

    def frame(self, k: int) -> Frame:
        """Frame ``k`` (0-based), computed independently of the others."""
        if not 0 <= k < self.n_frames:
            raise IndexError(f"frame index {k} out of range for {self.n_frames} frames")
        h, w = self.size
        params = np.random.default_rng([self.seed, 0xC0FFEE])
        color = params.integers(64, 256, size=3, dtype=np.int64).astype(np.uint8)
        side = max(1, min(h, w) // 4)
        x0, y0 = params.uniform(0, 1, size=2)
        vx, vy = params.uniform(0.05, 0.25, size=2) * params.choice([-1.0, 1.0], size=2)

        rng = np.random.default_rng([self.seed, k])
        image = rng.integers(0, 48, size=(h, w, 3), dtype=np.uint8)
        # Square bounces across the frame (triangle wave over the free span).
        def pos(p0: float, v: float, span: int) -> int:
            if span <= 0:
                return 0
            u = (p0 + v * k) % 2.0
            u = 2.0 - u if u > 1.0 else u
            return int(round(u * span))

        y = pos(y0, vy, h - side)
        x = pos(x0, vx, w - side)
        image[y : y + side, x : x + side] = color
        return Frame(image=image, timestamp=k / self.fps, index=k, source_index=k)

    def __iter__(self) -> Iterator[Frame]:
        for k in range(self.n_frames):
            yield self.frame(k)


def synthetic(
    n_frames: int, fps: float, size: tuple[int, int] = (64, 64), seed: int = 0
) -> SyntheticSource:
    """A deterministic synthetic stream: a coloured square moving over a noisy background.

    Args:
        n_frames: number of frames (> 0).
        fps: frame rate; frame ``k`` has timestamp ``k / fps`` seconds.
        size: ``(height, width)`` in pixels.
        seed: seeds the square's colour/path and the per-frame noise; the same arguments
            always give bit-identical frames.

    Returns:
        A re-iterable :class:`SyntheticSource` of ``[H, W, 3]`` uint8 RGB frames with
        ``index == source_index == k``. No video decoding is involved.

    Raises:
        ValueError: invalid ``n_frames``, ``fps`` or ``size``.
    """
    n = _check_count("n_frames", n_frames)
    if n is None:
        raise ValueError("n_frames must be a positive integer, got None")
    fps_v = _check_fps(fps, allow_none=False)
    size_v = _check_size(size)
    if size_v is None:
        raise ValueError("size must be (height, width) as two positive integers, got None")
    return SyntheticSource(n_frames=n, fps=fps_v, size=size_v, seed=operator.index(seed))


# --------------------------------------------------------------------------- sample clip


def sample_clip() -> Path:
    """Path of the short real video clip shipped inside the package.

    20 s of street footage at 256x192, 10 fps, H.264 in MP4 (see ``streamgraph/data/README.md``
    for provenance and licence). ``streamgraph run`` uses it when no video is given.

    Raises:
        SourceError: the clip is not installed as a file on disk (package data missing or
            the package is imported from a zip archive).
    """
    res = resources.files("streamgraph").joinpath("data", _SAMPLE_CLIP)
    if not isinstance(res, Path):
        raise SourceError(
            f"{res}: the bundled sample clip is not a file on disk; install streamgraph "
            "unzipped or pass a video path"
        )
    if not res.is_file():
        raise SourceError(
            f"{res}: the bundled sample clip is missing (package data not installed); "
            "pass a video path"
        )
    return res


def streamqa_demo() -> Path:
    """Directory of the StreamQA demo suite shipped inside the package: one episode
    (``videos/*.mp4``, 48x48 px at 2 fps) with its questions and answers (``items.jsonl``),
    in the suite format of :mod:`streamgraph.streamqa.suite`. ``streamgraph run`` streams it
    by default and asks its questions.

    Raises:
        SourceError: the demo suite is not installed as files on disk.
    """
    res = resources.files("streamgraph").joinpath("data", "streamqa_demo")
    if not isinstance(res, Path) or not (res / "suite.json").is_file():
        raise SourceError(f"{res}: the bundled StreamQA demo is missing (package data not installed); "
                          "pass a video path")
    return res
