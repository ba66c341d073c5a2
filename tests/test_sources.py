"""Tests for streamgraph.runtime.sources: video decoding, grid sampling, errors, sample clip."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgraph.errors import SourceError
from streamgraph.runtime import sources
from streamgraph.runtime.sources import EPS, Frame, sample_clip, sample_indices, synthetic, video

VTEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "vtest.avi"
needs_vtest = pytest.mark.skipif(
    not VTEST.is_file(), reason=f"real test video not found at {VTEST} (shared/data beside the repo)"
)


# --------------------------------------------------------------------------- references


def brute_force_sample(timestamps: list[float], fps: float) -> list[int]:
    """Reference: for every grid point k/fps, the first frame with t >= k/fps - EPS; unique."""
    if not timestamps:
        return []
    chosen: set[int] = set()
    k = 0
    t_max = max(timestamps)
    while k / fps - EPS <= t_max:
        g = k / fps - EPS
        first = next(i for i, t in enumerate(timestamps) if t >= g)
        chosen.add(first)
        k += 1
    return sorted(chosen)


def independent_timestamps(path: Path) -> list[float]:
    """Decode every frame with av directly; timestamps relative to the first frame."""
    with av.open(str(path)) as c:
        times = [float(f.time) for f in c.decode(c.streams.video[0])]
    return [t - times[0] for t in times]


@pytest.fixture(scope="module")
def vtest_times() -> list[float]:
    if not VTEST.is_file():
        pytest.skip(f"real test video not found at {VTEST}")
    return independent_timestamps(VTEST)


def write_video(path: Path, pts: list[int], *, rate: int = 10, size=(48, 64), codec="mpeg4"):
    """Write a small video whose frames have the given pts (time base 1/rate)."""
    h, w = size
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.time_base = Fraction(1, rate)
        s.codec_context.time_base = Fraction(1, rate)
        for i, p in enumerate(pts):
            img = np.full((h, w, 3), (i * 37) % 256, dtype=np.uint8)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = p
            f.time_base = Fraction(1, rate)
            for packet in s.encode(f):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)


# --------------------------------------------------------------------------- sample_indices


def test_sample_indices_examples():
    ts = [i / 10 for i in range(25)]  # 10 fps, 2.4 s
    assert sample_indices(ts, 2) == [0, 5, 10, 15, 20]
    assert sample_indices(ts, None) == list(range(25))
    assert sample_indices(ts, 100) == list(range(25))  # above native: every frame once
    # a gap skipping several grid points yields the frame after it once, then the grid moves on
    assert sample_indices([0.0, 0.1, 3.2, 3.3, 3.5, 4.0], 2) == [0, 2, 4, 5]
    assert sample_indices([], 2) == []


def test_sample_indices_no_drift():
    # 29.97 fps sampled at 1 fps over an hour: exactly one frame per second, no drift.
    ts = [i * 1001 / 30000 for i in range(30000 * 3600 // 1001)]
    idx = sample_indices(ts, 1.0)
    assert len(idx) == math.floor(ts[-1] + EPS) + 1
    for k, i in enumerate(idx):
        assert ts[i] >= k - EPS and (i == 0 or ts[i - 1] < k - EPS)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "2", True])
def test_sample_indices_bad_fps(bad):
    with pytest.raises(ValueError, match="fps"):
        sample_indices([0.0], bad)


@settings(max_examples=300, deadline=None)
@given(
    fps=st.floats(min_value=0.1, max_value=20.0, exclude_min=True, allow_nan=False),
    gaps=st.lists(
        st.one_of(
            st.just(0.0),
            st.floats(min_value=0.0, max_value=0.2),
            st.sampled_from([1 / 30, 1 / 25, 1001 / 30000, 0.1, 0.5]),
            st.floats(min_value=0.0, max_value=5.0),
        ),
        max_size=80,
    ),
)
def test_sample_indices_matches_brute_force(fps, gaps):
    ts = list(np.cumsum([0.0, *gaps])) if gaps else [0.0]
    ts = [float(t) for t in ts]
    got = sample_indices(ts, fps)
    assert got == brute_force_sample(ts, fps)
    assert len(set(got)) == len(got) and got == sorted(got)


@settings(max_examples=100, deadline=None)
@given(
    fps=st.floats(min_value=0.1, max_value=20.0, exclude_min=True),
    ts=st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=40),
)
def test_sample_indices_unordered_matches_brute_force(fps, ts):
    assert sample_indices(ts, fps) == brute_force_sample(ts, fps)


# --------------------------------------------------------------------------- real video


@needs_vtest
def test_all_frames_match_independent_decode(vtest_times):
    src = video(VTEST)
    frames = list(src)
    assert len(frames) == len(vtest_times)  # 795 for vtest.avi; never the header count
    assert [f.timestamp for f in frames] == pytest.approx(vtest_times, abs=1e-9)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert [f.source_index for f in frames] == list(range(len(frames)))
    f0 = frames[0]
    assert isinstance(f0, Frame)
    assert f0.image.shape == (576, 768, 3) and f0.image.dtype == np.uint8
    assert f0.image.flags["C_CONTIGUOUS"]
    assert src.native_fps() == pytest.approx(10.0)


@needs_vtest
def test_fps2_grid_sampling(vtest_times):
    src = video(VTEST, fps=2, size=(48, 64))
    frames = list(src)
    ts = [f.timestamp for f in frames]
    native = src.native_fps()
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert all(b - a >= 0.5 - 1 / native - 1e-9 for a, b in zip(ts, ts[1:]))
    expected = brute_force_sample(vtest_times, 2.0)
    assert len(frames) == len(expected)
    assert [f.source_index for f in frames] == expected
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.timestamp == pytest.approx(vtest_times[f.source_index]) for f in frames)


@needs_vtest
def test_fps_above_native_yields_every_frame_once(vtest_times):
    frames = list(video(VTEST, fps=25, size=(24, 32)))
    assert [f.source_index for f in frames] == list(range(len(vtest_times)))


@needs_vtest
def test_resize_shape_and_dtype():
    frames = list(video(VTEST, size=(120, 160), max_frames=3))
    assert len(frames) == 3
    for f in frames:
        assert f.image.shape == (120, 160, 3)
        assert f.image.dtype == np.uint8
        assert f.image.flags["C_CONTIGUOUS"]
    odd = next(iter(video(VTEST, size=(33, 47))))
    assert odd.image.shape == (33, 47, 3) and odd.image.flags["C_CONTIGUOUS"]
    # resizing keeps the picture: mean colour close to the full-size frame's
    full = next(iter(video(VTEST)))
    assert np.abs(full.image.mean((0, 1)) - frames[0].image.mean((0, 1))).max() < 3.0


@needs_vtest
def test_max_frames_start_end(vtest_times):
    assert len(list(video(VTEST, fps=2, max_frames=4, size=(24, 32)))) == 4
    frames = list(video(VTEST, fps=1, start=10.0, end=15.0, size=(24, 32)))
    ts = [f.timestamp for f in frames]
    assert ts == pytest.approx([10.0, 11.0, 12.0, 13.0, 14.0])  # end is exclusive
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert frames[0].source_index == 100  # source_index counts from the start of the file
    tail = list(video(VTEST, start=79.0, size=(24, 32)))
    assert [f.source_index for f in tail] == [i for i, t in enumerate(vtest_times) if t >= 79.0]


@needs_vtest
def test_reiterable_and_early_close():
    src = video(VTEST, fps=5, max_frames=3, size=(24, 32))
    a = [f.source_index for f in src]
    b = [f.source_index for f in src]
    assert a == b == [0, 2, 4]
    it = iter(video(VTEST, size=(24, 32)))
    next(it)
    it.close()  # closes the container without error


def test_gap_yields_frame_once(tmp_path):
    path = tmp_path / "gap.mkv"
    # 10 fps with a 0.8 s hole: frames at 0.0 0.1 0.2 | 1.0 1.1 1.2 1.3 1.4 1.5
    write_video(path, [0, 1, 2, 10, 11, 12, 13, 14, 15])
    src = video(path, fps=2)
    frames = list(src)
    assert [f.timestamp for f in frames] == pytest.approx([0.0, 1.0, 1.5])
    assert [f.source_index for f in frames] == [0, 3, 8]
    assert [f.timestamp for f in video(path)] == pytest.approx(
        [0.0, 0.1, 0.2, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    )


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="PyAV's FFmpeg has no libx264")
def test_missing_pts_falls_back_to_index_over_average_rate(tmp_path):
    path = tmp_path / "raw.h264"  # raw H.264 elementary stream: decoded frames carry no pts
    with av.open(str(path), mode="w", format="h264") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, np.uint8), format="rgb24")
            f.pts = i
            for packet in s.encode(f):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)
    with av.open(str(path)) as c:
        assert all(f.pts is None for f in c.decode(video=0))
    src = video(path)
    rate = src.native_fps()  # the raw demuxer's average rate
    frames = list(src)
    assert len(frames) == 12
    assert [f.timestamp for f in frames] == pytest.approx([i / rate for i in range(12)])


# --------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path):
    p = tmp_path / "nope.mp4"
    with pytest.raises(SourceError, match="does not exist") as ei:
        video(p)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_error_directory(tmp_path):
    with pytest.raises(SourceError, match="directory") as ei:
        video(tmp_path)
    assert str(tmp_path) in str(ei.value)


def test_error_not_a_video(tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_text("this is a text file, not a video\n" * 20)
    with pytest.raises(SourceError, match="cannot open") as ei:
        video(p)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_error_empty_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(SourceError, match=str(p).replace("\\", "\\\\")):
        video(p)


def test_error_no_video_stream(tmp_path):
    p = tmp_path / "audio.wav"
    with av.open(str(p), mode="w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        fr.sample_rate, fr.pts = 8000, 0
        for packet in s.encode(fr):
            c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)
    with pytest.raises(SourceError, match="no video stream") as ei:
        video(p)
    assert str(p) in str(ei.value)


def test_error_zero_decodable_frames(tmp_path):
    p = tmp_path / "garbage.mkv"
    rng = np.random.default_rng(0)
    with av.open(str(p), mode="w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            packet = av.Packet(bytes(rng.integers(0, 256, 400, dtype=np.uint8)))
            packet.stream, packet.pts, packet.dts = s, i, i
            packet.time_base = Fraction(1, 10)
            c.mux(packet)
    src = video(p)  # the container and its video stream open fine ...
    with pytest.raises(SourceError, match="no decodable video frames") as ei:
        list(src)  # ... but no frame decodes
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_error_range_without_frames(tmp_path):
    path = tmp_path / "short.mkv"
    write_video(path, list(range(5)))
    with pytest.raises(SourceError, match="no frames in the requested range"):
        list(video(path, start=10.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fps": 0}, "fps"),
        ({"fps": -2.0}, "fps"),
        ({"fps": float("nan")}, "fps"),
        ({"size": (0, 10)}, "size"),
        ({"size": (10,)}, "size"),
        ({"size": (10.5, 20)}, "size"),
        ({"size": "224"}, "size"),
        ({"max_frames": 0}, "max_frames"),
        ({"start": -1.0}, "start"),
        ({"start": 5.0, "end": 5.0}, "end"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, match):
    # argument checks come before touching the file
    with pytest.raises(ValueError, match=match):
        video(tmp_path / "whatever.mp4", **kwargs)


def test_size_accepts_list(tmp_path):
    path = tmp_path / "v.mkv"
    write_video(path, [0, 1, 2])
    src = video(path, size=[16, 24])
    assert src.size == (16, 24)
    assert next(iter(src)).image.shape == (16, 24, 3)


# --------------------------------------------------------------------------- sample clip


def test_sample_clip_decodes():
    path = sample_clip()
    assert path.is_file() and path.suffix == ".mp4"
    assert path.stat().st_size < 1_500_000
    src = video(path)
    assert src.native_fps() == pytest.approx(10.0)
    frames = list(src)
    assert len(frames) >= 150
    assert frames[0].image.shape == (192, 256, 3)
    ts = [f.timestamp for f in frames]
    dt = np.diff(ts)
    assert np.allclose(dt, 0.1, atol=1e-3)
    assert len(list(video(path, fps=2))) == math.ceil(ts[-1] * 2 + 1e-9)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic():
    a = list(synthetic(20, fps=4, size=(32, 48), seed=3))
    b = list(synthetic(20, fps=4, size=(32, 48), seed=3))
    c = list(synthetic(20, fps=4, size=(32, 48), seed=4))
    assert len(a) == 20
    for fa, fb in zip(a, b):
        assert np.array_equal(fa.image, fb.image)
    assert not all(np.array_equal(fa.image, fc.image) for fa, fc in zip(a, c))
    assert [f.timestamp for f in a] == [k / 4 for k in range(20)]
    assert [f.index for f in a] == [f.source_index for f in a] == list(range(20))
    assert a[0].image.shape == (32, 48, 3) and a[0].image.dtype == np.uint8
    assert a[0].image.flags["C_CONTIGUOUS"]
    # the square moves
    assert not np.array_equal(a[0].image > 60, a[5].image > 60)
    src = synthetic(20, fps=4, size=(32, 48), seed=3)
    assert len(src) == 20 and src.native_fps() == 4
    assert np.array_equal(src.frame(7).image, a[7].image)


def test_synthetic_long_stream_is_cheap():
    src = synthetic(10_000, fps=30, size=(8, 8))
    n = sum(1 for _ in src)
    assert n == 10_000


@pytest.mark.parametrize(
    "args, match",
    [((0, 10), "n_frames"), ((5, 0), "fps"), ((5, 10, (0, 4)), "size")],
)
def test_synthetic_invalid(args, match):
    with pytest.raises(ValueError, match=match):
        synthetic(*args)


def test_module_is_torch_free():
    import subprocess
    import sys

    code = (
        "import sys, streamgraph.runtime.sources as s; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'cv2' not in sys.modules and 'PIL' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exports():
    assert set(sources.__all__) >= {"Frame", "VideoSource", "video", "synthetic", "sample_clip",
                                    "sample_indices"}
