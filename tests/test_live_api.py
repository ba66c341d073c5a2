"""Live API: questions asked from other threads while frames stream (StreamRunner.ask and
its Answer handle), live sources on the wall clock, and the robot-loop example.

Reference semantics: a question the runner served between two frames must be answered
exactly as a session that ran the same frames and then the question, one after the other
(same engines, same order: logits of every step compared). No assertion reads wall-clock
durations; timeouts only guard against hangs."""
from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, frames

HANG_S = 120          # no test here should come near this; it only stops a hang


class _Timed:
    """A file-like source: frames with timestamps (a recording)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def _replay(session, events, video) -> list[str]:
    """Run ``events`` (("frame", index) / ("ask", text)) on ``session`` in order."""
    answers = []
    for kind, x in events:
        if kind == "frame":
            session.push_frame(video[x], budget=session.budgets[-1])
        else:
            answers.append("".join(session.ask(x)))
    return answers


def _same_trace(a, b) -> None:
    assert [t["kind"] for t in a] == [t["kind"] for t in b]
    for ta, tb in zip(a, b):
        assert np.array_equal(ta["logits"], tb["logits"])


def test_questions_from_another_thread_are_served_between_frames(onnx_bundle):
    """Frames stream on the wall clock in the runner's thread; a control thread asks three
    questions while they stream. Each is answered between two frames, and its answer, the
    logits of every step and the cache are those of the same order run sequentially."""
    from streamgraph.runtime.stream import WallClock
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.session import Engines

    engines = Engines.load(onnx_bundle)
    session = engines.session(overload="fifo", trace=True)
    video = frames(24, fps=40)
    events: list[tuple[str, object]] = []           # appended by the runner's thread only

    def on_frame(_i, rec):
        assert rec.decision == "run"
        events.append(("frame", rec.index))

    runner = StreamRunner([(session, video)], clock=WallClock(), on_frame=on_frame, keep_open=True,
                          on_answer=lambda q, rec: events.append(("ask", q.text)))
    worker = threading.Thread(target=runner.run)
    worker.start()
    handles = []
    for k in range(3):                                # the control thread
        while sum(e[0] == "frame" for e in events) < 4 * (k + 1) and worker.is_alive():
            time.sleep(0.001)
        handles.append(runner.ask(f"question {k}?"))
    texts = [h.result(timeout=HANG_S) for h in handles]
    while not runner.sources_ended:
        time.sleep(0.001)
    runner.stop()
    worker.join(HANG_S)
    assert not worker.is_alive()
    assert [e for e in events if e[0] == "ask"] == [("ask", f"question {k}?") for k in range(3)]
    assert sum(e[0] == "frame" for e in events) == len(video)
    for h, text in zip(handles, texts):
        rec = h.record
        assert rec is not None and rec.answer == text and h.text == text
        assert rec.ttft_ms is not None and rec.ttft_ms >= 0
        assert rec.deadline == pytest.approx(rec.asked_at + session.scheduler.ttft)
        assert rec.ttft_met == (rec.asked_at + rec.ttft_ms / 1000.0 <= rec.deadline + 1e-9)
    # reference: the same order, one call after the other, on a fresh session
    alone = engines.session(overload="fifo", trace=True)
    assert _replay(alone, events, video) == texts
    _same_trace(alone.trace, session.trace)
    assert np.array_equal(alone.kv.data, session.kv.data)


def test_answer_streams_pieces_to_an_iterator_and_callbacks(onnx_bundle):
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.session import Engines

    engines = Engines.load(onnx_bundle)
    session = engines.session(overload="fifo")
    runner = StreamRunner([(session, frames(3))], keep_open=True)
    pieces, done = [], []
    h = runner.ask("what is there?", max_new_tokens=5, on_piece=pieces.append, on_done=done.append)
    iterated: list[str] = []
    reader = threading.Thread(target=lambda: iterated.extend(h))   # a consumer on its own thread
    reader.start()
    worker = threading.Thread(target=runner.run)
    worker.start()
    assert h.wait(HANG_S)
    reader.join(HANG_S)
    runner.stop()
    worker.join(HANG_S)
    assert not worker.is_alive() and not reader.is_alive()
    assert iterated == pieces and "".join(pieces) == h.result() == h.record.answer
    assert 1 <= h.record.new_tokens <= 5
    assert done == [h]                                   # called once, with the handle
    # the question was asked before any frame: the reference asks first, then the frames
    alone = engines.session(overload="fifo")
    assert "".join(alone.ask("what is there?", max_new_tokens=5)) == h.result()


def test_ask_refuses_bad_input_and_a_stopped_runner(onnx_bundle):
    from streamgraph.errors import StreamClosedError
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.session import Engines

    session = Engines.load(onnx_bundle).session(overload="fifo")
    runner = StreamRunner([(session, frames(2))])
    for bad in ("", "  "):
        with pytest.raises(ValueError, match="non-empty"):
            runner.ask(bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        runner.ask("q?", max_new_tokens=0)
    with pytest.raises(ValueError, match="stream 1"):
        runner.ask("q?", stream=1)
    with pytest.raises(ValueError, match="integer"):
        runner.ask("q?", stream="0")
    runner.run()
    with pytest.raises(StreamClosedError, match="stopped") as e:
        runner.ask("too late?")
    assert "\n" not in str(e.value)


def test_stop_fails_waiting_questions_and_cancel_withdraws_one(onnx_bundle):
    from streamgraph.errors import StreamClosedError
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.session import Engines

    session = Engines.load(onnx_bundle).session(overload="fifo")
    runner = StreamRunner([(session, frames(2))], keep_open=True)
    kept = runner.ask("kept?")
    withdrawn = runner.ask("withdrawn?")
    assert withdrawn.cancel() and withdrawn.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        list(withdrawn)
    while not kept.done():                           # served first, ahead of the frames
        assert runner.step()
    assert not session.frames and kept.result() == kept.record.answer
    waiting = runner.ask("never served?")
    runner.stop()
    assert runner.step() is False
    with pytest.raises(StreamClosedError, match="never served"):
        waiting.result(timeout=HANG_S)
    assert [r.text for r in session.questions] == ["kept?"]       # the withdrawn one never ran


def test_stop_ends_an_answer_early_and_the_stream_stays_consistent(onnx_bundle):
    """Answer.stop() after the first piece: the result is that piece, and everything after
    is what a session gets when the answer's generator is closed after its first piece."""
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.session import Engines

    engines = Engines.load(onnx_bundle)
    session = engines.session(overload="fifo", trace=True)
    video = frames(3)
    events: list = []
    runner = StreamRunner([(session, video)], keep_open=True,
                          on_frame=lambda i, rec: events.append(("frame", rec.index)),
                          on_answer=lambda q, rec: events.append(("ask", q.text)))
    holder = {}
    h = runner.ask("long answer?", max_new_tokens=8, on_piece=lambda p: holder["h"].stop())
    holder["h"] = h
    while not h.done():
        assert runner.step()
    assert h.result() == h.record.answer and h.record.new_tokens == 1
    after = runner.ask("next?")
    while not (after.done() and runner.sources_ended):
        assert runner.step()
    runner.stop()
    assert runner.step() is False
    alone = engines.session(overload="fifo", trace=True)
    for kind, x in events:
        if kind == "frame":
            alone.push_frame(video[x], budget=alone.budgets[-1])
        elif x == "long answer?":
            gen = alone.ask(x, max_new_tokens=8)
            assert next(gen) == h.result()
            gen.close()
        else:
            assert "".join(alone.ask(x)) == after.result()
    assert [e[0] for e in events].count("frame") == len(video)
    _same_trace(alone.trace, session.trace)


class _LiveIterable:
    """A live source without a newest-frame slot: yields frames as a camera would, paced
    by a sleep (the runner reads it on a thread of its own)."""

    live = True

    def __init__(self, n, period_s):
        self.n, self.period_s = n, period_s
        self.video = frames(n)

    def __iter__(self):
        for f in self.video:
            time.sleep(self.period_s)
            yield f


class _NewestOnly:
    """A live source holding only its newest frame (the LiveSource protocol: ``latest``,
    ``clock``, ``ended``, ``close``), fed by a thread faster than the model."""

    live = True

    def __init__(self, n, period_s):
        self.video, self.period_s = frames(n), period_s
        self.clock = None
        self.captured = self.taken = self.overwritten = 0
        self._slot, self._ended, self.closed = None, False, False
        self._lock = threading.Lock()
        self._thread = None

    @property
    def running(self):
        return self._thread is not None

    def _capture(self):
        from streamgraph.runtime.sources import Frame

        for f in self.video:
            time.sleep(self.period_s)
            with self._lock:
                self.overwritten += self._slot is not None
                self._slot = Frame(f.image, self.clock.now(), f.index, f.source_index)
                self.captured += 1
        with self._lock:
            self._ended = True

    def latest(self, timeout=None):
        if self._thread is None:
            self._thread = threading.Thread(target=self._capture, daemon=True)
            self._thread.start()
        with self._lock:
            f, self._slot = self._slot, None
            self.taken += f is not None
            return f

    @property
    def ended(self):
        with self._lock:
            return self._ended and self._slot is None

    def close(self, timeout=None):
        self.closed = True


@pytest.mark.parametrize("make", [lambda: _LiveIterable(12, 0.002), lambda: _NewestOnly(40, 0.001)],
                         ids=["thread", "newest-slot"])
def test_live_source_runs_on_the_wall_clock_calibrated_and_accounts_for_every_frame(onnx_bundle, make):
    from streamgraph.runtime.stream import WallClock
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.session import Engines

    session = Engines.load(onnx_bundle).session(overload="fifo")
    assert not session.scheduler.costs.mean
    src = make()
    runner = StreamRunner([(session, src)])
    assert type(runner.clock) is WallClock and session.clock is runner.clock     # the default for live
    assert session.scheduler.costs.predict_frame(session.budgets[-1]) is not None  # calibrated
    asked = runner.ask("what now?")
    runner.run()
    assert asked.done() and asked.exception() is None
    recs = list(session.frames)
    dropped = [r for r in recs if r.decision == "drop"]
    assert all(r.reason == "superseded by a newer live frame" for r in dropped)
    assert all(r.decision in ("run", "drop") for r in recs)
    assert all(a.capture <= b.capture for a, b in zip(recs, recs[1:]) if a.decision == b.decision == "run")
    if isinstance(src, _NewestOnly):             # captured = taken by the runner + overwritten in the slot
        assert src.clock is runner.clock and src.closed
        assert len(recs) == src.taken and src.captured == src.taken + src.overwritten
    else:                                        # every frame reached the runner: run or dropped
        assert len(recs) == len(src.video)
    for r in recs:                               # no backlog: a frame ran with none behind it
        assert r.decision == "drop" or r.queue_len == 1


def test_polled_live_source_stops_at_its_max_frames(onnx_bundle):
    """A newest-frame source's ``max_frames`` ends the stream as its own iteration would."""
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.session import Engines

    session = Engines.load(onnx_bundle).session(overload="fifo")
    src = _NewestOnly(400, 0.001)
    src.max_frames = 3
    StreamRunner([(session, src)], calibrate=False).run()
    assert src.taken == 3 and len(session.frames) == 3 and src.closed


def test_wall_clock_runner_waiting_for_a_frame_wakes_for_a_question(onnx_bundle):
    """The next frame is 1000 s away: a question asked meanwhile is answered now, not then."""
    from streamgraph.runtime.stream import WallClock
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.session import Engines

    session = Engines.load(onnx_bundle).session(overload="fifo")
    f0, f1 = frames(2)
    far = type(f1)(f1.image, 1000.0, 1, 1)
    runner = StreamRunner([(session, [f0, far])], clock=WallClock())
    worker = threading.Thread(target=runner.run, daemon=True)
    worker.start()
    while not session.frames:
        time.sleep(0.001)
    h = runner.ask("still there?")
    assert h.result(timeout=HANG_S) == h.record.answer      # would wait 1000 s if the wait were not woken
    runner.stop()
    worker.join(HANG_S)
    assert not worker.is_alive() and len(session.frames) == 1


def test_live_source_error_ends_the_run_in_one_line(onnx_bundle):
    from streamgraph.errors import SourceError, StreamClosedError
    from streamgraph.runtime.stream import StreamRunner
    from streamgraph.runtime.session import Engines

    class Broken:
        live = True

        def __iter__(self):
            yield frames(1)[0]
            raise OSError("connection reset by peer")

    session = Engines.load(onnx_bundle).session(overload="fifo")
    runner = StreamRunner([(session, Broken())], calibrate=False)
    h = runner.ask("anyone?")
    with pytest.raises(SourceError, match="stream 0: live source failed: OSError: connection reset") as e:
        runner.run()
    assert "\n" not in str(e.value)
    assert h.done()
    if h.exception() is not None:                # served before the error, or failed with it
        assert isinstance(h.exception(), StreamClosedError)


def test_robot_loop_example_runs(onnx_bundle):
    """examples/robot_loop.py on the tiny bundle and the StreamQA demo episode (4x faster):
    every question of the episode is asked from the control thread and answered."""
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "robot_loop.py"), str(onnx_bundle),
                           "--speed", "4", "--answer-deadline", "60"],
                          capture_output=True, text=True, timeout=HANG_S, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    from streamgraph.runtime import sources
    from streamgraph.streamqa.suite import load_suite

    demo = load_suite(sources.streamqa_demo())
    asked = [ln for ln in lines if ln.startswith("  Q ")]
    assert [ln.split("'")[1] for ln in asked] == [it.question for it in demo.items]
    assert f"questions: {len(demo.items)} asked, {len(demo.items)} answered in time, 0 late, 0 failed" in lines[-1]
    n = len(list(sources.video(demo.path / demo.items[0].video, fps=2)))
    run, dropped = (int(w) for w in re.match(r"frames: (\d+) run, (\d+) dropped", lines[-1]).groups())
    assert run + dropped == n                        # every frame of the episode accounted for


def test_robot_loop_example_bad_bundle_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "robot_loop.py"), str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=HANG_S, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert Path(tmp_path / "none").name in proc.stderr
