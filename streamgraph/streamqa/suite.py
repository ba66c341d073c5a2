"""StreamQA suites on disk: write generated episodes, load any suite (a user's too).

A suite is a directory::

    suite.json        {"format": "streamqa-suite/1", "name": "...", "items": "items.jsonl",
                       "generator": {...}}            # generator: optional, StreamQA's own suites
    items.jsonl       one question per line (below)
    videos/*.mp4      the videos the items name (any container/codec PyAV decodes)
    episodes/*.json   optional: StreamQA scene states (the oracle the answers came from)

An item (one JSON object per line of ``items.jsonl``)::

    {"id": "e1000000-q0",               # unique; optional (default: "line-N")
     "video": "videos/e1000000.mp4",    # relative to the suite directory
     "question": "What color is the circle now?",
     "ask_time": 1.25,                  # stream seconds; the answer may use frames <= ask_time
     "answer": "red",                   # exact-match target (case and surrounding space ignored)
     "choices": ["red", "green", ...],  # optional, closed vocabulary
     "family": "realtime",              # optional, for per-family accuracy
     "evidence_time": 1.0}              # optional, for accuracy vs evidence age

Items of one video are answered in one stream, in ``ask_time`` order. Errors name the file
and line: ``SUITE/items.jsonl:12: ask_time: 9.75 s is past the end of videos/x.mp4 (6.00 s)``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streamgraph.errors import StreamgraphError
from streamgraph.streamqa.scene import Episode, EpisodeParams, make_episode

FORMAT = "streamqa-suite/1"


class SuiteError(StreamgraphError):
    """A suite directory, its ``suite.json`` or an item is missing or malformed; ``str()``
    is one line naming the file (and line)."""


class Item(BaseModel):
    """One question of a suite (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    video: str = Field(min_length=1)
    question: str = Field(min_length=1, max_length=2000)
    ask_time: float = Field(ge=0.0)
    answer: str = Field(min_length=1)
    choices: list[str] | None = None
    family: str | None = None
    evidence_time: float | None = Field(default=None, ge=0.0)

    @field_validator("ask_time", "evidence_time")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number of seconds")
        return v


class SuiteHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    name: str = Field(min_length=1, max_length=200)
    items: str = "items.jsonl"
    generator: dict | None = None


@dataclass
class Suite:
    """A loaded suite: ``items`` in file order and, per video path, its duration (s)."""

    path: Path
    name: str
    items: list[Item]
    durations: dict[str, float]
    generator: dict | None = None
    lines: dict[str, int] = field(default_factory=dict)   # item id -> line in items.jsonl

    def videos(self) -> list[str]:
        """Video paths (relative) in first-appearance order."""
        return list(dict.fromkeys(i.video for i in self.items))

    def by_video(self) -> dict[str, list[Item]]:
        out: dict[str, list[Item]] = {}
        for it in self.items:
            out.setdefault(it.video, []).append(it)
        for v in out.values():
            v.sort(key=lambda i: i.ask_time)
        return out


def normalize_answer(text: str) -> str:
    """Exact-match normal form: stripped, lower case, trailing full stop removed."""
    t = " ".join(text.strip().lower().split())
    return t[:-1] if t.endswith(".") else t


def video_duration(path: Path) -> tuple[float, int]:
    """(duration in seconds, decoded frame count) of a video: last decoded frame's time plus
    one frame period (frame counts are counted from decoded frames, never from headers).
    Raises SuiteError when it cannot be decoded."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise SuiteError(f"{path}: no video stream")
            s = c.streams.video[0]
            rate = s.average_rate or s.base_rate or Fraction(1)
            last, n = 0.0, 0
            for frame in c.decode(s):
                n += 1
                if frame.time is not None:
                    last = max(last, float(frame.time))
    except SuiteError:
        raise
    except Exception as e:  # PyAV raises many types (FFmpegError, ValueError, ...)
        raise SuiteError(f"{path}: cannot decode video: {' '.join(str(e).split())}") from None
    if n == 0:
        raise SuiteError(f"{path}: no decodable frame")
    return last + 1.0 / float(rate), n


def load_suite(path: str | Path) -> Suite:
    """Load and check a suite directory. Raises :class:`SuiteError` (one line, file:line) for
    a missing directory, a missing or malformed ``suite.json``, an empty suite, an item with
    an unknown or invalid field, a duplicate id, a missing or undecodable video, or an
    ``ask_time`` past its video's end."""
    root = Path(path).expanduser()
    if not root.exists():
        raise SuiteError(f"{root}: suite directory does not exist")
    if not root.is_dir():
        raise SuiteError(f"{root}: not a directory (a suite is a directory with suite.json)")
    head_path = root / "suite.json"
    if not head_path.is_file():
        raise SuiteError(f"{head_path}: missing (a suite directory holds suite.json and items.jsonl)")
    try:
        raw = json.loads(head_path.read_text(encoding="utf-8"))
        header = SuiteHeader.model_validate(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SuiteError(f"{head_path}: {' '.join(str(e).split())}") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "suite"
        raise SuiteError(f"{head_path}: {loc}: {err['msg']}") from None
    if header.format != FORMAT:
        raise SuiteError(f"{head_path}: format: {header.format!r} is not {FORMAT!r}")
    items_path = (root / header.items)
    if not items_path.is_file():
        raise SuiteError(f"{items_path}: missing (named by suite.json's items)")
    items: list[Item] = []
    lines: dict[str, int] = {}
    durations: dict[str, float] = {}
    try:
        text = items_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"{items_path}: {' '.join(str(e).split())}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{items_path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SuiteError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise SuiteError(f"{where}: an item must be a JSON object")
        try:
            item = Item.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "item"
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            raise SuiteError(f"{where}: {loc}: {msg}") from None
        if item.id is None:
            item.id = f"line-{lineno}"
        if item.id in lines:
            raise SuiteError(f"{where}: id: {item.id!r} already used on line {lines[item.id]}")
        lines[item.id] = lineno
        vpath = (root / item.video)
        if not vpath.is_file():
            raise SuiteError(f"{where}: video: {item.video} does not exist in {root}")
        if item.video not in durations:
            try:
                durations[item.video] = video_duration(vpath)[0]
            except SuiteError as e:
                raise SuiteError(f"{where}: video: {e}") from None
        if item.ask_time > durations[item.video] + 1e-9:
            raise SuiteError(f"{where}: ask_time: {item.ask_time:g} s is past the end of {item.video} "
                             f"({durations[item.video]:.2f} s)")
        items.append(item)
    if not items:
        raise SuiteError(f"{items_path}: the suite is empty (no items)")
    return Suite(root, header.name, items, durations, header.generator, lines)


# ----------------------------------------------------------------------------- writing
def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """Encode ``frames [N,H,W,3] uint8`` as H.264 4:4:4 lossless (CRF 0) MP4 at ``fps``
    (MPEG-4 Part 2 at high quality where PyAV's FFmpeg lacks libx264)."""
    import av

    rate = Fraction(fps).limit_denominator(1000)
    h, w = frames.shape[1:3]
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as c:
        if "libx264" in av.codecs_available:
            s = c.add_stream("libx264", rate=rate)
            s.pix_fmt = "yuv444p"
            s.options = {"crf": "0", "preset": "medium"}
        else:  # pragma: no cover - PyAV wheels ship libx264
            s = c.add_stream("mpeg4", rate=rate)
            s.pix_fmt = "yuv420p"
            s.codec_context.bit_rate = 4_000_000
        s.width, s.height = w, h
        s.codec_context.time_base = 1 / rate
        s.codec_context.thread_count = 1
        s.codec_context.flags |= av.codec.context.Flags.bitexact
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = i
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    tmp.replace(path)


def episode_items(ep: Episode, video: str) -> list[dict]:
    """The ``items.jsonl`` rows of an episode whose video is at ``video`` (relative)."""
    return [{"id": f"e{ep.seed}-q{i}", "video": video, "question": q.question, "ask_time": q.ask_time,
             "answer": q.answer, "choices": q.choices, "family": q.family, "evidence_time": q.evidence_time}
            for i, q in enumerate(ep.questions)]


def write_suite(path: str | Path, seeds, params: EpisodeParams | None = None, name: str | None = None,
                progress=None) -> Path:
    """Generate episodes ``seeds`` into suite directory ``path`` (created; existing files of
    the same names are replaced). Returns the path. ``progress(i, n)`` is called per episode."""
    params = params or EpisodeParams()
    root = Path(path)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "episodes").mkdir(exist_ok=True)
    seeds = list(seeds)
    rows = []
    for i, seed in enumerate(seeds):
        ep = make_episode(seed, params)
        video = f"videos/e{seed}.mp4"
        write_video(root / video, ep.frames(), params.fps)
        (root / "episodes" / f"e{seed}.json").write_text(json.dumps(ep.to_dict()))
        rows += episode_items(ep, video)
        if progress:
            progress(i + 1, len(seeds))
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from dataclasses import asdict

    gen = {"params": asdict(params), "seeds": _seed_ranges(seeds)}
    (root / "suite.json").write_text(json.dumps(
        {"format": FORMAT, "name": name or root.name, "items": "items.jsonl", "generator": gen}, indent=2))
    return root


def _seed_ranges(seeds: list[int]) -> list[list[int]]:
    """Compress sorted runs of seeds into ``[first, last]`` pairs (inclusive)."""
    out: list[list[int]] = []
    for s in seeds:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def load_episode(suite: Suite, video: str) -> Episode | None:
    """The StreamQA scene of ``video`` if the suite has it (``episodes/<stem>.json``)."""
    from streamgraph.streamqa.scene import QA, Obj

    p = suite.path / "episodes" / (Path(video).stem + ".json")
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    prm = d["params"]
    prm["families"] = tuple(prm["families"])
    return Episode(d["seed"], EpisodeParams(**prm), [tuple(Obj(**o) for o in s) for s in d["states"]],
                   [QA(**q) for q in d["questions"]])
