"""Live sources on this machine: a camera-like MPEG-TS stream over TCP on 127.0.0.1, cut for a
while in the middle, read by a LiveSource behind a consumer slower than the camera.

Measures, for the newest-frame capture (LiveSource) and for a plain queue of every decoded
frame (what a naive reader does): frames decoded / delivered / skipped, the reconnect and
its gap, and the latency of each delivered frame (clock now - capture time) at the moment
the consumer takes it.

    .venv/bin/python bench/live_sources.py [--seconds 10] [--fps 30] [--size 480x640]
        [--consumer-ms 100] [--cut 1.0] [--out bench/results/live_sources.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import socket
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamgraph.errors import SourceError  # noqa: E402
from streamgraph.runtime.stream import WallClock  # noqa: E402
from streamgraph.runtime.live import Reconnect, live  # noqa: E402


class _Sink:
    def __init__(self, write):
        self.write_bytes = write

    def write(self, data) -> int:
        self.write_bytes(bytes(data))
        return len(data)


def produce(write, first: int, n: int, fps: float, size: tuple[int, int]) -> None:
    h, w = size
    out = av.open(_Sink(write), "w", format="mpegts", buffer_size=4096,
                  container_options={"muxdelay": "0", "muxpreload": "0", "flush_packets": "1"})
    st = out.add_stream("mpeg4", rate=int(fps))
    st.width, st.height, st.pix_fmt = w, h, "yuv420p"
    st.codec_context.max_b_frames = 0
    st.codec_context.gop_size = int(fps)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    for i in range(n):
        img = np.roll(base, 4 * (first + i), axis=1)          # a moving scene
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = first + i
        for p in st.encode(frame):
            out.mux(p)
        time.sleep(max(0.0, t0 + (i + 1) / fps - time.perf_counter()))
    for p in st.encode():
        out.mux(p)
    out.close()


def serve(port_holder: list, parts: list[int], cut: float, fps: float, size) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port_holder[0]))
    srv.listen(1)
    sent = 0
    for k, n in enumerate(parts):
        if k:
            time.sleep(cut)
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", port_holder[0]))
            srv.listen(1)
        conn, _ = srv.accept()
        srv.close()
        with conn:
            produce(conn.sendall, sent, n, fps, size)
        sent += n
    port_holder.append(sent)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pct(values, q):
    return float(np.percentile(values, q)) if values else None


def run_live(args, size) -> dict:
    port = free_port()
    n = int(args.seconds * args.fps / 2)
    holder = [port]
    th = threading.Thread(target=serve, args=(holder, [n, n], args.cut, args.fps, size), daemon=True)
    th.start()
    time.sleep(0.2)
    clock = WallClock()
    src = live(f"tcp://127.0.0.1:{port}", reconnect=Reconnect(attempts=3, initial_s=0.25, max_s=1.0),
               open_timeout_s=2, read_timeout_s=2, clock=clock)
    lat, behind_decode, error = [], [], None
    t0 = time.perf_counter()
    try:
        for f in src:
            lat.append(clock.now() - f.timestamp)
            behind_decode.append(f.wall_time - f.timestamp)
            time.sleep(args.consumer_ms / 1000)
    except SourceError as e:                       # the server is gone: the source gives up
        error = str(e)
    th.join()
    s = src.stats
    return {"kind": "LiveSource (newest frame)", "sent": holder[-1], **{k: s[k] for k in (
        "decoded", "delivered", "skipped_by_capture", "not_sampled", "connects", "disconnects", "reconnects",
        "gap_s", "failed_attempts", "frames_stream_clock")},
        "accounted": s["delivered"] + s["skipped_by_capture"] + s["not_sampled"] == s["decoded"] == holder[-1],
        "latency_ms": {"p50": 1000 * pct(lat, 50), "p99": 1000 * pct(lat, 99), "max": 1000 * max(lat),
                       "last": 1000 * lat[-1]},
        "pts_capture_before_decode_ms": {"p50": 1000 * pct(behind_decode, 50), "max": 1000 * max(behind_decode)},
        "wall_s": time.perf_counter() - t0, "end": error}


def run_queue(args, size) -> dict:
    """The naive reader: every decoded frame into a queue, the consumer takes them in order."""
    port = free_port()
    n = int(args.seconds * args.fps)
    holder = [port]
    th = threading.Thread(target=serve, args=(holder, [n], 0.0, args.fps, size), daemon=True)
    th.start()
    time.sleep(0.2)
    clock = WallClock()
    q: queue.Queue = queue.Queue()

    def reader():
        with av.open(f"tcp://127.0.0.1:{port}", timeout=(2, 2)) as c:
            for frame in c.decode(video=0):
                q.put((clock.now(), frame))
        q.put(None)

    threading.Thread(target=reader, daemon=True).start()
    lat = []
    deadline = time.perf_counter() + args.seconds + 1.0       # consume for as long as the stream lasts
    while time.perf_counter() < deadline:
        item = q.get()
        if item is None:
            break
        t, frame = item
        frame.to_ndarray(format="rgb24")
        lat.append(clock.now() - t)
        time.sleep(args.consumer_ms / 1000)
    th.join()
    return {"kind": "queue of every frame (naive)", "sent": holder[-1], "delivered": len(lat),
            "left_in_queue_at_end": q.qsize(),
            "latency_ms": {"p50": 1000 * pct(lat, 50), "p99": 1000 * pct(lat, 99), "max": 1000 * max(lat),
                           "last": 1000 * lat[-1]}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="stream length (s), cut in the middle")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--size", default="480x640", help="HxW of the camera frames")
    p.add_argument("--consumer-ms", type=float, default=100.0, help="work per taken frame (a model), ms")
    p.add_argument("--cut", type=float, default=1.0, help="seconds the server is away in the middle")
    p.add_argument("--out", default="bench/results/live_sources.json")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    res = {"config": vars(args), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                             "loadavg_before": os.getloadavg(), "pyav": av.__version__},
           "live": run_live(args, (h, w)), "queue": run_queue(args, (h, w))}
    res["machine"]["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
