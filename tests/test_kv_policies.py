"""Cache policies: slot-planner invariants and logit-level conformance with StreamingLLM.

Reference semantics (techniques.md §1, mit-han-lab/streaming-llm): ``StartRecentKVCache
.evict_for_space`` keeps ``[0, start) ∪ [S - recent + n, S)`` before a chunk of n tokens, keys
are cached un-rotated and re-rotated at their index in the cache every step ("pos_shift"),
queries sit at ``past_len + i``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from streamgraph.errors import CapacityError
from streamgraph.models.build import load_model
from streamgraph.models.config import VLMConfig
from streamgraph.kv import FullCache, KVBuffer, SinkWindowCache
from streamgraph.runtime.session import Session
from tests.conftest import frames, torch_bundle


# ----------------------------------------------------------------------------- planner level
def _evict_for_space(seqs: list[int], n: int, sink: int, window: int) -> list[int]:
    """Brute-force StreamingLLM eviction over token ids (stream order numbers)."""
    if len(seqs) + n <= sink + window:
        return list(seqs)
    return seqs[:sink] + seqs[len(seqs) - window + n:]


@settings(max_examples=200, deadline=None)
@given(sink=st.integers(0, 6), window=st.integers(1, 24), data=st.data())
def test_sink_window_matches_start_recent_eviction(sink, window, data):
    chunks = data.draw(st.lists(st.integers(1, window), min_size=1, max_size=30))
    pol = SinkWindowCache(sink, window)
    retained: list[int] = []
    seen = 0
    for n in chunks:
        step = pol.plan_step(n, n)
        expect = _evict_for_space(retained, n, sink, window)
        visible = np.flatnonzero(step.cache_valid)
        got = sorted(int(pol.slot_seq[s]) for s in visible)
        assert got == expect
        # contiguous positions from 0 in stream order, new tokens right after
        order = visible[np.argsort(pol.slot_seq[visible])]
        assert step.cache_positions[order].tolist() == list(range(len(expect)))
        assert step.positions[:n].tolist() == list(range(len(expect), len(expect) + n))
        writes = step.write_slots[:n]
        assert len(set(writes.tolist())) == n and writes.min() >= 0 and writes.max() < sink + window
        assert not step.cache_valid[writes].any()            # overwritten slots are not attended
        pol.commit(step)
        retained = expect + list(range(seen, seen + n))
        seen += n
        assert pol.slots_in_use == min(seen, sink + window) == len(retained)


def test_full_cache_positions_and_capacity_error():
    pol = FullCache(10)
    s1 = pol.plan_step(4, 4)
    assert s1.write_slots.tolist() == [0, 1, 2, 3] and s1.positions.tolist() == [0, 1, 2, 3]
    assert not s1.cache_valid.any()
    pol.commit(s1)
    s2 = pol.plan_step(6, 3, offsets=np.array([0, 2, 5]))      # positions: keep (gaps allowed)
    assert s2.write_slots[:3].tolist() == [4, 5, 6] and s2.write_slots[3:].tolist() == [-1] * 3
    assert s2.positions[:3].tolist() == [4, 6, 9]
    assert s2.cache_valid.tolist() == [True] * 4 + [False] * 6
    pol.commit(s2)
    assert pol.plan_step(1, 1).positions.tolist() == [10]
    with pytest.raises(CapacityError, match="KV cache full: policy 'full' has 10 slots, 7 in use"):
        pol.plan_step(4, 4)


def test_kv_buffer_writes_in_place():
    buf = KVBuffer([2, 2, 1, 2, 8, 4])
    addr = buf.data.ctypes.data
    new = np.random.default_rng(0).standard_normal((2, 2, 1, 2, 3, 4)).astype(np.float32)
    buf.write(new, np.array([5, -1, 1]))
    np.testing.assert_array_equal(buf.data[..., 5, :], new[..., 0, :])
    np.testing.assert_array_equal(buf.data[..., 1, :], new[..., 2, :])
    assert np.count_nonzero(buf.data[..., [0, 2, 3, 4, 6, 7], :]) == 0
    assert buf.data.ctypes.data == addr and buf.nbytes == 2 * 2 * 2 * 8 * 4 * 4


# ----------------------------------------------------------------------------- logit level
def _run_stream(bundle_dir, n_frames=10, question="What happens?"):
    s = Session.open(bundle_dir, "torch", overload="none", trace=True)
    for f in frames(n_frames):
        s.push_frame(f)
    "".join(s.ask(question))
    for f in frames(3, seed=1):
        s.push_frame(f)
    return s


def test_sink_window_longer_than_stream_equals_full(tmp_path):
    full = torch_bundle(tmp_path, name="full", cache="{op: full, capacity_tokens: 2048}")
    sw = torch_bundle(tmp_path, name="sw", cache="{op: sink_window, sink_tokens: 4, window_tokens: 2000}")
    a, b = _run_stream(full), _run_stream(sw)
    assert len(a.trace) == len(b.trace) > 15
    for x, y in zip(a.trace, b.trace):
        assert np.abs(x["logits"] - y["logits"]).max() <= 1e-5


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent RoPE (HF rotate_half convention): x [H, n, D], pos [n]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@torch.no_grad()
def reference_start_recent(model, chunks: list[np.ndarray], sink: int, window: int) -> list[np.ndarray]:
    """StreamingLLM with pos_shift over a growing list cache (brute force, dynamic shapes).

    ``chunks``: list of ``[n, C]`` embeddings; returns the last token's logits per chunk."""
    cfg = model.cfg.text
    lm = model.language_model
    layers = lm.layers
    keys = [torch.zeros(cfg.num_key_value_heads, 0, cfg.head_dim) for _ in layers]
    vals = [torch.zeros(cfg.num_key_value_heads, 0, cfg.head_dim) for _ in layers]
    out = []
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for emb in chunks:
        n = emb.shape[0]
        cur = keys[0].shape[1]
        if cur + n > sink + window:                          # evict_for_space
            keep = torch.cat([torch.arange(sink), torch.arange(cur - window + n, cur)])
            keys = [k[:, keep] for k in keys]
            vals = [v[:, keep] for v in vals]
        past = keys[0].shape[1]
        h = torch.from_numpy(emb)
        for li, layer in enumerate(layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(n, cfg.num_attention_heads, cfg.head_dim).transpose(0, 1)
            k = a.k_proj(x).view(n, cfg.num_key_value_heads, cfg.head_dim).transpose(0, 1)
            v = a.v_proj(x).view(n, cfg.num_key_value_heads, cfg.head_dim).transpose(0, 1)
            keys[li] = torch.cat([keys[li], k], 1)           # stored un-rotated
            vals[li] = torch.cat([vals[li], v], 1)
            total = past + n
            kr = _rope(keys[li], torch.arange(total), cfg.rope_theta).repeat_interleave(rep, 0)
            vr = vals[li].repeat_interleave(rep, 0)
            qr = _rope(q, torch.arange(past, total), cfg.rope_theta)
            scores = qr @ kr.transpose(-1, -2) / cfg.head_dim ** 0.5
            allowed = torch.arange(total)[None, :] <= (past + torch.arange(n))[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
            o = (scores.softmax(-1) @ vr).transpose(0, 1).reshape(n, -1)
            h = h + a.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        out.append(model.lm_head(lm.norm(h))[-1].numpy())
    return out


@pytest.mark.parametrize("sink,window", [(4, 40), (0, 33), (2, 50)])
def test_short_window_matches_brute_force_streaming_llm(tmp_path, sink, window):
    b = torch_bundle(tmp_path, name="short", chunk=16,
                     cache=f"{{op: sink_window, sink_tokens: {sink}, window_tokens: {window}}}")
    s = _run_stream(b, n_frames=12)
    man = json.loads((b / "manifest.json").read_text())
    model = load_model(VLMConfig.from_dict(man["model"]["config"]), b / "weights.safetensors")
    chunks = [t["inputs_embeds"][0, : t["n_valid"]] for t in s.trace]
    ref = reference_start_recent(model, chunks, sink, window)
    assert s.policy.tokens_seen > sink + window + 100          # eviction happened many times
    for i, (t, r) in enumerate(zip(s.trace, ref)):
        err = np.abs(t["logits"] - r).max()
        assert err < 1e-4, f"step {i} ({t['kind']}): {err:.3g}"


def test_every_policy_matches_every_chunk_kind_and_rejects_unknown_ones():
    """ChunkKind is the one list of kinds; each policy plans a chunk of every kind (rekv's
    question kinds after prepare_question) and names itself in a one-line error for an
    unknown kind."""
    from streamgraph.kv import POLICIES, ChunkKind, DuoCache
    from streamgraph.kv.carrier import CarrierCache
    from streamgraph.kv.rekv import RekvCache
    from streamgraph.kv.streaming_vlm import StreamingVLMCache

    assert [k.value for k in ChunkKind] == ["prefix", "frame", "retrieval", "video_end", "question", "decode",
                                            "resume"]
    assert set(POLICIES) == {"full", "sink_window", "streaming_vlm", "rekv", "carrier", "duo"}
    make = {"full": lambda: FullCache(200), "sink_window": lambda: SinkWindowCache(2, 40),
            "streaming_vlm": lambda: StreamingVLMCache(4, 32, 2, 8),
            "rekv": lambda: RekvCache(init_tokens=4, local_tokens=40, topk=2, block_tokens=8, question_tokens=32,
                                      store_blocks=4, num_layers=2, num_kv_heads=2, head_dim=16, num_heads=4),
            "carrier": lambda: CarrierCache(8, 4, 32, 64),
            "duo": lambda: DuoCache(200, 2, 8, np.zeros((2, 2), bool))}
    assert set(make) == set(POLICIES)
    for name, new in make.items():
        pol = new()
        kv = KVBuffer([2, 2, 1, 2, pol.capacity, 16])
        pol.attach(kv)
        for kind in ChunkKind:
            if kind is ChunkKind.FRAME and name == "carrier":
                tokens, n, _ = pol.prepare_frame(np.ones((1, 3, 64), np.float32), 3, None)
                step = pol.plan_step(tokens.shape[1], n, kind=kind)
            elif kind is ChunkKind.RETRIEVAL or (name == "rekv" and kind in (ChunkKind.VIDEO_END, ChunkKind.QUESTION,
                                                                              ChunkKind.DECODE)):
                if name == "rekv":
                    pol.prepare_question(lambda: None)
                step = pol.plan_step(1, 1, kind=kind)
            else:
                step = pol.plan_step(2, 2, kind=kind.value)      # the plain name works too
            pol.commit(step, {"query_mean": np.zeros((2, 1, 4, 16), np.float32)})
        with pytest.raises(ValueError, match=f"cache policy '{name}': unknown chunk kind 'bogus'"):
            pol.plan_step(1, 1, kind="bogus")
