"""The ``torch-device`` backend (device-resident KV, backends/torch_device.py) on the CPU
against the reference: the ONNX Runtime engines of the same bundle.

Every cache policy (full, sink_window, streaming_vlm, rekv, carrier, duo) drives both
backends in lockstep over one stream (prompt prefix, frames, a question with the policy's
retrieval passes, greedy answer tokens, resume, more frames, a second question): every
step's logits, last_hidden, query_mean and new_kv agree within 1e-4, and so do the KV
buffers at the end. The six policies are sized to the same KV buffer (S = 256 slots) so that
one compiled bundle's decoder_step engine serves them all (the policy is host-side index
arithmetic; each policy is built from its own graph's plan): one ONNX export for the file.
"""
from __future__ import annotations

import numpy as np
import pytest

from streamgraph import contract as C
from tests.conftest import frames, write_graph

S = 256
CACHES = {
    "full": "{op: full, capacity_tokens: 256}",
    # the ring wraps (4 + 60 slots): chunks land in non-consecutive slots too
    "sink_window": "{op: sink_window, sink_tokens: 4, window_tokens: 252}",
    # 3 frames of 16 tokens in the vision window, 32 + 176 text: frames age out
    "streaming_vlm": "{op: streaming_vlm, sink_tokens: 32, text_window_tokens: 176, vision_window_seconds: 1.5}",
    "rekv": "{op: rekv, init_tokens: 80, local_tokens: 64, topk: 3, question_tokens: 64, store_blocks: 2}",
    "carrier": "{op: carrier, sink_tokens: 80, carriers: 5, question_tokens: 171}",
    "duo": "{op: duo, capacity_tokens: 256, sink_tokens: 4, recent_tokens: 12, pattern: PATTERN}",
}
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """{policy: plan} (each policy's own graph), the one ONNX bundle (the carrier graph: its
    chunks reach K+1 tokens, so its engine's T range covers every policy) and both backends."""
    from streamgraph.backends import open_backend
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.compiler.compile import check_graph, compile_graph

    d = tmp_path_factory.mktemp("torch_device")
    np.savetxt(d / "full_attention_heads.tsv", np.array([[0.9, 0.1], [0.3, 0.7]]), delimiter="\t")
    plans = {}
    for name, cache in CACHES.items():
        g = write_graph(d, name=name, chunk=8, cache=cache.replace("PATTERN", str(d)))
        plans[name] = check_graph(g).plan
    bundle = Bundle.load(compile_graph(d / "carrier.yaml", d / "build" / "carrier").bundle.path)
    engine = bundle.plan.engines[C.DECODER_STEP]
    for name, plan in plans.items():        # one engine fits all: same buffer, inputs, T range
        assert plan.kv.shape == bundle.plan.kv.shape and plan.kv.shape[4] == S, name
        assert [i.name for i in plan.engines[C.DECODER_STEP].inputs] == [i.name for i in engine.inputs]
        assert plan.engines[C.DECODER_STEP].dims["T"][1] <= engine.dims["T"][1]
    ort = open_backend("onnxruntime", bundle, threads=1)
    dev = open_backend("torch-device", bundle, device="cpu", threads=1)
    return plans, bundle, ort, dev


class Stream:
    """One backend's decoder over its own KV buffer (``backend.alloc_kv``) and cache policy,
    stepped the way a session steps it; records each step's outputs and, for a
    device-resident buffer, the pending new_kv before it is committed."""

    def __init__(self, backend, plan):
        from streamgraph.kv import make_policy

        self.backend, self.plan = backend, plan
        self.kv = backend.alloc_kv(plan.kv.shape, plan.kv.dtype)
        self.address = self.kv.address
        self.policy = make_policy(plan.cache["op"], plan.cache["params"], plan)
        self.policy.attach(self.kv)
        L, hkv = plan.kv.shape[0], plan.kv.shape[3]
        self.no_streaming = np.zeros((L, hkv), dtype=bool)
        self.steps: list[dict] = []

    def step(self, embeds: np.ndarray, n_valid: int, kind: str) -> dict:
        t = embeds.shape[1]
        sp = self.policy.plan_step(t, n_valid, None, kind=kind)
        valid = np.zeros((1, t), dtype=bool)
        valid[0, :n_valid] = True
        sh = self.policy.streaming_heads
        inputs = {C.INPUTS_EMBEDS: embeds, C.POSITIONS: sp.positions[None], C.TOKEN_VALID: valid,
                  C.CACHE_POSITIONS: sp.cache_positions[None], C.CACHE_VALID: sp.cache_valid[None],
                  C.WINDOW_VALID: (sp.cache_valid if sp.window_valid is None else sp.window_valid)[None],
                  C.STREAMING_HEADS: self.no_streaming if sh is None else sh}
        out = self.backend.decoder_step(self.kv, inputs)
        rec = {"kind": kind, **{k: np.array(v) for k, v in out.items()}}
        if C.NEW_KV not in out:                                   # device-resident: still on the device
            assert out["new_kv_finite"] is True
            rec[C.NEW_KV] = self.kv.pending_new_kv.float().cpu().numpy()
        self.steps.append(rec)
        self.backend.commit_kv(self.kv, sp.write_slots)
        self.policy.commit(sp, out)
        assert self.kv.address == self.address
        return rec

    def embed(self, ids: list[int]) -> np.ndarray:
        return self.backend.run(C.EMBED_TOKENS, {C.INPUT_IDS: np.asarray([ids], dtype=np.int64)})[C.INPUTS_EMBEDS]


class Lockstep:
    """The reference (ORT) and the device backend fed the same chunks: frames are the same
    random visual tokens, text is embedded by each backend's own ``embed_tokens`` engine and
    the answer tokens are the reference's greedy choices."""

    def __init__(self, ref: Stream, got: Stream, seed: int = 0):
        self.ref, self.got = ref, got
        self.plan = ref.plan
        self.rng = np.random.default_rng(seed)

    def each(self, fn):
        return fn(self.ref), fn(self.got)

    def text(self, ids: list[int], kind: str) -> np.ndarray:
        chunk = self.plan.prefill_chunk_tokens
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            r, _ = self.each(lambda s: s.step(s.embed(part), len(part), kind))
        return r[C.LOGITS][0]

    def frame(self, i: int) -> None:
        k, c = self.plan.tokens_per_frame, self.plan.hidden_size
        tokens = (0.5 * self.rng.standard_normal((1, k, c))).astype(np.float32)
        n = k if i % 3 else k - 5                                # some frames keep fewer tokens

        def go(s: Stream):
            chunk, n_chunk, _ = s.policy.prepare_frame(tokens, n, None)    # carrier: + its token
            s.step(chunk, n_chunk, "frame")
        self.each(go)

    def question(self, ids: list[int], answer_tokens: int = 4) -> None:
        for s in (self.ref, self.got):       # rekv: retrieval passes, each stream on its own
            s.policy.prepare_question(lambda s=s: [s.step(s.embed(ids[i:i + 8]), len(ids[i:i + 8]), "retrieval")
                                                   for i in range(0, len(ids), 8)][-1][C.LOGITS][0])
        logits = self.text(ids, "question")
        tok = None
        for _ in range(answer_tokens):
            tok = int(np.argmax(logits))
            logits = self.text([tok], "decode")
        self.text([tok, 7, 8, 9], "resume")

    def script(self, frames: int = 10) -> None:
        vocab = self.plan.engines[C.DECODER_STEP].outputs[0].shape[1]
        ids = lambda n: [int(v) for v in self.rng.integers(0, vocab, n)]  # noqa: E731
        self.text(ids(11), "prefix")
        for i in range(frames):
            self.frame(i)
        self.question(ids(13))
        for i in range(frames, frames + 6):
            self.frame(i)
        self.question(ids(5))


@pytest.mark.parametrize("op", list(CACHES))
def test_logits_equal_onnxruntime_for_every_policy(setup, op):
    from streamgraph.backends.torch_device import DeviceTensorKV

    plans, _, ort, dev = setup
    ref, got = Stream(ort, plans[op]), Stream(dev, plans[op])
    assert isinstance(got.kv, DeviceTensorKV) and not isinstance(ref.kv, DeviceTensorKV)
    Lockstep(ref, got).script(frames=6 if op in ("full", "duo") else 12)     # full/duo: no eviction
    assert [s["kind"] for s in got.steps] == [s["kind"] for s in ref.steps]
    for a, b in zip(got.steps, ref.steps):
        for name in (C.LOGITS, C.LAST_HIDDEN, C.QUERY_MEAN, C.NEW_KV):
            np.testing.assert_allclose(a[name], b[name], **TOL, err_msg=f"{op} {a['kind']} {name}")
    np.testing.assert_allclose(got.kv.data, ref.kv.data, **TOL)
    np.testing.assert_array_equal(got.policy.slot_seq, ref.policy.slot_seq)
    # the device tensor is the live host view on the CPU, at one address for the whole stream
    assert got.kv.tensor.data_ptr() == got.address == got.kv.data.ctypes.data
    kinds = {s["kind"] for s in got.steps}
    assert {"prefix", "frame", "question", "decode", "resume"} <= kinds
    if op == "rekv":
        assert "retrieval" in kinds and got.policy.n_blocks > 3
    if op == "sink_window":
        assert got.policy.tokens_seen > got.kv.capacity                    # the ring wrapped
    if op == "duo":
        assert got.policy.streaming_heads.any() and not got.policy.streaming_heads.all()


def test_nan_step_is_not_committed(setup):
    """The runtime's guard refuses a step whose device new_kv is not finite (reported as
    ``new_kv_finite: False``, reduced on the device), so the KV buffer and the policy stay as
    they were; the next good step runs normally."""
    from streamgraph.errors import NonFiniteError
    from streamgraph.runtime.decoder import GuardedBackend

    plans, _, ort, dev = setup
    guard = GuardedBackend(dev)
    s = Stream(guard, plans["full"])
    s.step(s.embed([1, 2, 3, 4]), 4, "prefix")
    before, seen = s.kv.data.copy(), s.policy.slot_seq.copy()
    bad = np.full((1, 3, plans["full"].hidden_size), np.nan, dtype=np.float32)
    raw = Stream(dev, plans["full"])
    assert dev.decoder_step(raw.kv, _inputs(raw, bad))["new_kv_finite"] is False
    with pytest.raises(NonFiniteError, match="decoder_step produced NaN/Inf in"):
        s.step(bad, 3, "prefix")
    np.testing.assert_array_equal(s.kv.data, before)
    np.testing.assert_array_equal(s.policy.slot_seq, seen)
    # the refused step is simply replaced by the next one
    ref = Stream(ort, plans["full"])
    ref.step(ref.embed([1, 2, 3, 4]), 4, "prefix")
    a, b = s.step(s.embed([5, 6]), 2, "prefix"), ref.step(ref.embed([5, 6]), 2, "prefix")
    np.testing.assert_allclose(a[C.LOGITS], b[C.LOGITS], **TOL)
    assert s.kv.address == s.kv.tensor.data_ptr()


def _inputs(s: Stream, embeds: np.ndarray) -> dict:
    t = embeds.shape[1]
    sp = s.policy.plan_step(t, t, None, kind="prefix")
    return {C.INPUTS_EMBEDS: embeds, C.POSITIONS: sp.positions[None], C.TOKEN_VALID: np.ones((1, t), bool),
            C.CACHE_POSITIONS: sp.cache_positions[None], C.CACHE_VALID: sp.cache_valid[None],
            C.WINDOW_VALID: sp.cache_valid[None], C.STREAMING_HEADS: s.no_streaming}


def test_session_on_torch_device_equals_onnxruntime(setup):
    """A whole session (preprocess, encoder and reducer engines through ``run`` on the
    device, prefill, a question) traces the same logits as with ONNX Runtime."""
    from streamgraph.runtime.session import Session

    _, bundle, _, _ = setup
    traces = []
    for backend, opts in (("onnxruntime", {"threads": 1}), ("torch-device", {"device": "cpu", "threads": 1})):
        s = Session.open(bundle.path, backend, overload="none", trace=True, **opts)
        for f in frames(4):
            s.push_frame(f)
        answer = "".join(s.ask("What is moving?"))
        traces.append((answer, s.trace))
    (a0, t0), (a1, t1) = traces
    assert a0 == a1 and len(t0) == len(t1) > 6
    for x, y in zip(t1, t0):
        assert x["kind"] == y["kind"]
        np.testing.assert_allclose(x["logits"], y["logits"], **TOL)


def test_kv_moves_and_errors(setup):
    """ReKV's block moves and the host scatter on the device buffer; bad calls fail in one line."""
    from streamgraph.backends import open_backend
    from streamgraph.errors import BackendUnavailableError
    from streamgraph.kv.base import KVBuffer

    plans, bundle, _, dev = setup
    shape = plans["full"].kv.shape
    kv, host = dev.alloc_kv(shape), KVBuffer(shape)
    rng = np.random.default_rng(1)
    new = rng.standard_normal((*shape[:4], 5, shape[5])).astype(np.float32)
    slots = np.array([9, 3, -1, 200, 4])
    kv.write(new, slots)
    host.write(new, slots)
    np.testing.assert_array_equal(kv.data, host.data)
    vals = rng.standard_normal((shape[0], 2, shape[3], 2, shape[5])).astype(np.float32)
    kv.write_slots(np.array([7, 100]), vals)
    host.write_slots(np.array([7, 100]), vals)
    np.testing.assert_array_equal(kv.read_slots(np.array([100, 3, 7])), host.read_slots(np.array([100, 3, 7])))
    np.testing.assert_array_equal(kv.read_slots(np.array([4]), layer=1), host.read_slots(np.array([4]), layer=1))
    assert kv.nbytes == host.nbytes and kv.capacity == S and kv.address == kv.tensor.data_ptr()
    with pytest.raises(RuntimeError, match="no decoder_step is pending"):
        dev.commit_kv(kv, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="decoder_step inputs"):
        dev.decoder_step(kv, {C.INPUTS_EMBEDS: np.zeros((1, 1, plans["full"].hidden_size), np.float32)})
    with pytest.raises(ValueError, match="dtype 'int8'"):
        open_backend("torch-device", bundle, device="cpu", dtype="int8")
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA is not available"):
            open_backend("torch-device", bundle, device="cuda")


def test_bfloat16_runs_close_to_float32(setup):
    """The half-precision path (meant for CUDA) runs on the CPU: bf16 weights and KV buffer,
    float32 host outputs, logits close to the float32 reference."""
    from streamgraph.backends import open_backend

    plans, bundle, ort, _ = setup
    bf = open_backend("torch-device", bundle, device="cpu", dtype="bfloat16", threads=1)
    ref, got = Stream(ort, plans["sink_window"]), Stream(bf, plans["sink_window"])
    assert got.kv.tensor.dtype.is_floating_point and str(got.kv.tensor.dtype) == "torch.bfloat16"
    lock = Lockstep(ref, got)
    lock.text(list(range(20)), "prefix")
    for i in range(3):
        lock.frame(i)
    for a, b in zip(got.steps, ref.steps):
        assert a[C.LOGITS].dtype == np.float32
        scale = float(np.abs(b[C.LOGITS]).max())
        assert float(np.abs(a[C.LOGITS] - b[C.LOGITS]).max()) < 0.05 * max(scale, 1.0)
    assert got.kv.data.dtype == np.float32 and np.isfinite(got.kv.data).all()


@pytest.mark.parametrize("op", ["sink_window", "rekv", "duo"])
def test_cuda_logits_equal_onnxruntime(setup, op):
    """On a machine with CUDA (skipped elsewhere): the same lockstep with the KV buffer in
    device memory (``data`` is then a device -> host copy) agrees with ONNX Runtime on the CPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    from streamgraph.backends import open_backend

    plans, bundle, ort, _ = setup
    cuda = open_backend("torch-device", bundle, device="cuda")
    ref, got = Stream(ort, plans[op]), Stream(cuda, plans[op])
    assert got.kv.tensor.is_cuda and got.kv.address == got.kv.tensor.data_ptr()
    Lockstep(ref, got).script(frames=6 if op == "duo" else 12)
    for a, b in zip(got.steps, ref.steps):
        for name in (C.LOGITS, C.LAST_HIDDEN, C.QUERY_MEAN, C.NEW_KV):
            np.testing.assert_allclose(a[name], b[name], **TOL, err_msg=f"{op} {a['kind']} {name}")
    np.testing.assert_allclose(got.kv.data, ref.kv.data, **TOL)
