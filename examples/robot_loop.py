"""A robot loop on streamgraph's live API (docs/live.md, "Robot loop").

Two threads, as on a robot:

* the **frames** thread runs a :class:`~streamgraph.runtime.stream.StreamRunner`: it takes
  frames from the source (a camera, a network stream or a pipe; or a video file replayed in
  real time) and runs each through the model under its deadline;
* the **control** thread (here the main thread) runs the robot's control loop at
  ``--control-hz``. When it needs to know something it asks with ``runner.ask(...,
  on_done=...)``; the callback hands the answer back through a queue, and the loop uses it
  only if it came within ``--answer-deadline`` seconds. A late answer is stopped and the
  loop acts without it: the control loop never blocks on the model.

Default: the StreamQA checkpoint (``graphs/streamqa.yaml``, compiled on first use; a
compiled bundle directory works too) watching the StreamQA demo episode, asked the
episode's questions at their times and scored against the episode's scene state::

    python examples/robot_loop.py                                   # ~6 s, real time
    python examples/robot_loop.py build/streamqa-tiny --speed 4     # a compiled bundle, 4x faster
    python examples/robot_loop.py BUNDLE --source rtsp://cam.local/stream --question "Is the path clear?"

Exit status 0; a bad bundle, graph or source ends with one line ``error: ...`` and status 1.
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from pathlib import Path

from streamgraph.errors import StreamgraphError

REPO = Path(__file__).resolve().parents[1]


def open_engines(target: str):
    """The engines of a bundle directory, or of a graph file compiled first (needs the
    ``compile`` extra)."""
    from streamgraph.runtime.session import Engines

    path = Path(target)
    if path.is_file():
        from streamgraph.compiler.compile import compile_graph

        path = compile_graph(path, None).bundle.path
    return Engines.load(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", nargs="?", default=str(REPO / "graphs" / "streamqa.yaml"),
                    help="compiled bundle directory or graph file (default: graphs/streamqa.yaml)")
    ap.add_argument("--source", help="camera (/dev/video0), URL (rtsp://...), pipe, or video file "
                                     "(default: the StreamQA demo episode, with its questions)")
    ap.add_argument("--question", help="question to ask every --ask-every seconds (default: the episode's)")
    ap.add_argument("--ask-every", type=float, default=2.0, help="seconds between questions (default 2)")
    ap.add_argument("--answer-deadline", type=float,
                    help="seconds the control loop waits for an answer (default: 2 x the graph's slo.ttft_ms)")
    ap.add_argument("--control-hz", type=float, default=20.0, help="control loop rate (default 20)")
    ap.add_argument("--speed", type=float, default=1.0, help="replay a video file this much faster")
    ap.add_argument("--seconds", type=float, help="stop after this many seconds")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (StreamgraphError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def run(args) -> int:
    from streamgraph.runtime import sources
    from streamgraph.runtime.stream import WallClock
    from streamgraph.runtime.stream import StreamRunner

    engines = open_engines(args.target)
    session = engines.session()                      # no clock given: the runner picks one
    fps = session.bundle.manifest["stream"]["fps"]
    size = tuple(session.plan.image_size) if session.plan.resample == "ffmpeg_bilinear" else None

    # what to ask, when (stream seconds), and the truth when known
    plan: list[tuple[float, str, str | None]] = []
    src_name = args.source
    if args.source is None:
        from streamgraph.streamqa.suite import load_suite

        demo = load_suite(sources.streamqa_demo())
        src_name = str(demo.path / demo.items[0].video)
        if args.question is None:
            plan = [(it.ask_time, it.question, it.answer) for it in demo.items]
    if not plan:
        plan = [(args.ask_every * (k + 1), args.question or "What do you see?", None) for k in range(10_000)]

    try:
        from streamgraph.runtime import live
    except ImportError:                              # a runtime without live sources: files only
        live = None
    if live is not None and live.is_live(src_name):  # camera, URL, pipe: newest frame first, wall clock
        frames = live.open_source(src_name, fps=fps, size=size)
        clock, speed = None, 1.0
    else:                                            # a recording, replayed in real time
        frames = sources.video(src_name, fps=fps, size=size)
        clock, speed = WallClock(), args.speed
    # live sources: wall clock + calibration by default; a file replayed in real time: say so
    # keep_open: questions are still answered after a recording ends (the loop stops the runner)
    runner = StreamRunner([(session, frames)], clock=clock, calibrate=True, speed=speed, keep_open=True)
    deadline_s = args.answer_deadline or 2 * session.scheduler.ttft

    answers: queue.Queue = queue.Queue()             # filled by the runner's thread (callback)
    stats = {"asked": 0, "on_time": 0, "late": 0, "failed": 0, "correct": 0, "scored": 0}
    failure: list[BaseException] = []

    def frames_loop() -> None:                       # the frames thread
        try:
            runner.run()
        except BaseException as e:                   # e.g. a camera gone for good: reported below
            failure.append(e)

    frames_thread = threading.Thread(target=frames_loop, name="frames", daemon=True)
    t0 = time.monotonic()
    frames_thread.start()
    print(f"robot loop: {session.bundle.name} on {src_name} ({'x%g' % speed if clock else 'live'}), "
          f"control at {args.control_hz:g} Hz, answer deadline {1000 * deadline_s:.0f} ms", flush=True)

    waiting = None                                   # (answer handle, asked at monotonic, truth)
    step = 1.0 / args.control_hz
    try:
        while frames_thread.is_alive():
            now = time.monotonic()
            if args.seconds is not None and now - t0 >= args.seconds:
                break
            if waiting is None and runner.sources_ended and (not plan or plan[0][2] is None):
                break                                # the recording ended, nothing left to ask about it
            # 1. ask when it is time (stream time of the runner's clock), one question at a time
            if waiting is None and plan and runner.clock.now() * speed >= plan[0][0]:
                _, text, truth = plan.pop(0)
                try:
                    handle = runner.ask(text, on_done=answers.put)
                except StreamgraphError:             # the stream ended meanwhile
                    break
                waiting = (handle, now, truth)
                stats["asked"] += 1
            # 2. use an answer that came in time; give up on one that is late
            if waiting is not None:
                handle, asked, truth = waiting
                try:
                    got = answers.get_nowait()
                except queue.Empty:
                    got = None
                if got is handle:
                    waiting = None
                    act_on(handle, asked, truth, deadline_s, stats)
                elif now - asked > deadline_s:
                    handle.stop()                    # frees the executor for frames
                    waiting = None
                    stats["late"] += 1
                    print(f"  {handle.question.text!r}: no answer within {1000 * deadline_s:.0f} ms; "
                          f"acting without it", flush=True)
            # 3. the rest of the control step (motors, sensors, ...) would go here
            time.sleep(step)
    finally:
        runner.stop()
        frames_thread.join(30)
    frames_rep = session.report().summary
    print(f"frames: {frames_rep.get('processed', 0)} run, {frames_rep.get('dropped', 0)} dropped, "
          f"{frames_rep.get('deadline_misses', 0)} missed; questions: {stats['asked']} asked, {stats['on_time']} "
          f"answered in time, {stats['late']} late, {stats['failed']} failed"
          + (f"; {stats['correct']}/{stats['scored']} correct" if stats["scored"] else ""), flush=True)
    if failure:
        raise failure[0] if isinstance(failure[0], StreamgraphError) else StreamgraphError(str(failure[0]))
    return 0


def act_on(handle, asked: float, truth: str | None, deadline_s: float, stats: dict) -> None:
    """The control loop's use of an answer (here: print it; a robot would act on it)."""
    took = time.monotonic() - asked
    if handle.exception() is not None:
        stats["failed"] += 1
        print(f"  {handle.question.text!r}: failed: {handle.exception()}", flush=True)
        return
    on_time = took <= deadline_s
    stats["on_time" if on_time else "late"] += 1
    line = (f"  Q {handle.question.text!r} -> {handle.result()!r} (TTFT {handle.ttft_ms:.0f} ms, "
            f"{'within' if handle.ttft_met else 'over'} the TTFT deadline; answer in {1000 * took:.0f} ms)")
    if truth is not None:
        from streamgraph.streamqa.suite import normalize_answer

        ok = normalize_answer(handle.result()) == normalize_answer(truth)
        stats["scored"] += 1
        stats["correct"] += ok
        line += f" truth {truth!r}: {'correct' if ok else 'wrong'}"
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
