"""Live sources: a network stream and a pipe that the tests start on 127.0.0.1, each cut and
resumed in the middle; every decoded frame accounted for; no backlog behind a slow consumer;
one-line errors once the retry budget is spent; the graph's `stream.source`; `run --source`.

The producers encode MPEG-4 Part 2 in MPEG-TS with PyAV, frame ``k`` (counted over the whole
run, across connections) with ``pts = k`` at 1/FPS s, so the stream itself says which frame
each decoded frame is: the independent reference for the accounting.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgraph.cli import main
from streamgraph.errors import SourceError, SpecError
from streamgraph.runtime import live as live_mod
from streamgraph.runtime.stream import WallClock
from streamgraph.runtime.live import Reconnect, classify, display_name, live
from streamgraph.runtime.live import open_source
from streamgraph.runtime.sources import VideoSource, sample_clip
from tests.conftest import graph_text

FPS = 100                  # producer frame rate: far faster than the consumers below
CONSUMER_S = 0.03          # a consumer (model) 3x slower than the source
DEADLINE_S = 0.5           # latency bound; a backlog would pass it by seconds (see _check_no_backlog)
QUICK = Reconnect(attempts=4, initial_s=0.05, max_s=0.2)   # 0.55 s of retries: outlasts the 0.3 s cuts


# --------------------------------------------------------------------------- producers


class _Sink:
    def __init__(self, write):
        self.write_bytes = write

    def write(self, data) -> int:
        self.write_bytes(bytes(data))
        return len(data)


def _produce(write, first: int, n: int, fps: float = FPS, pace: bool = True) -> None:
    """Mux frames ``first .. first + n - 1`` (pts = frame number, time base 1/fps) as MPEG-TS
    into ``write``, one frame every 1/fps s (as a camera would)."""
    out = av.open(_Sink(write), "w", format="mpegts", buffer_size=2048,
                  container_options={"muxdelay": "0", "muxpreload": "0", "flush_packets": "1"})
    stream = out.add_stream("mpeg4", rate=fps)
    stream.width = stream.height = 64
    stream.pix_fmt = "yuv420p"
    stream.codec_context.max_b_frames = 0
    stream.codec_context.gop_size = 10
    t0 = time.perf_counter()
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), (first + i) * 7 % 256, np.uint8), format="rgb24")
        frame.pts = first + i
        for packet in stream.encode(frame):
            out.mux(packet)
        if pace:
            time.sleep(max(0.0, t0 + (i + 1) / fps - time.perf_counter()))
    for packet in stream.encode():
        out.mux(packet)
    out.close()


class _Producer:
    """A producer thread: ``connections[k]`` frames per connection, ``gap_s`` between them;
    ``sent`` counts the frames written. ``stop_source`` (if set) is closed after the end."""

    def __init__(self, connections: list[int], gap_s: float):
        self.connections, self.gap_s = connections, gap_s
        self.sent = 0
        self.error: BaseException | None = None
        self.stop_source = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self):
        try:
            for k, n in enumerate(self.connections):
                if k:
                    time.sleep(self.gap_s)
                self.connection(lambda write: _produce(write, self.sent, n))
                self.sent += n
            if self.stop_source is not None:
                time.sleep(0.2)
                self.stop_source.close()
        except BaseException as e:       # reported by the test
            self.error = e

    def start(self):
        self.thread.start()
        return self

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive(), "producer did not finish"
        assert self.error is None, self.error


class _TcpProducer(_Producer):
    """An MPEG-TS server on 127.0.0.1: one accepted connection per entry of ``connections``;
    the port is closed between connections (so the source's retries are refused) and after
    the last one."""

    def __init__(self, connections, gap_s):
        super().__init__(connections, gap_s)
        self.srv = self._listen(0)                    # listening before the source first tries
        self.port = self.srv.getsockname()[1]
        self.url = f"tcp://127.0.0.1:{self.port}"

    @staticmethod
    def _listen(port: int) -> socket.socket:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(1)
        srv.settimeout(20)
        return srv

    def connection(self, produce):
        srv, self.srv = self.srv or self._listen(self.port), None
        try:
            conn, _ = srv.accept()
        finally:
            srv.close()
        conn.settimeout(None)
        with conn:
            produce(conn.sendall)


class _FifoProducer(_Producer):
    """A writer process's view of a named pipe: each connection opens the FIFO, writes, closes."""

    def __init__(self, path: Path, connections, gap_s):
        super().__init__(connections, gap_s)
        os.mkfifo(path)
        self.path = path

    def connection(self, produce):
        with open(self.path, "wb", buffering=0) as f:
            produce(f.write)


# --------------------------------------------------------------------------- checks


def _consume(src, clock) -> list[tuple]:
    """A slow consumer: take the newest frame, note its latency, work CONSUMER_S; until the
    source ends or gives up."""
    got = []
    try:
        for f in src:
            got.append((f.source_index, f.pts_time, clock.now() - f.timestamp, f.wall_time - f.timestamp))
            time.sleep(CONSUMER_S)
    except SourceError as e:
        got.append(e)
    return got


def _check_accounting(src, got, sent: int, connections: int) -> None:
    s = src.stats
    # every frame the producer sent was decoded, and each is delivered or skipped
    assert s["decoded"] == sent
    assert s["delivered"] + s["skipped_by_capture"] + s["not_sampled"] == s["decoded"]
    assert s["not_sampled"] == 0 and s["pending"] == 0
    assert s["delivered"] == len(got)
    assert s["frames_stream_clock"] == sent          # MPEG-TS carries pts: stream-clock times
    # the stream's own clock names each frame: decode order == frame number, none lost or repeated
    indices = [i for i, *_ in got]
    assert indices == sorted(set(indices))
    assert all(round(pts * FPS) == i for i, pts, *_ in got)
    # the cut and the resume are counted
    assert s["reconnects"] == connections - 1
    assert s["disconnects"] == connections
    assert s["connects"] == connections


def _check_no_backlog(src, got) -> None:
    """The consumer is 3x slower than the source: with a queue, the k-th delivered frame would
    wait about k * (CONSUMER_S - 1/FPS) (2 s after 100 frames); with the newest frame always,
    latency stays below one consumer step plus a few frame times, and capture skipped frames."""
    s = src.stats
    assert s["skipped_by_capture"] > s["delivered"]           # the source ran faster than the model
    lat = [lat for _, _, lat, _ in got]
    assert max(lat) <= DEADLINE_S, f"latency grew to {max(lat):.3f} s"
    # capture times from the stream clock never lie after decode (wall_time)
    assert all(behind >= -1e-9 for *_, behind in got)


# --------------------------------------------------------------------------- the two live sources


def test_tcp_stream_cut_and_resumed_every_frame_accounted_no_backlog():
    prod = _TcpProducer([120, 120], gap_s=0.3)
    clock = WallClock()
    src = live(prod.url, reconnect=QUICK, open_timeout_s=2, read_timeout_s=2, clock=clock)
    prod.start()
    got = _consume(src, clock)
    prod.join()
    err = got.pop()                                   # the port closed for good: the source gives up
    assert isinstance(err, SourceError)
    assert str(err).startswith(f"{prod.url}: lost, then cannot connect after 5 attempts")
    assert "\n" not in str(err)
    _check_accounting(src, got, prod.sent, connections=2)
    _check_no_backlog(src, got)
    assert src.stats["gap_s"] >= 0.2                  # the producer was away 0.3 s


def test_fifo_cut_and_resumed_every_frame_accounted_no_backlog(tmp_path):
    prod = _FifoProducer(tmp_path / "camera.ts", [120, 120], gap_s=0.3)
    assert classify(str(prod.path)) == "pipe"
    clock = WallClock()
    src = open_source(prod.path, reconnect=QUICK, open_timeout_s=0.2, read_timeout_s=2, clock=clock)
    assert src.kind == "pipe"
    prod.start()
    got = _consume(src, clock)
    prod.join()
    err = got.pop()                                   # no writer comes back: the source gives up
    assert isinstance(err, SourceError) and str(err).startswith(f"{prod.path}: lost, then no writer on the pipe")
    _check_accounting(src, got, prod.sent, connections=2)
    _check_no_backlog(src, got)


def test_runner_behind_live_source_keeps_latency_within_deadline():
    """The whole path: StreamRunner with a (simulated, sleeping) model 3x slower than the
    source: every delivered frame gets a record, and every frame that ran met its deadline."""
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.scheduler import Scheduler
    from streamgraph.runtime.simulate import SimulatedSession

    class SlowModel(SimulatedSession):
        def execute_frame(self, image, budget=None):
            time.sleep(CONSUMER_S)                    # real work on the wall clock
            return super().execute_frame(image, budget)

    prod = _TcpProducer([120, 120], gap_s=0.3)
    clock = WallClock()
    sched = Scheduler("drop_late", frame_deadline_ms=1000 * DEADLINE_S, ttft_ms=1000.0, budgets=[8])
    session = SlowModel(sched, {"encode": CONSUMER_S / 2, "prefill": CONSUMER_S / 2}, clock=clock)
    session.calibrate()
    src = live(prod.url, reconnect=Reconnect(attempts=50, initial_s=0.05, max_s=0.1), open_timeout_s=2,
               read_timeout_s=2, clock=clock)
    prod.stop_source = src                            # the operator stops the source at the end
    prod.start()
    StreamRunner([(session, src)]).run()
    prod.join()
    s, summary = src.stats, session.stats.summary(0)
    assert s["decoded"] == prod.sent
    assert s["delivered"] + s["skipped_by_capture"] == s["decoded"]
    assert s["reconnects"] == 1
    assert summary["sampled"] == s["delivered"]       # every delivered frame has a record
    ran = [f for f in session.frames if f.decision == "run"]
    assert ran and all(f.end - f.capture <= DEADLINE_S for f in ran)


def test_polling_latest_with_fps_grid(tmp_path):
    """``latest()`` (how the runner polls a live source) with a 20 fps grid on a 100 fps pipe:
    at most one frame per grid interval, consecutive indices, every decoded frame delivered,
    skipped or not sampled (also the one left when the source closes)."""
    prod = _FifoProducer(tmp_path / "cam", [60], gap_s=0)
    src = open_source(prod.path, fps=20, reconnect=QUICK, open_timeout_s=1, read_timeout_s=2)
    prod.stop_source = src
    prod.start()
    got = []
    while not src.ended:
        f = src.latest(timeout=0.01)
        if f is not None:
            got.append(f)
            time.sleep(0.012)                         # a consumer a little slower than the source
    prod.join()
    s = src.stats
    assert s["decoded"] == prod.sent == 60
    assert s["delivered"] + s["skipped_by_capture"] + s["not_sampled"] == 60 and s["pending"] == 0
    assert [f.index for f in got] == list(range(len(got))) and len(got) == s["delivered"] >= 2
    t0 = got[0].timestamp
    slots = [math.floor((f.timestamp - t0) * 20 + live_mod.EPS) for f in got]
    assert all(a < b for a, b in zip(slots, slots[1:]))   # one frame per grid interval at most
    assert s["not_sampled"] > 0


def test_polling_stops_after_max_frames(tmp_path):
    """The runner polls ``latest()``: with ``max_frames`` (``run --max-frames``) the source
    closes itself once that many frames were delivered, and ``ended`` says so."""
    prod = _FifoProducer(tmp_path / "cam", [30], gap_s=0)
    src = open_source(prod.path, max_frames=3, reconnect=QUICK, open_timeout_s=1, read_timeout_s=2)
    prod.start()
    got = []
    while not src.ended:
        f = src.latest(timeout=0.01)
        if f is not None:
            got.append(f)
    assert len(got) == 3 and not src.running
    assert src.latest(timeout=0) is None
    prod.thread.join(30)                              # the reader is gone: the writer ends, or its pipe breaks
    assert not prod.thread.is_alive() and (prod.error is None or isinstance(prod.error, BrokenPipeError))
    s = src.stats
    assert s["delivered"] == 3 and s["delivered"] + s["skipped_by_capture"] + s["not_sampled"] == s["decoded"]


# --------------------------------------------------------------------------- errors


def _refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_url_one_line_error_after_retry_budget():
    url = f"rtsp://user:secret@127.0.0.1:{_refused_port()}/cam"
    src = live(url, reconnect=Reconnect(attempts=2, initial_s=0.01, max_s=0.02))
    with pytest.raises(SourceError) as e:
        next(iter(src))
    msg = str(e.value)
    assert msg.startswith(f"{display_name(url)}: cannot connect after 3 attempts")
    assert "secret" not in msg and "\n" not in msg and "ConnectionRefusedError" in msg
    assert src.stats["failed_attempts"] == 3 and not src.running


def test_missing_device_one_line_error():
    dev = "/dev/video97"
    assert not os.path.exists(dev) and classify(dev) == "device"
    src = open_source(dev, reconnect=Reconnect(attempts=1, initial_s=0.01, max_s=0.01))
    with pytest.raises(SourceError, match=r"^/dev/video97: cannot open the V4L2 device after 2 attempts"):
        list(src)


def test_unsupported_scheme_and_not_live():
    with pytest.raises(SourceError, match="unsupported URL scheme 'foo'"):
        live("foo://camera")
    with pytest.raises(SourceError, match="not a live source"):
        live("clip.mp4")


def test_run_unreachable_source_one_line(onnx_bundle, capsys):
    url = f"tcp://127.0.0.1:{_refused_port()}"
    rc = main(["run", str(onnx_bundle), "--source", url, "--reconnect-attempts", "0"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: ") and f"{url}: cannot connect after 1 attempt" in lines[0]


def test_run_missing_device_not_mangled(onnx_bundle, capsys):
    # was: "error: rtsp:/127.0.0.1:.../cam: video file does not exist" (URL mangled as a path)
    url = f"rtsp://127.0.0.1:{_refused_port()}/cam"
    assert main(["run", str(onnx_bundle), "--video", url, "--reconnect-attempts", "0"]) == 1
    err = capsys.readouterr().err
    assert url in err and "does not exist" not in err
    assert main(["run", str(onnx_bundle), "--source", "/dev/video97", "--reconnect-attempts", "0"]) == 1
    err = capsys.readouterr().err
    assert "/dev/video97: cannot open the V4L2 device" in err and "does not exist" not in err


def test_run_refuses_speed_with_live_source(onnx_bundle, capsys):
    assert main(["run", str(onnx_bundle), "--source", "udp://127.0.0.1:9", "--speed", "2"]) == 1
    assert "is a live source" in capsys.readouterr().err


# --------------------------------------------------------------------------- CLI, stdin


def test_run_from_stdin_pipe_accounts_for_every_frame(onnx_bundle, tmp_path):
    """`ffmpeg ... -f mpegts - | streamgraph run BUNDLE --source - --fps 10`: a 20 fps stream
    on stdin, sampled at 10 fps on its capture times; stdin ends at EOF, normally; the report
    holds the capture counters and a record for every delivered frame."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "streamgraph.cli", "run", str(onnx_bundle), "--source", "-",
                             "--fps", "10", "--report", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        head = []
        for line in proc.stdout:                      # the camera starts once the run is ready
            head.append(line.decode())
            if line.startswith(b"live:"):
                break
        _produce(proc.stdin.write, 0, 40, fps=20)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"run did not end at EOF of stdin: {''.join(head)}{stdout.decode()}{stderr.decode()}")
        stdout = "".join(head).encode() + stdout
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr.decode()
    rep = json.loads((out / "report.json").read_text())
    src = rep["meta"]["source"]
    assert src["kind"] == "stdin" and src["path"] == "-"
    assert src["decoded"] == 40 and src["reconnects"] == 0 and src["disconnects"] == 0
    assert src["delivered"] + src["skipped_by_capture"] + src["not_sampled"] == 40
    assert src["not_sampled"] > 0 and src["delivered"] > 1
    assert rep["summary"]["sampled"] == src["delivered"]
    assert "source: -: decoded 40" in stdout.decode()


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("target, kind", [
    ("rtsp://cam.local/stream", "url"), ("RTMP://h/app", "url"), ("http://h/x.m3u8", "url"),
    ("udp://127.0.0.1:5000", "url"), ("-", "stdin"), ("pipe:", "stdin"), ("pipe:0", "stdin"),
    ("/dev/video0", "device"), ("clip.mp4", "file"), ("dir/a:b.mp4", "file"), ("C:/x.mp4", "file"),
])
def test_classify(target, kind):
    assert classify(target) == kind


def test_classify_existing_char_device_and_fifo(tmp_path):
    assert classify("/dev/null") == "device"
    os.mkfifo(tmp_path / "f")
    assert classify(str(tmp_path / "f")) == "pipe"


def test_display_name_hides_password():
    assert display_name("rtsp://admin:hunter2@10.0.0.5:554/s?x=1") == "rtsp://admin:***@10.0.0.5:554/s?x=1"
    assert display_name("rtsp://10.0.0.5/s") == "rtsp://10.0.0.5/s"
    assert display_name("/dev/video0") == "/dev/video0"


def test_file_path_still_opens_a_video_file():
    src = open_source(sample_clip(), fps=2, max_frames=3)
    assert isinstance(src, VideoSource) and len(list(src)) == 3


def test_reconnect_policy_bounds_and_backoff():
    r = Reconnect(attempts=5, initial_s=0.5, max_s=3)
    assert [r.delay(k) for k in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert r.budget_s() == pytest.approx(9.5)
    for bad in (dict(attempts=-1), dict(initial_s=0), dict(max_s=math.inf), dict(initial_s=2, max_s=1),
                dict(attempts=True)):
        with pytest.raises(ValueError):
            Reconnect(**bad)


@settings(max_examples=200, deadline=None)
@given(offset=st.floats(-1e3, 1e3), steps=st.lists(st.tuples(st.floats(0.001, 0.2), st.floats(0, 0.5)),
                                                   min_size=1, max_size=300))
def test_stream_clock_against_brute_force(offset, steps):
    """pts + the smallest (wall - pts) of the last PTS_WINDOW frames, monotone, never after
    the frame's decode time -- against a direct recomputation."""
    sc = live_mod._StreamClock()
    pts, walls, ptss, prev = 0.0, [], [], -math.inf
    for dt, delay in steps:
        pts += dt
        wall = max(walls[-1] if walls else -math.inf, pts + offset + delay)   # decode order: never backwards
        ptss.append(pts)
        walls.append(wall)
        t = sc.map(pts, wall)
        recent = [w - p for w, p in zip(walls[-live_mod.PTS_WINDOW:], ptss[-live_mod.PTS_WINDOW:])]
        expect = min(max(pts + min(recent), prev), wall)
        assert t == pytest.approx(expect, abs=1e-9)
        assert t <= wall + 1e-12 and t >= prev - 1e-12
        prev = t


def test_stream_clock_without_pts_is_the_wall_clock():
    sc = live_mod._StreamClock()
    assert [sc.map(None, w) for w in (1.0, 2.5, 3.0)] == [1.0, 2.5, 3.0]


# --------------------------------------------------------------------------- graph file


def _stream(extra: str) -> str:
    return graph_text().replace("stream: {fps: 2, frame_size: [64, 64]}",
                                "stream: {fps: 2, frame_size: [64, 64]" + extra + "}")


def test_graph_names_its_sources():
    from streamgraph.compiler.spec import parse_spec

    spec = parse_spec(_stream(", source: rtsp://cam/a"), "g.yaml")
    assert spec.stream.source == "rtsp://cam/a" and spec.normalized()["stream"]["source"] == "rtsp://cam/a"
    spec = parse_spec(_stream(", source: [a.mp4, 'udp://127.0.0.1:5000'], live: {attempts: 2, options: {framerate: 30}}"))
    assert spec.stream.source == ["a.mp4", "udp://127.0.0.1:5000"]
    assert spec.stream.live.attempts == 2 and spec.stream.live.options == {"framerate": "30"}
    # a graph without them normalizes as before (same lock key as bundles compiled before)
    assert set(parse_spec(graph_text()).normalized()["stream"]) == {"fps", "frame_size"}


@pytest.mark.parametrize("extra, message", [
    (", source: 'foo://x'", "stream.source: unsupported URL scheme 'foo'"),
    (", source: 3", "stream.source: expected a URL, device or path (or a list of them), got integer 3"),
    (", source: [a.mp4, 7]", "stream.source: item 1: expected a URL, device or path, got integer 7"),
    (", source: []", "stream.source: expected at least one source"),
    (", live: {initial_s: 2, max_s: 1}", "stream.live: max_s (1) must be >= initial_s (2)"),
    (", live: {attempts: -1}", "stream.live.attempts: must be >= 0, got -1"),
])
def test_graph_source_errors_are_located(extra, message):
    from streamgraph.compiler.spec import parse_spec

    with pytest.raises(SpecError) as e:
        parse_spec(_stream(extra), "g.yaml")
    assert str(e.value).startswith("g.yaml:4:") and message in str(e.value)


def test_run_takes_the_graph_source(tmp_path):
    """`run GRAPH` without --source/--video streams the graph's stream.source: a URL as
    written, a path relative to the graph file; --source overrides it."""
    import argparse

    from streamgraph.cli import _run_sources

    g = tmp_path / "g.yaml"
    g.write_text(_stream(", source: ['rtsp://u:p@cam/a', clips/a.mp4, '-']"))
    args = argparse.Namespace(video=None, speed=1.0, reconnect_attempts=None)
    assert _run_sources(args, g) == ["rtsp://u:p@cam/a", str(tmp_path / "clips" / "a.mp4"), "-"]
    args.video = ["/dev/video0"]
    assert _run_sources(args, g) == ["/dev/video0"]
    args.video, args.speed = None, 2.0
    with pytest.raises(SourceError.__mro__[1], match=r"--speed 2: rtsp://u:\*\*\*@cam/a is a live source"):
        _run_sources(args, g)
