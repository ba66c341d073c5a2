#!/usr/bin/env python
"""Make ``streamgraph/data/sample_clip.mp4``, the small real clip shipped with the package.

Source: OpenCV's ``samples/data/vtest.avi`` (768x576, 10 fps street scene; Apache-2.0 AND
BSD-3-Clause). The clip is its first 20 s of stream time, downscaled 3x to 256x192 (aspect
kept) with area interpolation, 10 fps, encoded by PyAV's bundled FFmpeg as H.264 (libx264,
single-threaded, CRF 23, 1 s GOP) in MP4, or MPEG-4 Part 2 at 400 kb/s where libx264
is missing.

The output is deterministic for a given PyAV/FFmpeg build: single-threaded encoding,
bit-exact flags, fixed timestamps and no creation time.

    python scripts/make_sample_clip.py [--src PATH] [--out PATH]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from fractions import Fraction
from pathlib import Path

import av

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "vtest.avi"
DEFAULT_OUT = REPO / "streamgraph" / "data" / "sample_clip.mp4"

SECONDS = 20.0
WIDTH, HEIGHT = 256, 192
FPS = 10
GOP = 10  # one keyframe per second: cheap seeking, still small
CRF = 23
MAX_BYTES = 1_500_000
MPEG4_BITRATE = 400_000  # fallback codec only: ~1 MB for 20 s


def pick_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def make_clip(src: Path, out: Path) -> dict:
    codec = pick_codec()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    n = 0
    with av.open(str(src)) as inp:
        istream = inp.streams.video[0]
        with av.open(str(tmp), mode="w", format="mp4",
                     container_options={"movflags": "+faststart"}) as outc:
            outc.flags |= av.container.Flags.bitexact.value
            outc.metadata["comment"] = (
                "First 20 s of OpenCV samples/data/vtest.avi, 256x192, 10 fps; "
                "Apache-2.0 AND BSD-3-Clause"
            )
            ostream = outc.add_stream(codec, rate=FPS)
            ostream.width, ostream.height = WIDTH, HEIGHT
            ostream.pix_fmt = "yuv420p"
            ostream.time_base = Fraction(1, FPS)
            ostream.codec_context.time_base = Fraction(1, FPS)
            ostream.codec_context.gop_size = GOP
            ostream.codec_context.thread_count = 1
            ostream.codec_context.flags |= av.codec.context.Flags.bitexact
            if codec == "libx264":
                ostream.options = {"crf": str(CRF), "preset": "slow", "threads": "1",
                                   "keyint": str(GOP), "min-keyint": str(GOP)}
            else:
                ostream.codec_context.bit_rate = MPEG4_BITRATE
            t0 = None
            for frame in inp.decode(istream):
                t0 = frame.time if t0 is None else t0
                if frame.time - t0 >= SECONDS - 1e-6:
                    break
                small = frame.reformat(width=WIDTH, height=HEIGHT, format="yuv420p",
                                       interpolation="AREA")
                small.pts = n
                small.time_base = Fraction(1, FPS)
                for packet in ostream.encode(small):
                    outc.mux(packet)
                n += 1
            for packet in ostream.encode(None):
                outc.mux(packet)
    tmp.replace(out)
    data = out.read_bytes()
    return {"codec": codec, "frames": n, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"source video (default {DEFAULT_SRC})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .mp4 (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if not args.src.is_file():
        print(f"error: {args.src}: source video does not exist", file=sys.stderr)
        return 2
    info = make_clip(args.src, args.out)
    print(f"{args.out}: {info['codec']}, {info['frames']} frames, {WIDTH}x{HEIGHT} @ {FPS} fps, "
          f"{info['bytes']} bytes, sha256 {info['sha256']}")
    if info["bytes"] >= MAX_BYTES:
        print(f"error: clip is {info['bytes']} bytes, over the {MAX_BYTES} byte target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
