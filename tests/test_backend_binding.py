"""The ONNX Runtime backend's bound decoder path (KV buffer bound once with IOBinding, outputs
in preallocated buffers, new KV scattered inside the backend) against the reference: the
base-class default path (``Backend.decoder_step`` = ``run`` with the host buffer as the
``kv_cache`` input, ``Backend.commit_kv`` = ``KVBuffer.write`` on the host), which is what every
backend did before binding. Both run the same ONNX Runtime sessions on the same stream of
frames, questions and greedy answer tokens, planned by the bundle's cache policy."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import write_graph
from streamgraph import contract as C
from streamgraph.backends.base import Backend
from streamgraph.kv import make_policy
from streamgraph.kv.base import KVBuffer

CACHES = {
    "full": "{op: full, capacity_tokens: 512}",
    # a small window: the ring wraps, so chunks land in non-consecutive slots too
    "sink_window": "{op: sink_window, sink_tokens: 4, window_tokens: 96}",
    # offloads blocks, retrieves per layer (L retrieval passes per question)
    "rekv": "{op: rekv, init_tokens: 80, local_tokens: 40, topk: 3, question_tokens: 64, store_blocks: 2}",
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.compiler.compile import compile_graph

    d = tmp_path_factory.mktemp("binding")
    out = {}
    for name, cache in CACHES.items():
        g = write_graph(d, name=f"bind-{name}", cache=cache, chunk=8)
        out[name] = Bundle.load(compile_graph(g, d / "build" / name).bundle.path)
    return out


@pytest.fixture(scope="module")
def backends(bundles):
    from streamgraph.backends import open_backend

    return {name: open_backend("onnxruntime", b, threads=1) for name, b in bundles.items()}


class Driver:
    """Streams a script through a backend's decoder over one KV buffer and cache policy, the
    way a session does (prompt, frames, question with the policy's retrieval passes, greedy
    answer, resume), recording every step's outputs. ``bound``: the backend's own
    ``alloc_kv`` / ``decoder_step`` / ``commit_kv``; else the base-class defaults on a host
    :class:`KVBuffer` (the reference)."""

    def __init__(self, backend, bundle, bound: bool, seed: int = 0):
        self.backend, self.plan, self.bound = backend, bundle.plan, bound
        plan = self.plan
        self.kv = backend.alloc_kv(plan.kv.shape, plan.kv.dtype) if bound else KVBuffer(plan.kv.shape, plan.kv.dtype)
        self.address = self.kv.address
        self.policy = make_policy(plan.cache["op"], plan.cache["params"], plan)
        self.policy.attach(self.kv)
        self.inputs = {i.name for i in plan.engines[C.DECODER_STEP].inputs}
        L, _, _, hkv, _, _ = plan.kv.shape
        self.no_streaming = np.zeros((L, hkv), dtype=bool)
        self.rng = np.random.default_rng(seed)
        self.steps: list[dict] = []

    def step(self, embeds: np.ndarray, n_valid: int, kind: str) -> np.ndarray:
        t = embeds.shape[1]
        sp = self.policy.plan_step(t, n_valid, None, kind=kind)
        valid = np.zeros((1, t), dtype=bool)
        valid[0, :n_valid] = True
        inputs = {C.INPUTS_EMBEDS: embeds, C.POSITIONS: sp.positions[None], C.TOKEN_VALID: valid,
                  C.CACHE_POSITIONS: sp.cache_positions[None], C.CACHE_VALID: sp.cache_valid[None]}
        if C.WINDOW_VALID in self.inputs:
            inputs[C.WINDOW_VALID] = (sp.cache_valid if sp.window_valid is None else sp.window_valid)[None]
        if C.STREAMING_HEADS in self.inputs:
            sh = self.policy.streaming_heads
            inputs[C.STREAMING_HEADS] = self.no_streaming if sh is None else sh
        if self.bound:
            out = self.backend.decoder_step(self.kv, inputs)
        else:
            out = Backend.decoder_step(self.backend, self.kv, inputs)
        self.steps.append({"kind": kind, **{k: np.array(v) for k, v in out.items()}})
        if self.bound:
            self.backend.commit_kv(self.kv, sp.write_slots)
        else:
            Backend.commit_kv(self.backend, self.kv, sp.write_slots)
        self.policy.commit(sp, out)
        assert self.kv.address == self.address == self.kv.data.ctypes.data
        if self.bound:
            assert self.kv.ortvalue.data_ptr() == self.address       # ORT reads the same memory
        return out[C.LOGITS][0]

    def text(self, ids: list[int], kind: str) -> np.ndarray:
        chunk = self.plan.prefill_chunk_tokens
        for i in range(0, len(ids), chunk):
            x = np.asarray([ids[i:i + chunk]], dtype=np.int64)
            logits = self.step(self.backend.run(C.EMBED_TOKENS, {C.INPUT_IDS: x})[C.INPUTS_EMBEDS], x.shape[1], kind)
        return logits

    def frame(self, i: int) -> None:
        k, c = self.plan.tokens_per_frame, self.plan.hidden_size
        tokens = (0.5 * self.rng.standard_normal((1, k, c))).astype(np.float32)
        self.step(tokens, k if i % 3 else k - 5, "frame")           # some frames keep fewer tokens

    def question(self, ids: list[int], answer_tokens: int = 4) -> list[int]:
        self.policy.prepare_question(lambda: self.text(ids, "retrieval"))
        logits = self.text(ids, "question")
        answer = []
        for _ in range(answer_tokens):
            tok = int(np.argmax(logits))
            answer.append(tok)
            x = np.asarray([[tok]], dtype=np.int64)
            logits = self.step(self.backend.run(C.EMBED_TOKENS, {C.INPUT_IDS: x})[C.INPUTS_EMBEDS], 1, "decode")
        self.text([answer[-1], 7, 8, 9], "resume")
        return answer

    def script(self, frames: int = 12) -> list[list[int]]:
        vocab = self.plan.engines[C.DECODER_STEP].outputs[0].shape[1]
        ids = lambda n: [int(v) for v in self.rng.integers(0, vocab, n)]  # noqa: E731
        self.text(ids(11), "prefix")
        for i in range(frames):
            self.frame(i)
        answers = [self.question(ids(13))]
        for i in range(frames, frames + 6):
            self.frame(i)
        answers.append(self.question(ids(5)))
        return answers


def _same(a: Driver, b: Driver) -> None:
    assert [s["kind"] for s in a.steps] == [s["kind"] for s in b.steps]
    for sa, sb in zip(a.steps, b.steps):
        for name in (C.LOGITS, C.NEW_KV, C.LAST_HIDDEN, C.QUERY_MEAN):
            assert np.array_equal(sa[name], sb[name]), (sa["kind"], name)      # bit for bit
    assert np.array_equal(a.kv.data, b.kv.data)
    assert np.array_equal(a.policy.slot_seq, b.policy.slot_seq)


@pytest.mark.parametrize("op", list(CACHES))
def test_bound_decoder_equals_unbound_reference(bundles, backends, op):
    from streamgraph.backends.onnxruntime import BoundKV

    be, b = backends[op], bundles[op]
    ref = Driver(be, b, bound=False)
    ref_answers = ref.script()
    got = Driver(be, b, bound=True)
    assert isinstance(got.kv, BoundKV) and not isinstance(ref.kv, BoundKV)
    assert got.script() == ref_answers
    _same(got, ref)
    kinds = {s["kind"] for s in got.steps}
    assert {"prefix", "frame", "question", "decode", "resume"} <= kinds
    if op == "rekv":
        assert "retrieval" in kinds and got.policy.n_blocks > 3                  # blocks retrieved
    if op == "sink_window":
        assert got.policy.tokens_seen > got.kv.capacity                           # the ring wrapped
    # chunk sizes 1, the text chunk and K all went through the bound buffers
    assert {s[C.NEW_KV].shape[4] for s in got.steps} >= {1, b.plan.prefill_chunk_tokens, b.plan.tokens_per_frame}


def test_bound_kv_buffer_is_shared_not_copied(bundles, backends):
    """ORT reads and the policy/tests read the same memory: a write through ``data`` is seen
    by the next step exactly as in the reference, and the address never changes."""
    be, b = backends["full"], bundles["full"]
    got, ref = Driver(be, b, bound=True), Driver(be, b, bound=False)
    for d in (got, ref):
        d.text(list(range(20)), "prefix")
        d.kv.data[:, :, :, :, :20, :] *= 0.5          # an edit behind the backend's back
        d.text(list(range(30, 35)), "question")
    _same(got, ref)
    assert got.kv.address == got.kv.data.ctypes.data == got.kv.ortvalue.data_ptr()


def test_commit_without_a_pending_step_and_wrong_inputs_are_errors(bundles, backends):
    be, b = backends["full"], bundles["full"]
    d = Driver(be, b, bound=True)
    with pytest.raises(RuntimeError, match="no decoder_step is pending"):
        be.commit_kv(d.kv, np.zeros(1, np.int64))
    d.text([1, 2, 3], "prefix")
    with pytest.raises(RuntimeError, match="no decoder_step is pending"):     # committed already
        be.commit_kv(d.kv, np.zeros(1, np.int64))
    c = b.plan.hidden_size
    with pytest.raises(ValueError, match="decoder_step inputs"):
        be.decoder_step(d.kv, {C.INPUTS_EMBEDS: np.zeros((1, 1, c), np.float32)})
    with pytest.raises(ValueError, match="outside the plan's T"):
        d.kv.bind_outputs(b.plan.engines[C.DECODER_STEP].dims["T"][1] + 1)


def test_two_streams_on_one_backend_on_two_threads_equal_alone(bundles, backends):
    """Each stream's KV buffer carries its own IOBinding: two streams driven at the same time
    on two threads through one backend give exactly what each gives alone."""
    for op in ("sink_window", "rekv"):
        be, b = backends[op], bundles[op]
        alone = []
        for seed in (1, 2):
            d = Driver(be, b, bound=True, seed=seed)
            d.script()
            alone.append(d)
        together = [Driver(be, b, bound=True, seed=seed) for seed in (1, 2)]
        start, errors = threading.Barrier(2), []

        def go(d):
            try:
                start.wait()
                d.script()
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=go, args=(d,)) for d in together]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for a, t in zip(alone, together):
            _same(t, a)
        assert together[0].kv.binding is not together[1].kv.binding
        assert not np.array_equal(together[0].kv.data, together[1].kv.data)   # really two streams


def test_sessions_on_the_bound_path_equal_sessions_on_run(bundles, backends):
    """Through the runtime: a Session on the ONNX Runtime backend (its KV buffer from
    ``alloc_kv``, steps through ``decoder_step`` / ``commit_kv``) gives the same answers, logits
    of every step and KV cache as a Session whose backend offers only ``run`` (the runtime's
    unbound path: ``kv_cache`` passed every step, host scatter)."""
    from conftest import frames
    from streamgraph.backends.onnxruntime import BoundKV
    from streamgraph.runtime.session import Session

    class RunOnly(Backend):
        name, thread_safe = "run-only", True

        def __init__(self, backend):
            self.backend = backend

        def run(self, engine, inputs):
            return self.backend.run(engine, inputs)

    for op in CACHES:
        be, b = backends[op], bundles[op]
        calls = []
        real_step = be.decoder_step

        def counted(kv, inputs, real_step=real_step):
            calls.append(kv)
            return real_step(kv, inputs)

        be.decoder_step = counted
        try:
            out = {}
            for label, backend in (("bound", be), ("run", RunOnly(be))):
                s = Session(b, backend, trace=True)
                video = frames(10, seed=3)
                answers = []
                for i, f in enumerate(video):
                    s.push_frame(f, budget=s.budgets[-1])
                    if i in (5, 9):
                        answers.append("".join(s.ask("what is on camera?")))
                out[label] = (s, answers)
        finally:
            del be.decoder_step
        (sb, ab), (sr, ar) = out["bound"], out["run"]
        assert isinstance(sb.kv, BoundKV) and not isinstance(sr.kv, BoundKV)
        assert calls and all(kv is sb.kv for kv in calls)             # the bound path really ran
        assert ab == ar
        assert [t["kind"] for t in sb.trace] == [t["kind"] for t in sr.trace]
        for tb, tr in zip(sb.trace, sr.trace):
            assert np.array_equal(tb["logits"], tr["logits"])
        assert np.array_equal(sb.kv.data, sr.kv.data)
        assert sb.report_meta()["kv_buffer_address_constant"]


def test_tensorrt_device_kv_index_arithmetic_matches_the_host_buffer(bundles):
    """The TensorRT backend is never run here (no TensorRT, no GPU). What can run is its
    device-resident KV buffer's torch index arithmetic, on CPU tensors with a stand-in
    execution context: commit_kv's ``index_copy_`` scatter (prefix and non-prefix valid
    tokens), ``write``, ``read_slots`` / ``write_slots`` (ReKV's block moves) give exactly
    what the host KVBuffer gives."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from streamgraph.backends.tensorrt import DeviceKV, TensorRTBackend

    plan = bundles["sink_window"].plan
    bound = {}
    ctx = SimpleNamespace(set_input_shape=lambda n, s: None, set_tensor_address=lambda n, a: bound.update({n: a}))
    fake = SimpleNamespace(torch=torch, device=torch.device("cpu"), _dec_plan=plan.engines[C.DECODER_STEP],
                           _t_max=plan.engines[C.DECODER_STEP].dims["T"][1],
                           engines={C.DECODER_STEP: SimpleNamespace(create_execution_context=lambda: ctx)})
    dev, host = DeviceKV(fake, plan.kv.shape, plan.kv.dtype), KVBuffer(plan.kv.shape, plan.kv.dtype)
    assert bound[C.KV_CACHE] == dev.address == dev.tensor.data_ptr() and dev.nbytes == host.nbytes
    rng = np.random.default_rng(0)
    L, two, B, hkv, S, dh = plan.kv.shape
    for t, slots in [(8, np.arange(8)), (8, np.r_[20:25, -1, -1, -1]), (5, np.array([40, 3, 99, 7, 60])),
                     (6, np.array([-1, 11, -1, 12, 13, -1])), (1, np.array([S - 1]))]:
        new_kv = rng.standard_normal((L, two, B, hkv, t, dh)).astype(np.float32)
        dev.pending_new_kv = torch.from_numpy(new_kv.copy())               # as the engine left it
        TensorRTBackend.commit_kv(fake, dev, slots)
        host.write(new_kv, slots)
        assert dev.pending_new_kv is None and np.array_equal(dev.data, host.data)
    new_kv = rng.standard_normal((L, two, B, hkv, 3, dh)).astype(np.float32)
    dev.write(new_kv, np.array([30, -1, 31]))
    host.write(new_kv, np.array([30, -1, 31]))
    blocks = np.array([3, 20, 40])
    for layer in (None, 1):
        assert np.array_equal(dev.read_slots(blocks, layer), host.read_slots(blocks, layer))
        vals = host.read_slots(blocks, layer) * 2 + 1
        dev.write_slots(np.array([50, 51, 52]), vals, layer)
        host.write_slots(np.array([50, 51, 52]), vals, layer)
        assert np.array_equal(dev.data, host.data)
    assert dev.address == dev.tensor.data_ptr()                            # never reallocated
    views = dev.output_views(4)
    assert views[C.NEW_KV].shape == (L, two, B, hkv, 4, dh) and views[C.LOGITS].shape == tuple(plan.engines[
        C.DECODER_STEP].outputs[0].shape)
