"""ORT engines vs the eager torch reference of the same graph (same bundle weights)."""
from __future__ import annotations

import numpy as np
import pytest

from streamgraph.compiler.bundle import Bundle
from streamgraph.runtime.session import Session
from tests.conftest import VTEST, frames


def _stream(session: Session, frame_list, question: str):
    for f in frame_list[: len(frame_list) // 2]:
        session.push_frame(f)
    answer = "".join(session.ask(question))
    for f in frame_list[len(frame_list) // 2:]:
        session.push_frame(f)
    answer2 = "".join(session.ask(question + " And now?"))
    return answer, answer2


def test_ort_matches_torch_over_stream_question_and_decode(onnx_bundle):
    frame_list = frames(8)
    ort = Session.open(onnx_bundle, "onnxruntime", overload="none", trace=True)
    ref = Session.open(onnx_bundle, "torch", overload="none", trace=True)
    a_ort = _stream(ort, frame_list, "What is moving?")
    a_ref = _stream(ref, frame_list, "What is moving?")
    kinds = [t["kind"] for t in ort.trace]
    assert kinds == [t["kind"] for t in ref.trace]
    assert kinds.count("frame") == 8 and kinds.count("question") >= 2
    assert kinds.count("decode") >= 4, kinds                     # several decode steps compared
    for i, (a, b) in enumerate(zip(ort.trace, ref.trace)):
        err = np.abs(a["logits"] - b["logits"]).max()
        assert err < 1e-4, f"step {i} ({a['kind']}): max |logits diff| {err:.3g}"
    assert a_ort == a_ref
    np.testing.assert_allclose(ort.kv.data, ref.kv.data, atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", ["vision_encoder", "reducer_k16", "embed_tokens"])
def test_each_engine_matches_torch(onnx_bundle, engine):
    from streamgraph.backends.onnxruntime import OnnxRuntimeBackend
    from streamgraph.backends.torch import TorchBackend

    bundle = Bundle.load(onnx_bundle)
    spec = bundle.plan.engines[engine]
    rng = np.random.default_rng(1)
    feeds = {}
    for s in spec.inputs:
        shape = [5 if d == "T" else d for d in s.shape]
        feeds[s.name] = (rng.integers(0, 250, shape) if s.dtype == "int64"
                         else rng.standard_normal(shape).astype(np.float32))
    a = OnnxRuntimeBackend(bundle).run(engine, feeds)
    b = TorchBackend(bundle).run(engine, feeds)
    for name in a:
        if a[name].dtype.kind == "f":
            np.testing.assert_allclose(a[name], b[name], atol=1e-4, rtol=0)
        else:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.skipif(not VTEST.exists(), reason="shared/data/vtest.avi not present")
def test_ort_matches_torch_on_real_frames(onnx_bundle):
    from streamgraph.runtime.sources import video

    real = list(video(VTEST, fps=2, size=(64, 64), max_frames=6))
    ort = Session.open(onnx_bundle, "onnxruntime", overload="none", trace=True)
    ref = Session.open(onnx_bundle, "torch", overload="none", trace=True)
    for f in real:
        ort.push_frame(f)
        ref.push_frame(f)
    for a, b in zip(ort.trace, ref.trace):
        assert np.abs(a["logits"] - b["logits"]).max() < 1e-4
