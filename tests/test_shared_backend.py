"""One backend per bundle: Engines loaded once, shared by several streams, each with its own
KV buffer and state. The reference for every output is the same stream on a session with
engines of its own (what `Session.open(bundle_dir)` gives)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import frames

N_STREAMS = 4
N_FRAMES = 6


@pytest.fixture
def count_ort_sessions(monkeypatch):
    """Counts onnxruntime.InferenceSession constructions (the engines loaded)."""
    import onnxruntime as ort

    made = []
    real = ort.InferenceSession

    class Counting(real):
        def __init__(self, *a, **k):
            made.append(a[0] if a else k.get("path_or_bytes"))
            super().__init__(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", Counting)
    return made


def _script(stream: int):
    """What stream ``stream`` does: frames (its own synthetic video) and two questions."""
    video = frames(N_FRAMES, seed=100 + stream)
    return [("frame", video[0]), ("frame", video[1]), ("ask", f"what is on camera {stream}?"),
            *[("frame", f) for f in video[2:5]], ("ask", "and now?"), ("frame", video[5])]


def _drive(session, script) -> dict:
    """Run a script on a session; returns everything it produced."""
    answers, records = [], []
    for kind, x in script:
        if kind == "frame":
            rec = session.push_frame(x, budget=session.budgets[-1])
            records.append((rec.decision, rec.tokens_kept, rec.budget, rec.slots_in_use))
        else:
            answers.append("".join(session.ask(x)))
    return {"answers": answers, "records": records, "trace": session.trace,
            "kv": session.kv.data.copy(), "slots": session.slots_in_use}


def _same(a: dict, b: dict) -> None:
    assert a["answers"] == b["answers"]
    assert a["records"] == b["records"]
    assert [t["kind"] for t in a["trace"]] == [t["kind"] for t in b["trace"]]
    for ta, tb in zip(a["trace"], b["trace"]):
        assert np.array_equal(ta["logits"], tb["logits"])               # logits of every step
        assert np.array_equal(ta["inputs_embeds"], tb["inputs_embeds"])  # visual tokens of every frame
    assert np.array_equal(a["kv"], b["kv"])
    assert a["slots"] == b["slots"]


def test_four_streams_on_one_backend_load_engines_once_and_match_separate_sessions(onnx_bundle, count_ort_sessions):
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.runtime.session import Engines, Session

    n_engines = len(Bundle.load(onnx_bundle).plan.engines)
    engines = Engines.load(onnx_bundle)
    assert len(count_ort_sessions) == n_engines                 # loaded once ...
    shared = [Session.open(engines, overload="fifo", trace=True) for _ in range(N_STREAMS)]
    assert len(count_ort_sessions) == n_engines                 # ... and not again per stream
    assert engines.sessions_opened == N_STREAMS
    assert len({id(s.kv.data) for s in shared}) == N_STREAMS    # own KV buffer each
    assert len({id(s.policy) for s in shared}) == N_STREAMS
    assert all(s.backend.backend is engines.backend for s in shared)

    # the 4 shared streams run at the same time, one thread each (ORT run is thread-safe)
    out: list[dict | None] = [None] * N_STREAMS
    errors: list[BaseException] = []
    start = threading.Barrier(N_STREAMS)

    def work(i):
        try:
            start.wait()
            out[i] = _drive(shared[i], _script(i))
        except BaseException as e:          # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(N_STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    # reference: 4 separate sessions, engines of their own, one after the other
    before = len(count_ort_sessions)
    for i in range(N_STREAMS):
        alone = Session.open(onnx_bundle, overload="fifo", trace=True)
        _same(out[i], _drive(alone, _script(i)))
    assert len(count_ort_sessions) - before == N_STREAMS * n_engines
    # the streams saw different videos: sharing did not mix their states
    assert not np.array_equal(out[0]["kv"], out[1]["kv"])


def test_runner_with_streams_on_shared_engines_matches_separate_runners(onnx_bundle):
    """Through StreamRunner (one executor, EDF across the streams), every stream's frames and
    answers are those of the same stream run alone on its own engines."""
    from streamgraph.runtime.stream import SimulatedClock
    from streamgraph.runtime.stream import Question, StreamRunner
    from streamgraph.runtime.session import Engines, Session

    engines = Engines.load(onnx_bundle)
    clock = SimulatedClock()
    sessions = [engines.session(clock=clock, overload="fifo", trace=True) for _ in range(3)]
    qs = [Question(at=1.2, text="what moved?", stream=i) for i in range(3)]
    StreamRunner([(s, frames(4, seed=7 + i)) for i, s in enumerate(sessions)], questions=qs).run()
    for i, s in enumerate(sessions):
        alone = Session.open(onnx_bundle, overload="fifo", trace=True)
        ran = [r.index for r in s.frames if r.decision == "run"]
        assert len(ran) == 4
        video = frames(4, seed=7 + i)
        # the question was served between two frames: replay the same order on its own session
        asked = [j for j, t in enumerate(s.trace) if t["kind"] == "question"][0]
        before = sum(1 for t in s.trace[:asked] if t["kind"] == "frame")
        for f in video[:before]:
            alone.push_frame(f, budget=alone.budgets[-1])
        assert "".join(alone.ask("what moved?")) == qs[i].answer
        for f in video[before:]:
            alone.push_frame(f, budget=alone.budgets[-1])
        assert [t["kind"] for t in alone.trace] == [t["kind"] for t in s.trace]
        for ta, tb in zip(alone.trace, s.trace):
            assert np.array_equal(ta["logits"], tb["logits"])


def test_session_open_on_engines_refuses_backend_options(onnx_bundle):
    from streamgraph.runtime.session import Engines, Session

    engines = Engines.load(onnx_bundle)
    with pytest.raises(ValueError, match="Engines.load"):
        Session.open(engines, "torch")
    with pytest.raises(ValueError, match="Engines.load"):
        Session.open(engines, threads=1)


def test_backend_that_is_not_thread_safe_runs_one_call_at_a_time(onnx_bundle):
    """A backend without thread_safe is wrapped in SerializedBackend: streams on several
    threads never enter it at the same time, and their outputs are those of the real engines."""
    from streamgraph.backends import open_backend
    from streamgraph.backends.base import Backend, SerializedBackend
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.runtime.session import Engines, Session

    bundle = Bundle.load(onnx_bundle)
    real = open_backend("onnxruntime", bundle)

    class OneAtATime(Backend):
        name = "one-at-a-time"

        def __init__(self):
            self.inside, self.overlaps, self.calls = 0, 0, 0
            self.lock = threading.Lock()

        def run(self, engine, inputs):
            with self.lock:
                self.inside += 1
                self.calls += 1
                self.overlaps += self.inside > 1
            try:
                threading.Event().wait(0.0005)       # widen the window a concurrent call would hit
                return real.run(engine, inputs)
            finally:
                with self.lock:
                    self.inside -= 1

    be = OneAtATime()
    engines = Engines(bundle, be)
    assert isinstance(engines.backend, SerializedBackend) and engines.name == "one-at-a-time"
    sessions = [engines.session(overload="fifo", trace=True) for _ in range(3)]
    out: list = [None] * 3
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, _drive(sessions[i], _script(i)[:4])))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert be.calls > 0 and be.overlaps == 0
    for i in range(3):
        _same(out[i], _drive(Session(bundle, real, overload="fifo", trace=True), _script(i)[:4]))


def test_engines_load_errors_are_one_line(tmp_path):
    from streamgraph.errors import BundleError
    from streamgraph.runtime.session import Engines

    with pytest.raises(BundleError) as e:
        Engines.load(tmp_path / "nothing")
    assert "\n" not in str(e.value) and "nothing" in str(e.value)


def test_run_with_several_videos_loads_the_engines_once(onnx_bundle, tmp_path, count_ort_sessions, capsys):
    """`streamgraph run --video A --video B`: one backend for both streams."""
    import av

    from streamgraph.cli import main
    from streamgraph.compiler.bundle import Bundle

    videos = []
    for k in range(2):                                # two small clips, different content
        p = tmp_path / f"v{k}.mp4"
        with av.open(str(p), "w") as out:
            st = out.add_stream("mpeg4", rate=4)
            st.width = st.height = 64
            st.pix_fmt = "yuv420p"
            for f in frames(6, fps=4, seed=30 + k):
                for pkt in st.encode(av.VideoFrame.from_ndarray(f.image, format="rgb24")):
                    out.mux(pkt)
            for pkt in st.encode():
                out.mux(pkt)
        videos.append(str(p))
    rc = main(["run", str(onnx_bundle), "--video", videos[0], "--video", videos[1], "--overload", "fifo",
               "--report", str(tmp_path / "rep")])
    assert rc == 0
    assert len(count_ort_sessions) == len(Bundle.load(onnx_bundle).plan.engines)
    out = capsys.readouterr().out
    assert "stream 0" in out and "stream 1" in out
    for i in range(2):
        assert (tmp_path / "rep" / f"stream-{i}" / "report.json").exists()
