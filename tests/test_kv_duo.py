"""DuoAttention (``duo``): head roles, the policy's visibility, and conformance of the engine
against a brute-force, list-based per-head recomputation (techniques.md section 7)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamgraph.errors import CapacityError
from streamgraph.kv import DuoCache, FullCache, KVBuffer
from streamgraph.kv.duo import head_roles, load_pattern
from streamgraph.models.config import VLMConfig
from streamgraph.models.vlm import StreamingVLM

L, HKV, H, DH = 2, 2, 4, 16            # the default (tiny) TextConfig: GQA, 2 query heads per KV head


# ----------------------------------------------------------------------------- head roles
def _reference_sparsify(alpha: np.ndarray, sparsity: float) -> np.ndarray:
    """duo-attention's ``sparsify_attention_heads`` without its tie-breaking noise (the alphas
    below are distinct): threshold = quantile(alpha, s); alpha >= threshold is a retrieval
    head. Returns True for a streaming head."""
    threshold = np.quantile(alpha, sparsity)
    if sparsity >= 1:
        threshold = 2
    if sparsity <= 0:
        threshold = -1
    return ~(alpha >= threshold)


@pytest.mark.parametrize("shape", [(2, 2), (4, 3), (24, 2), (5, 8)])
def test_sparsity_on_a_pattern_matches_the_reference_quantile(shape):
    rng = np.random.default_rng(sum(shape))
    alpha = rng.permutation(np.linspace(0.01, 0.99, shape[0] * shape[1])).reshape(shape)
    for s in [0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 0.99, 1.0]:
        got = head_roles(*shape, alpha=alpha, sparsity=s)
        np.testing.assert_array_equal(got, _reference_sparsify(alpha, s), err_msg=f"sparsity {s}")
    for t in [0.0, 0.3, 0.5, 1.0]:
        np.testing.assert_array_equal(head_roles(*shape, alpha=alpha, threshold=t), ~(alpha >= t))


def test_explicit_heads_and_sparsity_alone():
    got = head_roles(3, 2, streaming_heads=[[0, 1], [2, 0]])
    assert got.tolist() == [[False, True], [False, False], [True, False]]
    with pytest.raises(ValueError, match=r"streaming head \[3, 0\] is out of range: the model has 3 layers"):
        head_roles(3, 2, streaming_heads=[[3, 0]])
    for n_layers, n_heads, s in [(24, 2, 0.5), (6, 4, 0.75), (5, 3, 0.2)]:
        got = head_roles(n_layers, n_heads, sparsity=s)
        n = n_layers * n_heads
        assert got.sum() == math.ceil((n - 1) * s)
        per_layer = got.sum(axis=1)
        assert per_layer.max() - per_layer.min() <= 1                      # spread over the layers
    assert not head_roles(4, 2, sparsity=0.0).any() and head_roles(4, 2, sparsity=1.0).all()
    with pytest.raises(ValueError, match=r"pattern has shape \[2, 3\] but the model has 2 layers x 2 KV heads"):
        head_roles(2, 2, alpha=np.zeros((2, 3)), threshold=0.5)


def test_pattern_files(tmp_path):
    alpha = np.array([[0.9, -0.5], [0.2, 1.7]])
    (tmp_path / "p").mkdir()
    np.savetxt(tmp_path / "p" / "full_attention_heads.tsv", alpha, delimiter="\t")
    np.save(tmp_path / "a.npy", alpha)
    for src in [tmp_path / "p", tmp_path / "p" / "full_attention_heads.tsv", tmp_path / "a.npy"]:
        np.testing.assert_array_equal(load_pattern(src), np.clip(alpha, 0, 1))
    with pytest.raises(ValueError, match="does not exist"):
        load_pattern(tmp_path / "missing.tsv")
    np.save(tmp_path / "b.npy", np.zeros(3))
    with pytest.raises(ValueError, match="1-D array"):
        load_pattern(tmp_path / "b.npy")


# ----------------------------------------------------------------------------- the policy
def test_window_is_sinks_plus_recent_tokens_before_the_chunk():
    """Brute force over a random chunk sequence: a streaming head sees exactly the tokens
    j < sink and j >= n - recent of the n before the chunk; retrieval heads see all n, every
    token at its stream position."""
    rng = np.random.default_rng(0)
    sink, recent, cap = 3, 7, 200
    pol = DuoCache(cap, sink, recent, np.array([[True, False], [False, True]]))
    kinds = ["prefix", "frame", "video_end", "question", "decode", "resume", "frame"]
    n = 0
    while n < 150:
        t = int(rng.integers(1, 9))
        nv = int(rng.integers(0, t + 1))
        step = pol.plan_step(t, nv, kind=kinds[int(rng.integers(len(kinds)))])
        seq_of = {int(s): int(q) for s, q in enumerate(pol.slot_seq) if q >= 0}
        seen = sorted(seq_of[s] for s in np.flatnonzero(step.cache_valid))
        win = sorted(seq_of[s] for s in np.flatnonzero(step.window_valid))
        assert seen == list(range(n))
        assert win == [j for j in range(n) if j < sink or j >= n - recent]
        assert step.positions[:nv].tolist() == list(range(n, n + nv))
        assert all(step.cache_positions[s] == seq_of[s] for s in seq_of)  # original positions
        pol.commit(step)
        n += nv
    with pytest.raises(CapacityError, match="policy 'duo' has 200 slots"):
        pol.plan_step(64, 64, kind="frame")
    with pytest.raises(ValueError, match="unknown chunk kind 'bogus'"):
        pol.plan_step(1, 1, kind="bogus")


# ----------------------------------------------------------------------------- conformance
def _decoder(seed: int = 0):
    """The tiny preset's decoder_step module with random weights large enough that which
    tokens a head sees changes the logits (std 0.02 weights give near-uniform attention)."""
    torch.manual_seed(seed)
    model = StreamingVLM(VLMConfig()).eval()
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            elif "embed" not in name:
                p.copy_(0.25 * torch.randn(p.shape))
        model.language_model.embed_tokens.weight.normal_(0.0, 1.0)
    dec = model.decoder_step()
    assert (dec.cfg.num_hidden_layers, dec.cfg.num_key_value_heads, dec.cfg.num_attention_heads,
            dec.cfg.head_dim) == (L, HKV, H, DH)
    return dec


class ListReference:
    """DuoAttention decoding written out per head, with lists instead of slots: every token's
    un-rotated K and V per layer in stream order, each query head attending exactly to the
    tokens its KV head sees — all earlier tokens (retrieval head) or the first ``sink`` and
    the ``recent`` most recent before the chunk (streaming head) — plus its chunk causally,
    at the tokens' original positions (float64 numpy)."""

    def __init__(self, dec, streaming: np.ndarray, sink: int, recent: int):
        self.cfg, self.streaming, self.sink, self.recent = dec.cfg, streaming, sink, recent
        w = lambda t: t.detach().double().numpy()                                   # noqa: E731
        self.layers = [dict(ln1=w(l.input_layernorm.weight), ln2=w(l.post_attention_layernorm.weight),
                            wq=w(l.self_attn.q_proj.weight), bq=w(l.self_attn.q_proj.bias),
                            wk=w(l.self_attn.k_proj.weight), bk=w(l.self_attn.k_proj.bias),
                            wv=w(l.self_attn.v_proj.weight), bv=w(l.self_attn.v_proj.bias),
                            wo=w(l.self_attn.o_proj.weight), gate=w(l.mlp.gate_proj.weight),
                            up=w(l.mlp.up_proj.weight), down=w(l.mlp.down_proj.weight))
                       for l in dec.model.layers]
        self.norm, self.head = w(dec.model.norm.weight), w(dec.lm_head.weight)
        self.keys = [[] for _ in self.layers]      # per layer: [Hkv, Dh] per token
        self.values = [[] for _ in self.layers]
        self.pos: list[int] = []

    def _rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg.rms_norm_eps) * w

    def _rope(self, x, p):
        half = DH // 2
        ang = p * (1.0 / self.cfg.rope_theta ** (np.arange(0, DH, 2) / DH))
        c, s = np.cos(ang), np.sin(ang)
        return np.concatenate([x[:half] * c - x[half:] * s, x[half:] * c + x[:half] * s])

    def step(self, embeds: np.ndarray, positions: list[int]) -> np.ndarray:
        """Logits of the last of ``embeds [n, C]`` (the chunk's valid tokens)."""
        n_before, n = len(self.pos), len(embeds)
        h = embeds.astype(np.float64)
        for li, p in enumerate(self.layers):
            x = self._rms(h, p["ln1"])
            q = (x @ p["wq"].T + p["bq"]).reshape(n, H, DH)
            k = (x @ p["wk"].T + p["bk"]).reshape(n, HKV, DH)
            v = (x @ p["wv"].T + p["bv"]).reshape(n, HKV, DH)
            out = np.zeros((n, H, DH))
            for i in range(n):
                for qh in range(H):
                    g = qh // (H // HKV)
                    old = [j for j in range(n_before)
                           if not self.streaming[li, g] or j < self.sink or j >= n_before - self.recent]
                    keys = [self._rope(self.keys[li][j][g], self.pos[j]) for j in old]
                    keys += [self._rope(k[c, g], positions[c]) for c in range(i + 1)]
                    vals = [self.values[li][j][g] for j in old] + [v[c, g] for c in range(i + 1)]
                    scores = np.array([self._rope(q[i, qh], positions[i]) @ kk for kk in keys]) / math.sqrt(DH)
                    prob = np.exp(scores - scores.max())
                    out[i, qh] = (prob / prob.sum()) @ np.array(vals)
            h = h + out.reshape(n, H * DH) @ p["wo"].T
            y = self._rms(h, p["ln2"])
            g_ = y @ p["gate"].T
            h = h + ((g_ / (1 + np.exp(-g_))) * (y @ p["up"].T)) @ p["down"].T
            self.keys[li] += list(k)
            self.values[li] += list(v)
        self.pos += list(positions)
        return self._rms(h[-1], self.norm) @ self.head.T


# (chunk length, valid tokens, kind): prompt, frames (one partly valid), a question, decodes, more
SCHEDULE = ([(5, 5, "prefix")] + [(6, 6, "frame"), (6, 4, "frame"), (6, 6, "frame")] + [(4, 4, "question")]
            + [(1, 1, "decode")] * 3 + [(3, 3, "resume"), (6, 6, "frame"), (6, 5, "frame"), (2, 2, "question")]
            + [(1, 1, "decode")] * 2)


def _run_engine(dec, policy, embeds_seq, *, pass_heads=True, override_visible=None):
    """Stream ``embeds_seq`` through the decoder_step module with ``policy``; logits per step.
    ``override_visible(step)`` replaces cache_valid (and drops the per-head inputs)."""
    kv = KVBuffer([L, 2, 1, HKV, policy.capacity, DH])
    policy.attach(kv)
    heads = policy.streaming_heads if policy.streaming_heads is not None else np.zeros((L, HKV), bool)
    logits = []
    for (t, nv, kind), emb in zip(SCHEDULE, embeds_seq):
        step = policy.plan_step(t, nv, kind=kind)
        valid = np.arange(t) < nv
        cache_valid = step.cache_valid if override_visible is None else override_visible(step)
        args = [torch.from_numpy(emb[None]), torch.from_numpy(step.positions[None]), torch.from_numpy(valid[None]),
                torch.from_numpy(kv.data), torch.from_numpy(step.cache_positions[None]),
                torch.from_numpy(cache_valid[None])]
        if pass_heads and override_visible is None:
            wv = step.window_valid if step.window_valid is not None else step.cache_valid
            args += [torch.from_numpy(wv[None]), torch.from_numpy(heads)]
        with torch.no_grad():
            out, new_kv, _, _ = dec(*args)
        kv.write(new_kv.numpy(), step.write_slots)
        policy.commit(step)
        logits.append(out[0].numpy().astype(np.float64))
    return logits


def _embeds(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((t, 64)).astype(np.float32) for t, _, _ in SCHEDULE]


@pytest.mark.parametrize("streaming", [
    [[True, False], [False, True]],            # mixed, per layer
    [[True, True], [False, False]],            # a whole layer streaming
    [[True, True], [True, True]],              # every head streaming
    [[False, False], [False, False]],          # none: full attention
])
def test_engine_matches_brute_force_per_head_reference(streaming):
    dec = _decoder()
    heads = np.array(streaming)
    sink, recent = 3, 7
    embeds = _embeds()
    got = _run_engine(dec, DuoCache(96, sink, recent, heads), embeds)
    ref = ListReference(dec, heads, sink, recent)
    n = 0
    for i, ((t, nv, kind), emb) in enumerate(zip(SCHEDULE, embeds)):
        want = ref.step(emb[:nv], list(range(n, n + nv)))
        n += nv
        err = np.abs(got[i] - want).max()
        assert err < 1e-4 * max(1.0, np.abs(want).max()), f"step {i} ({kind}): max |logits diff| {err:.3g}"


def test_the_test_can_fail_streaming_heads_change_the_logits():
    dec, embeds = _decoder(), _embeds()
    duo = _run_engine(dec, DuoCache(96, 3, 7, np.ones((L, HKV), bool)), embeds)
    full = _run_engine(dec, FullCache(96), embeds)
    assert max(np.abs(a - b).max() for a, b in zip(duo, full)) > 1e-2


def test_no_streaming_heads_equals_full_bit_for_bit():
    dec, embeds = _decoder(), _embeds()
    duo = _run_engine(dec, DuoCache(96, 3, 7, np.zeros((L, HKV), bool)), embeds)
    full = _run_engine(dec, FullCache(96), embeds, pass_heads=False)       # the 6-input call
    full8 = _run_engine(dec, FullCache(96), embeds)                        # all-False heads
    for a, b, c in zip(duo, full, full8):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_all_heads_streaming_equals_sink_plus_window_visibility():
    dec, embeds = _decoder(), _embeds()
    duo = _run_engine(dec, DuoCache(96, 3, 7, np.ones((L, HKV), bool)), embeds)
    win = _run_engine(dec, DuoCache(96, 3, 7, np.ones((L, HKV), bool)), embeds,
                      override_visible=lambda step: step.window_valid)
    for a, b in zip(duo, win):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- compiled
DUO_GRAPH = """\
version: 1
name: duo
model: {{preset: tiny, seed: 0}}
stream: {{fps: 2, frame_size: [64, 64]}}
nodes:
  encoder: {{op: vision_encoder}}
  pruner:  {{op: topk_saliency, input: encoder, tokens_per_frame: 8}}
  cache:   {cache}
  llm:     {{op: decoder, input: [pruner, query], cache: cache, max_new_tokens: 4, prefill_chunk_tokens: 16}}
slo: {{frame_deadline_ms: 250, ttft_ms: 500, overload: drop_late}}
budget: {{memory_mb: 512}}
"""


def test_graph_errors_are_located(tmp_path):
    from streamgraph.compiler.compile import check_graph
    from streamgraph.errors import SpecError

    np.savetxt(tmp_path / "bad.tsv", np.ones((3, 2)), delimiter="\t")
    for cache, field, fragment in [
        (f"{{op: duo, capacity_tokens: 128, pattern: {tmp_path / 'bad.tsv'}}}", "nodes.cache.pattern",
         "pattern has shape [3, 2] but the model has 2 layers x 2 KV heads"),
        ("{op: duo, capacity_tokens: 128, pattern: /nonexistent/p.tsv}", "nodes.cache.pattern", "does not exist"),
        ("{op: duo, capacity_tokens: 128, streaming_heads: [[0, 5]]}", "nodes.cache.streaming_heads",
         "out of range"),
        ("{op: duo, capacity_tokens: 128}", "nodes.cache", "duo needs head roles"),
        ("{op: duo, capacity_tokens: 128, sparsity: 0.5, streaming_heads: [[0, 1]]}", "nodes.cache",
         "cannot be combined"),
    ]:
        g = tmp_path / "g.yaml"
        g.write_text(DUO_GRAPH.format(cache=cache))
        with pytest.raises(SpecError) as e:
            check_graph(g)
        assert e.value.field == field and fragment in str(e.value) and e.value.line is not None, str(e.value)


def test_compiled_duo_session_matches_reference(tmp_path):
    """A compiled duo bundle (head roles from a pattern file) streamed by the runtime through
    ONNX Runtime: the plan holds the thresholded roles and every step's logits equal the
    list-based reference replaying the same embeddings."""
    from streamgraph.backends.torch import TorchBackend
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.compiler.compile import compile_graph
    from streamgraph.runtime.session import Session
    from tests.conftest import frames

    alpha = np.array([[0.9, 0.1], [0.3, 0.7]])
    np.savetxt(tmp_path / "full_attention_heads.tsv", alpha, delimiter="\t")
    g = tmp_path / "duo.yaml"
    g.write_text(DUO_GRAPH.format(cache=f"{{op: duo, capacity_tokens: 400, sink_tokens: 4, recent_tokens: 12, "
                                        f"pattern: {tmp_path}}}"))
    bundle = compile_graph(g, tmp_path / "build").bundle.path
    plan = Bundle.load(bundle).plan
    assert plan.cache["streaming_heads"] == [[False, True], [True, False]]
    assert [s.name for s in plan.engines["decoder_step"].inputs][-2:] == ["window_valid", "streaming_heads"]
    s = Session.open(bundle, "onnxruntime", overload="none", trace=True)
    np.testing.assert_array_equal(s.policy.streaming_heads, [[False, True], [True, False]])
    for f in frames(5):
        s.push_frame(f)
    "".join(s.ask("What is moving?"))
    for f in frames(2, seed=3):
        s.push_frame(f)
    trace = s.trace
    assert sum(t["kind"] == "frame" for t in trace) == 7 and any(t["kind"] == "decode" for t in trace)
    assert sum(t["n_valid"] for t in trace) > 4 + 12                      # the window was exceeded
    dec = TorchBackend(Bundle.load(bundle)).modules["decoder_step"]
    ref = ListReference(dec, np.array([[False, True], [True, False]]), 4, 12)
    n = 0
    for i, t in enumerate(trace):
        nv = int(t["n_valid"])
        want = ref.step(t["inputs_embeds"][0, :nv], list(range(n, n + nv)))
        n += nv
        err = np.abs(t["logits"] - want).max()
        assert err < 1e-3 * max(1.0, np.abs(want).max()), f"step {i} ({t['kind']}): max |logits diff| {err:.3g}"


def test_pattern_path_is_relative_to_the_graph_file(tmp_path, monkeypatch):
    from streamgraph.compiler.compile import check_graph

    (tmp_path / "graphs" / "pat").mkdir(parents=True)
    np.savetxt(tmp_path / "graphs" / "pat" / "full_attention_heads.tsv", [[0.2, 0.8], [0.6, 0.4]], delimiter="\t")
    g = tmp_path / "graphs" / "duo.yaml"
    g.write_text(DUO_GRAPH.format(cache="{op: duo, capacity_tokens: 128, pattern: pat, sparsity: 0.5}"))
    monkeypatch.chdir(tmp_path)                                   # not the graph's directory
    plan = check_graph(g).plan
    # n = 4 heads, ceil(3 * 0.5) = 2 stream: the two smallest gates, 0.2 and 0.4
    assert plan.cache["streaming_heads"] == [[True, False], [False, True]]
    assert plan.cache["streaming_fraction"] == 0.5
    assert [r["name"] for r in plan.cache["regions"]] == ["cache"] and plan.cache["capacity"] == 128
