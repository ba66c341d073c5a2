"""Runtime hardening (issue #10, part A): nothing measured is lost, no runtime input hangs,
the NaN/Inf guard, the question API, truncated videos.

References are independent of the code under test: records are recounted from
records.jsonl, percentiles recomputed with numpy, answers compared with a run that skips
the frame, header frame counts read with PyAV directly.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamgraph.cli import main
from streamgraph.errors import EngineError, SourceError
from streamgraph.runtime.metrics import read_records
from streamgraph.runtime.stream import Distribution, RecordWriter
from streamgraph.runtime.stream import Question, StreamRunner
from streamgraph.runtime.scheduler import Scheduler
from streamgraph.runtime.simulate import SimulatedSession
from streamgraph.runtime.sources import Frame, sample_clip, sample_indices, video
from tests.conftest import frames

REPO = Path(__file__).resolve().parents[1]
COSTS = {"preprocess": 0.001, "encode": 0.010, "prefill": 0.005}


@contextlib.contextmanager
def hang_guard(seconds: int):
    """Fail instead of hanging (SIGALRM in the main thread)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s (hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("error: "), err
    return err


def _cli(*args) -> list[str]:
    exe = Path(sys.executable).with_name("streamgraph")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "streamgraph.cli"]


# ------------------------------------------------------------------ 1. records on every exit path
class _Boom:
    """Patches the ORT backend: after calibration, the ``n``-th call of ``engine`` raises."""

    def __init__(self, monkeypatch, engine: str, n: int, exc: BaseException):
        from streamgraph.backends.onnxruntime import OnnxRuntimeBackend
        from streamgraph.runtime.session import Session

        self.calls, self.armed = 0, False
        real_run, real_cal = OnnxRuntimeBackend.run, Session.calibrate
        boom = self

        def run(be, name, inputs):
            if boom.armed and name == engine:
                boom.calls += 1
                if boom.calls == n:
                    raise exc
            return real_run(be, name, inputs)

        def calibrate(session, *a, **k):
            out = real_cal(session, *a, **k)
            boom.armed = True
            return out

        monkeypatch.setattr(OnnxRuntimeBackend, "run", run)
        monkeypatch.setattr(Session, "calibrate", calibrate)


@pytest.mark.parametrize("exc", [RuntimeError("injected ORT failure"), MemoryError(), OSError(5, "I/O error")],
                         ids=["RuntimeError", "MemoryError", "OSError"])
def test_backend_error_mid_stream_keeps_every_record(onnx_bundle, tmp_path, capsys, monkeypatch, exc):
    _Boom(monkeypatch, "vision_encoder", 10, exc)          # the 10th frame's encoder fails
    out = tmp_path / "rep"
    rc = main(["run", str(onnx_bundle), "--video", str(sample_clip()), "--fps", "2", "--max-frames", "20",
               "--overload", "fifo", "--report", str(out)])
    assert rc == 1
    err = _error_line(capsys)
    assert "frame 9 (encode stage)" in err and "vision_encoder" in err and type(exc).__name__ in err
    recs = read_records(out / "records.jsonl")
    assert [r["index"] for r in recs] == list(range(10))
    assert [r["decision"] for r in recs] == ["run"] * 9 + ["error"]
    assert recs[-1]["failed_stage"] == "encode" and recs[-1]["error_type"] == "EngineError"
    rep = json.loads((out / "report.json").read_text())
    assert rep["summary"]["processed"] == 9 and rep["summary"]["errors"] == 1 and rep["summary"]["sampled"] == 10
    assert rep["records"]["jsonl_frames"] == len(recs)
    assert [f["index"] for f in rep["frames"]] == list(range(10))


def _wait_lines(path: Path, n: int, proc, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no records appeared")


@pytest.mark.parametrize("sig,rc,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_keeps_every_record(onnx_bundle, tmp_path, sig, rc, word):
    out = tmp_path / "rep"
    proc = subprocess.Popen(_cli() + ["run", str(onnx_bundle), "--video", str(sample_clip()), "--realtime",
                                      "--fps", "10", "--report", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        _wait_lines(out / "records.jsonl", 3, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == rc, err
    assert err.strip().count("\n") == 0 and err.startswith(f"error: {word}"), err
    recs = read_records(out / "records.jsonl")
    rep = json.loads((out / "report.json").read_text())
    assert len(recs) >= 3 and rep["summary"]["sampled"] == len(recs) == rep["records"]["jsonl_frames"]
    assert [r["index"] for r in recs] == list(range(len(recs)))
    assert rep["summary"]["processed"] == sum(r["decision"] == "run" for r in recs)


def test_report_path_that_is_a_file_fails_before_streaming(onnx_bundle, tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(["run", str(onnx_bundle), "--max-frames", "2", "--report", str(f)]) == 1
    assert "is a file, not a directory" in _error_line(capsys)
    assert f.read_text() == "x"
    assert main(["run", str(onnx_bundle), "--max-frames", "2", "--report", str(f / "sub")]) == 1
    assert "cannot create the report directory" in _error_line(capsys)


def test_unwritable_report_dir_fails_before_streaming(tmp_path, capsys):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    else:                                       # root writes through permission bits: a read-only mount
        ro = Path("/sys")
        probe = ro / f".probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            pytest.skip("running as root with no read-only directory to try")
        except OSError:
            pass
    t0 = time.monotonic()
    assert main(["run", str(tmp_path / "no-bundle-needed"), "--report", str(ro)]) == 1
    err = _error_line(capsys)
    assert "not writable" in err and str(ro) in err
    assert time.monotonic() - t0 < 10 and "stream 0" not in capsys.readouterr().out


def test_records_file_that_becomes_unwritable_keeps_what_was_written(onnx_bundle, tmp_path):
    """RLIMIT_FSIZE makes writes past 4 KiB fail (EFBIG) midway through the run."""
    out = tmp_path / "rep"

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run(_cli() + ["run", str(onnx_bundle), "--video", str(sample_clip()), "--fps", "5",
                                    "--max-frames", "60", "--report", str(out)],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit, cwd=REPO)
    assert proc.returncode == 1, proc
    err = proc.stderr.strip()
    assert "\n" not in err and "records.jsonl: cannot write records" in err and "written before stay" in err, err
    recs = read_records(out / "records.jsonl")
    assert 1 <= len(recs) < 60
    assert [r["index"] for r in recs] == list(range(len(recs)))     # every complete line is a record


# ------------------------------------------------------------------ 2. bounded history
def test_distribution_percentiles_within_one_percent():
    rng = np.random.default_rng(0)
    values = rng.lognormal(1.0, 1.2, size=20_000)
    d = Distribution()
    for v in values:
        d.add(v)
    for q in (0.5, 0.95, 0.99):
        lo = np.quantile(values, q, method="lower")
        hi = np.quantile(values, q, method="higher")
        assert lo * 0.99 <= d.quantile(q) <= hi * 1.01
    assert d.max == values.max() and d.total / d.count == pytest.approx(values.mean())


class _Stamp:
    """A frame without pixels (the simulated executor ignores the image)."""

    __slots__ = ("timestamp",)

    def __init__(self, t):
        self.timestamp = t


def test_history_is_bounded_and_summary_covers_every_record(tmp_path):
    history, n = 64, 10_000
    sched = Scheduler("drop_late", 60.0, 500.0, budgets=[16])
    s = SimulatedSession(sched, {**COSTS, "encode": 0.018}, jitter=0.5, seed=1, history=history)
    s.calibrate()
    s.write_records(tmp_path / "records.jsonl")
    qs = [Question(at=t, text="q") for t in (10.0, 20.0, 30.0)]         # all before the first size check
    sizes, lens = {}, []

    def on_frame(i, rec):
        lens.append(len(s.frames))
        if s.stats.sampled in (2_500, n):
            sizes[s.stats.sampled] = len(json.dumps(s.report().to_dict()))

    StreamRunner([(s, (_Stamp(k / 30) for k in range(n)))], questions=qs, on_frame=on_frame).run()
    s.close_records()
    assert max(lens) == history and len(s.frames) == history
    # report size does not grow with the stream (same window, same summary fields)
    assert abs(sizes[n] - sizes[2_500]) < 0.02 * sizes[2_500]
    # the summary agrees with a recount of every record on disk
    recs = read_records(tmp_path / "records.jsonl")
    fr = [r for r in recs if r["kind"] == "frame"]
    assert len(fr) == n and sum(r["kind"] == "question" for r in recs) == 3
    summ = s.report().summary
    ran = [r for r in fr if r["decision"] == "run"]
    assert summ["processed"] == len(ran) and summ["dropped"] == sum(r["decision"] == "drop" for r in fr)
    assert 0 < summ["dropped"] < n
    assert summ["deadline_misses"] == sum(r["deadline_met"] is False for r in ran)
    e2e = np.array([1000 * (r["end"] - r["capture"]) for r in ran])
    p99 = summ["latency_ms"]["end_to_end"]["p99"]
    assert np.quantile(e2e, 0.99, method="lower") * 0.99 <= p99 <= np.quantile(e2e, 0.99, method="higher") * 1.01
    assert summ["latency_ms"]["end_to_end"]["max"] == pytest.approx(e2e.max())
    assert [r["index"] for r in fr[-history:]] == [f.index for f in s.frames]


# ------------------------------------------------------------------ 4. non-finite guard
class _Poison:
    """Wraps a backend; :meth:`arm` makes the next call of ``engine`` return NaN in ``output``
    (or raise ``exc``)."""

    def __init__(self, backend):
        self.backend, self.name = backend, backend.name
        self._armed = None

    def arm(self, engine, output=None, exc=None, skip=0):
        self._armed = [engine, output, exc, skip]

    def run(self, engine, inputs):
        out = self.backend.run(engine, inputs)
        a = self._armed
        if a is not None and a[0] == engine:
            if a[3]:
                a[3] -= 1
                return out
            self._armed = None
            if a[2] is not None:
                raise a[2]
            out = dict(out)
            out[a[1]] = np.full_like(out[a[1]], np.nan)
        return out


def _sessions(bundle):
    from streamgraph.backends import open_backend
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.runtime.session import Session

    b = Bundle.load(bundle)
    raw = open_backend("onnxruntime", b)
    poison = _Poison(raw)
    bad = Session(b, poison, overload="fifo")
    ref = Session(b, raw, overload="fifo")
    return bad, ref, poison


@pytest.mark.parametrize("engine,output,stage", [("decoder_step", "new_kv", "prefill"),
                                                 ("decoder_step", "logits", "prefill"),
                                                 ("vision_encoder", "visual_tokens", "encode")])
def test_nan_at_one_step_drops_that_frame_only(onnx_bundle, engine, output, stage):
    bad, ref, poison = _sessions(onnx_bundle)
    bad_frame = 3
    for k, f in enumerate(frames(7)):
        if k == bad_frame:
            poison.arm(engine, output)
            rec = bad.push_frame(f)
            assert rec.decision == "error" and rec.failed_stage == stage and rec.error_type == "NonFiniteError"
            assert f"{engine} produced NaN/Inf" in rec.reason and output in rec.reason
            assert np.isfinite(bad.kv.data).all()
            continue                                   # the reference run never sees this frame
        assert bad.push_frame(f).decision == ref.push_frame(f).decision == "run"
    assert np.isfinite(bad.kv.data).all()
    np.testing.assert_array_equal(bad.kv.data, ref.kv.data)
    assert bad.policy.slots_in_use == ref.policy.slots_in_use
    a_bad = "".join(bad.ask("what happened?", at=10.0))
    a_ref = "".join(ref.ask("what happened?", at=10.0))
    assert a_bad == a_ref and len(bad.questions[-1].answer) == len(a_ref)
    s = bad.report().summary
    assert s["errors"] == s["nonfinite"] == 1 and s["processed"] == 6


@pytest.mark.parametrize("skip", [0, 2], ids=["prefill", "decode"])
def test_nan_during_a_question_fails_only_that_question(onnx_bundle, skip):
    bad, _, poison = _sessions(onnx_bundle)
    fl = frames(6)
    # question 1 hits NaN (in its prefill, or at its 2nd decode step); question 2 is fine
    poison_at = {"q1": True}
    qs = [Question(at=1.2, text="first?"), Question(at=2.2, text="second?")]
    orig_ask = bad.ask

    def ask(text, **kw):
        if text == "first?" and poison_at.pop("q1", False):
            poison.arm("decoder_step", "new_kv", skip=skip)
        return orig_ask(text, **kw)

    bad.ask = ask
    StreamRunner([(bad, fl)], questions=qs).run()
    q1, q2 = bad.questions
    assert "NonFiniteError: decoder_step produced NaN/Inf in new_kv" in q1.error
    assert qs[0].error == q1.error and q2.error == "" and qs[1].answer == q2.answer
    assert np.isfinite(bad.kv.data).all()
    assert bad.report().summary["questions_failed"] == 1
    assert bad.report().summary["processed"] == len(fl)        # the stream went on


def test_engine_error_in_a_question_is_kept_in_its_record(onnx_bundle):
    bad, _, poison = _sessions(onnx_bundle)
    for f in frames(2):
        bad.push_frame(f)
    poison.arm("decoder_step", exc=RuntimeError("kaput"), skip=1)
    with pytest.raises(EngineError, match="decoder_step failed: RuntimeError: kaput"):
        list(bad.ask("why?"))
    assert "RuntimeError: kaput" in bad.questions[-1].error
    assert bad.push_frame(frames(3)[2]).decision == "run"       # the turn is closed, the stream goes on


# ------------------------------------------------------------------ 5. question API and runtime inputs
def test_question_api_rejects_bad_values():
    s = SimulatedSession(Scheduler("fifo", 250, 500, budgets=[16]), COSTS)
    for kw in ({"max_new_tokens": 0}, {"max_new_tokens": -1}, {"max_new_tokens": 2.5}, {"at": math.nan},
               {"at": math.inf}, {"at": -1.0}):
        with pytest.raises(ValueError):
            s.ask("q", **kw)
        with pytest.raises(ValueError):
            Question(**{"at": 1.0, "text": "q", **kw})
    for text in ("", "   "):
        with pytest.raises(ValueError, match="non-empty"):
            s.ask(text)
    assert len(list(s.ask("q", max_new_tokens=1))) == 1 and len(s.questions) == 1


def test_session_max_new_tokens_zero_is_refused(onnx_bundle):
    bad, _, _ = _sessions(onnx_bundle)
    with pytest.raises(ValueError, match="max_new_tokens"):
        bad.ask("hi", max_new_tokens=0)
    assert len(bad.questions) == 0
    assert bad.questions.maxlen == 1024
    assert 1 <= sum(1 for _ in bad.ask("hi", max_new_tokens=1)) and bad.questions[-1].new_tokens == 1


def test_push_frame_honours_the_given_timestamp():
    sched = Scheduler("fifo", 250, 500, budgets=[16])
    s = SimulatedSession(sched, COSTS)
    f = Frame(image=np.zeros((4, 4, 3), np.uint8), timestamp=0.0, index=0, source_index=0)
    rec = s.push_frame(f, timestamp=5.0)
    assert rec.capture == 5.0 and rec.deadline == pytest.approx(5.0 + sched.frame_deadline)
    assert s.push_frame(f).capture == 0.0                     # no timestamp: the Frame's own
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="timestamp"):
            s.push_frame(f, timestamp=bad)


@pytest.mark.parametrize("args,msg", [
    (["--ask", ""], "--ask: the question is empty"),
    (["--ask", "hi", "--at", "nan"], "--at must be a finite number"),
    (["--ask", "hi", "--at", "inf"], "--at must be a finite number"),
    (["--ask", "hi", "--at", "-1"], "--at must be a finite number"),
    (["--at", "1"], "--at needs --ask"),
    (["--ask", "a", "--ask", "b", "--at", "1"], "one --at per --ask"),
    (["--fps", "1e300"], "--fps must be"), (["--fps", "nan"], "--fps must be"), (["--fps", "inf"], "--fps must be"),
    (["--fps", "0"], "--fps must be"), (["--fps", "-2"], "--fps must be"),
    (["--speed", "nan"], "--speed must be"), (["--max-frames", "0"], "--max-frames must be"),
])
def test_run_rejects_bad_numbers_in_one_line(tmp_path, capsys, args, msg):
    with hang_guard(30):
        assert main(["run", str(tmp_path / "no-bundle"), *args]) == 1
    assert msg in _error_line(capsys)


def test_repeated_ask_keeps_every_question_in_order(onnx_bundle, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["run", str(onnx_bundle), "--video", str(sample_clip()), "--fps", "2", "--max-frames", "6",
                 "--ask", "first?", "--at", "2", "--ask", "second?", "--at", "0.5", "--ask", "third?", "--at", "2",
                 "--report", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    got = [(q["text"], q["asked_at"]) for q in rep["questions"]]
    assert got == [("second?", 0.5), ("first?", 2.0), ("third?", 2.0)]    # by time; ties in the given order
    assert all(q["new_tokens"] >= 1 and q["error"] == "" for q in rep["questions"])
    assert sum(r["kind"] == "question" for r in read_records(out / "records.jsonl")) == 3


def test_runner_never_hangs_on_bad_timestamps_or_absurd_fps():
    s = SimulatedSession(Scheduler("fifo", 250, 500, budgets=[16]), COSTS)
    with hang_guard(20):
        for bad in (math.nan, math.inf, -1.0):
            with pytest.raises(SourceError, match="timestamp"):
                StreamRunner([(s, [_Stamp(0.0), _Stamp(bad)])]).run()
        with pytest.raises(ValueError, match="speed"):
            StreamRunner([(s, [_Stamp(0.0)])], speed=math.nan)
        # the finest grid a source accepts, far out in time: every distinct frame once, no hang
        assert sample_indices([0.0, 1e10, 1e10 + 1.0, 1e12, 1e12], 1e6) == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="fps"):
            video(sample_clip(), fps=1e300)


# ------------------------------------------------------------------ 6. truncated videos
def _cut(tmp_path, fraction: float) -> Path:
    data = sample_clip().read_bytes()
    p = tmp_path / f"cut-{fraction}.mp4"
    p.write_bytes(data[: int(len(data) * fraction)])
    return p


def test_truncated_video_warns_once_and_reports_decoded_frames(onnx_bundle, tmp_path, capsys):
    import av

    cut = _cut(tmp_path, 0.5)
    with av.open(str(sample_clip())) as c:
        header = c.streams.video[0].frames
    with av.open(str(cut)) as c:            # the same decoder settings as the source (frame threads)
        decoded = 0
        c.streams.video[0].thread_type = "AUTO"
        for packet in c.demux(video=0):
            try:
                decoded += len(packet.decode())
            except av.FFmpegError:
                pass
    assert 0 < decoded < header
    out = tmp_path / "rep"
    assert main(["run", str(onnx_bundle), "--video", str(cut), "--fps", "1", "--report", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warn = [line for line in err if "truncated" in line]
    assert len(warn) == 1 and warn[0].startswith("warning: ") and f"{decoded} of the {header} frames" in warn[0]
    src = json.loads((out / "report.json").read_text())["meta"]["source"]
    assert src["frames_decoded"] == decoded and src["frames_header"] == header and src["truncated"] is True


def test_video_that_decodes_nothing_is_a_one_line_error(onnx_bundle, tmp_path, capsys):
    cut = _cut(tmp_path, 0.01)
    assert main(["run", str(onnx_bundle), "--video", str(cut), "--fps", "1"]) == 1
    err = _error_line(capsys)
    assert "no decodable video frames" in err and str(cut) in err


def test_record_writer_refuses_a_directory(tmp_path):
    from streamgraph.errors import ReportError

    with pytest.raises(ReportError, match="cannot write records"):
        RecordWriter(tmp_path)
