"""streaming_vlm, rekv and carrier: conformance with brute-force re-implementations of the
reference semantics, and long-run bounds.

Each logit-level test streams frames and questions through a torch-backend session (the
static KV buffer, slot planners and the one ``decoder_step`` engine) and replays the same
chunk embeddings through :class:`BruteDecoder` — an independent decoder over explicit,
growing per-layer lists of cached keys/values, whose context for each chunk is chosen by a
direct transcription of the reference algorithm:

* StreamingVLM (techniques.md §2, mit-han-lab/streaming-vlm): text sink + last text tokens
  + last frames, positions 0..m-1 over what is retained ("shrink").
* ReKV (§5, Becomebright/ReKV): StreamingLLM encoding over [init | local]; a question is one
  forward of its text in which every layer scores all frame blocks by
  dot(mean block keys expanded to H heads, mean pre-RoPE question query) in fp32, keeps the
  top-k in time order and attends to [init | retrieved | question] at positions 0..; the
  answer is prefilled/decoded over the same per-layer context; question KV is discarded.
* VideoScan (§8, LyliAgave/VideoScan): [frame tokens | mean carrier] at positions from the
  cache length, only the carrier's KV kept at its insertion position, the earlier of the
  most similar adjacent carrier pair dropped when the memory is full.
"""
from __future__ import annotations

import json
import math
import tracemalloc
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from streamgraph.compiler.compile import check_graph
from streamgraph.errors import CapacityError
from streamgraph.models.build import load_model
from streamgraph.models.config import VLMConfig
from streamgraph.kv import (CarrierCache, FullCache, KVBuffer, RekvCache, SinkWindowCache,
                            StreamingVLMCache)
from streamgraph.kv.rekv import BlockStore
from streamgraph.runtime.session import Session
from tests.conftest import frames, torch_bundle, write_graph
from tests.test_kv_policies import _rope


# ----------------------------------------------------------------------------- brute force
@dataclass
class Tok:
    """One cached token of the reference: un-rotated K/V per layer and a position."""

    seq: int
    kind: str
    k: list = field(default_factory=list)     # per layer [Hkv, Dh]
    v: list = field(default_factory=list)
    pos: int = 0


class BruteDecoder:
    """Decoder over explicit per-layer contexts (dynamic shapes, no static buffer)."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg.text

    @torch.no_grad()
    def run(self, emb: np.ndarray, new_pos, context):
        """``emb [n,C]``; ``new_pos [n]``; ``context(layer, q_raw [H,n,Dh]) -> (tokens,
        positions)``. Returns last-token logits, per-token K/V per layer, raw queries."""
        cfg, lm = self.cfg, self.model.language_model
        nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rep = nh // nkv
        h = torch.from_numpy(np.ascontiguousarray(emb)).float()
        n = h.shape[0]
        newp = torch.as_tensor(np.asarray(new_pos), dtype=torch.int64)
        ks, vs, qs = [], [], []
        for li, layer in enumerate(lm.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(n, nh, dh).transpose(0, 1)
            k = a.k_proj(x).view(n, nkv, dh).transpose(0, 1)
            v = a.v_proj(x).view(n, nkv, dh).transpose(0, 1)
            ks.append(k)
            vs.append(v)
            qs.append(q)
            toks, cpos = context(li, q)
            m = len(toks)
            ck = torch.stack([t.k[li] for t in toks], 1) if m else torch.zeros(nkv, 0, dh)
            cv = torch.stack([t.v[li] for t in toks], 1) if m else torch.zeros(nkv, 0, dh)
            cp = torch.as_tensor(np.asarray(cpos, dtype=np.int64).reshape(-1))
            kk = torch.cat([_rope(ck, cp, cfg.rope_theta), _rope(k, newp, cfg.rope_theta)], 1)
            vv = torch.cat([cv, v], 1)
            qr = _rope(q, newp, cfg.rope_theta)
            scores = qr @ kk.repeat_interleave(rep, 0).transpose(-1, -2) / math.sqrt(dh)
            allowed = torch.cat([torch.ones(n, m, dtype=torch.bool),
                                 torch.ones(n, n, dtype=torch.bool).tril()], 1)
            o = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv.repeat_interleave(rep, 0)
            h = h + a.o_proj(o.transpose(0, 1).reshape(n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(lm.norm(h))[-1].numpy()
        return logits, ks, vs, qs

    @staticmethod
    def tokens(ks, vs, kind: str, seq0: int, positions) -> list[Tok]:
        n = ks[0].shape[1]
        return [Tok(seq0 + j, kind, [k[:, j] for k in ks], [v[:, j] for v in vs], int(positions[j]))
                for j in range(n)]


def _contiguous(toks):
    """Context function: the same tokens in every layer at positions 0..m-1."""
    return lambda layer, q: (toks, np.arange(len(toks)))


def _load(bundle_dir):
    man = json.loads((bundle_dir / "manifest.json").read_text())
    return load_model(VLMConfig.from_dict(man["model"]["config"]), bundle_dir / "weights.safetensors")


def _stream(bundle_dir, n1=10, n2=3, questions=("What happens?", "And now?"), snap=None, video_end=False):
    """frames, question, frames, question — the session's trace (and per-question snapshots).
    ``video_end``: give the session a video-end embedding (as LLaVA-OneVision bundles have
    ``image_newline``), prefilled as one ``video_end`` chunk when a question closes frames."""
    s = Session.open(bundle_dir, "torch", overload="none", trace=True)
    if video_end:
        c = s.plan.hidden_size
        s._video_end = np.random.default_rng(7).standard_normal((1, 1, c)).astype(np.float32)
    for f in frames(n1):
        s.push_frame(f)
    "".join(s.ask(questions[0]))
    if snap is not None:
        snap.append(snap_of(s.policy))
    for f in frames(n2, seed=1):
        s.push_frame(f)
    "".join(s.ask(questions[1]))
    if snap is not None:
        snap.append(snap_of(s.policy))
    for f in frames(1, seed=2):
        s.push_frame(f)
    return s


def snap_of(p):
    return {"retrieved": [r.copy() for r in p.retrieved],
            "scores": [None if x is None else x.copy() for x in p.scores],
            "query_means": None if p.query_means is None else p.query_means.copy(),
            "n_blocks": p.n_blocks, "store_disk": p.store.disk_blocks}


def _check_logits(trace, ref, skip=("retrieval",), tol=1e-4):
    got = [t for t in trace if t["kind"] not in skip]
    assert len(got) == len(ref) > 20
    for i, (t, r) in enumerate(zip(got, ref)):
        err = np.abs(t["logits"] - r).max()
        assert err < tol, f"step {i} ({t['kind']}): max |logits diff| {err:.3g}"


# ----------------------------------------------------------------------------- StreamingVLM
#: StreamingVLM keeps the system prompt and assistant text ("previous text"); the user turn
#: (question prompt, the video-end token, the turn wrapper) is kept only while its round is
#: the current one (techniques.md 2.3 step 1a/1c: when a round ages out its user text and
#: the assistant wrapper are deleted, its assistant text is kept).
SVLM_KEEP = ("prefix", "decode")


class SvlmReference:
    """StreamingVLM's retained set over explicit token lists (the rule, independently of the
    slot planner): ``sink`` = the first ``sink`` system/assistant text tokens; the text window
    = the most recent ``text_window`` live text tokens after them (a chunk evicts the oldest
    as it needs room; evicted tokens are gone); a ``resume`` chunk opens a new round and
    deletes the text of the round before it except its assistant text; frames = the last
    ``window_frames`` frames. ``step(kind, n)`` returns the retained tokens (seq order)
    the chunk attends to and records the chunk's tokens."""

    def __init__(self, sink, text_window, window_frames):
        self.sink, self.tw, self.nf = sink, text_window, window_frames
        self.toks: list[dict] = []            # live tokens: seq, what ("keep"/"round"/"frame"), round/frame
        self.seq = self.round = self.n_frames = self.n_keep = 0

    def step(self, kind, n):
        if kind == "frame" and n == 0:         # a frame without tokens changes nothing
            return list(self.toks), []
        if kind == "frame":
            keep = set(range(max(0, self.n_frames - (self.nf - 1)), self.n_frames))
            self.toks = [t for t in self.toks if t["what"] != "frame" or t["frame"] in keep]
            ctx = list(self.toks)
            new = [{"what": "frame", "frame": self.n_frames} for _ in range(n)]
            self.n_frames += 1
        else:
            if kind == "resume":              # the current round ages out
                self.toks = [t for t in self.toks if t["what"] != "round"]
                self.round += 1
            keep = kind in SVLM_KEEP
            n_sink = max(0, min(n, self.sink - self.n_keep)) if keep else 0
            n_w = n - n_sink
            window = [t for t in self.toks if t["what"] == "round" or (t["what"] == "keep" and not t["sink"])]
            if len(window) + n_w > self.tw:
                gone = {id(t) for t in window[:len(window) + n_w - self.tw]}
                self.toks = [t for t in self.toks if id(t) not in gone]
            ctx = list(self.toks)
            new = [{"what": "keep" if keep else "round", "sink": j < n_sink, "round": self.round}
                   for j in range(n)]
            self.n_keep += n if keep else 0
        for t in new:
            t["seq"] = self.seq
            self.seq += 1
        self.toks += new
        return ctx, new


def reference_streaming_vlm(model, trace, sink, text_window, window_frames):
    """StreamingVLM shrink mode over a list cache: returns each chunk's last logits."""
    dec = BruteDecoder(model)
    ref = SvlmReference(sink, text_window, window_frames)
    kv: dict[int, Tok] = {}
    out = []
    for t in trace:
        n = t["n_valid"]
        emb = t["inputs_embeds"][0, :n]
        ctx, new = ref.step(t["kind"], n)
        toks = [kv[x["seq"]] for x in ctx]
        m = len(toks)
        logits, ks, vs, _ = dec.run(emb, np.arange(m, m + n), _contiguous(toks))
        for x, tok in zip(new, dec.tokens(ks, vs, t["kind"], new[0]["seq"] if new else 0, np.arange(m, m + n))):
            kv[x["seq"]] = tok
        out.append(logits)
    return out


def test_streaming_vlm_matches_brute_force(tmp_path):
    b = torch_bundle(tmp_path, name="svlm", chunk=16,
                     cache="{op: streaming_vlm, sink_tokens: 40, text_window_tokens: 48, "
                           "vision_window_seconds: 1.5}")             # 1.5 s at 2 fps = 3 frames
    s = _stream(b, video_end=True)
    assert s.plan.cache["regions"][2] == {"name": "vision_window", "start": 88, "slots": 48,
                                          "bytes": 48 * s.kv.data[:, :, :, :, 0].nbytes}
    assert s.policy.frame_count == 14 and s.policy.text_count > 40 + 48      # both windows wrapped
    kinds = [t["kind"] for t in s.trace]
    assert kinds.count("resume") == 2 and "decode" in kinds              # two rounds aged out
    assert kinds.count("video_end") == 2
    ref = reference_streaming_vlm(_load(b), s.trace, 40, 48, 3)
    _check_logits(s.trace, ref)


_SVLM_KINDS = ("frame", "prefix", "question", "video_end", "decode", "resume")


@settings(max_examples=150, deadline=None)
@given(sink=st.integers(0, 5), tw=st.integers(1, 12), nf=st.integers(1, 4), k=st.integers(1, 4),
       data=st.data())
def test_streaming_vlm_retains_reference_set_with_gapless_positions(sink, tw, nf, k, data):
    pol = StreamingVLMCache(sink, tw, nf, k)
    ref = SvlmReference(sink, tw, nf)
    for _ in range(data.draw(st.integers(1, 30))):
        kind = data.draw(st.sampled_from(_SVLM_KINDS))
        n = data.draw(st.integers(1, k)) if kind == "frame" else data.draw(st.integers(1, tw))
        step = pol.plan_step(n + 1, n, kind=kind)
        ctx, _ = ref.step(kind, n)
        expect = [x["seq"] for x in ctx]
        visible = np.flatnonzero(step.cache_valid)
        assert sorted(pol.slot_seq[visible].tolist()) == expect
        order = visible[np.argsort(pol.slot_seq[visible])]
        assert step.cache_positions[order].tolist() == list(range(len(expect)))   # no gaps, from 0
        assert step.positions.tolist() == list(range(len(expect), len(expect) + n + 1))
        assert not step.cache_valid[step.write_slots[:n]].any()
        assert len(set(step.write_slots[:n].tolist())) == n and (step.write_slots[:n] >= 0).all()
        pol.commit(step)
        assert pol.slots_in_use <= pol.capacity


def test_streaming_vlm_keeps_answers_and_drops_old_questions():
    """A question's prompt is gone once its round is over; its answer stays (StreamingVLM's
    "previous text"), and the system prompt stays in the sink."""
    pol = StreamingVLMCache(4, 64, 2, 2)
    seq_of = {}

    def run(kind, n, tag):
        step = pol.plan_step(n, n, kind=kind)
        pol.commit(step)
        seq_of[tag] = set(range(pol.tokens_seen - n, pol.tokens_seen))

    run("prefix", 3, "system")
    run("frame", 2, "f0")
    run("question", 5, "q1")
    for i in range(3):
        run("decode", 1, f"a1.{i}")
    live = lambda: set(pol.slot_seq[pol.slot_seq >= 0].tolist())  # noqa: E731
    assert seq_of["q1"] <= live()                    # the current round is kept verbatim
    run("resume", 4, "r1")
    run("frame", 2, "f1")
    run("video_end", 1, "ve2")
    run("question", 5, "q2")
    kept = live()
    assert not seq_of["q1"] & kept                   # the aged round's question is gone
    assert seq_of["system"] | seq_of["a1.0"] | seq_of["a1.1"] | seq_of["a1.2"] <= kept
    assert seq_of["r1"] | seq_of["ve2"] | seq_of["q2"] <= kept
    assert set(np.flatnonzero(pol.slot_seq[:4] >= 0).tolist()) == {0, 1, 2, 3}   # sink: system + first answer token


# ----------------------------------------------------------------------------- ReKV
def reference_rekv(model, trace, n_init, n_local, topk, bt):
    """ReKV over lists: returns (logits of every non-retrieval chunk, per-question dicts with
    the retrieved block ids, their scores and the mean queries per layer)."""
    dec = BruteDecoder(model)
    L = model.cfg.text.num_hidden_layers
    rep = model.cfg.text.num_attention_heads // model.cfg.text.num_key_value_heads
    init, local, blocks, pending = [], [], [], []
    qtoks: list[Tok] = []
    sel: list[list[int]] = []
    out, questions, seq = [], [], 0
    scored = False
    i = 0
    while i < len(trace):
        t = trace[i]
        kind, n = t["kind"], t["n_valid"]
        emb = t["inputs_embeds"][0, :n]
        if kind in ("prefix", "frame", "resume"):
            qtoks, scored = [], False
            n_i = min(n_init - len(init), n) if kind == "prefix" else 0
            n_l = 0 if kind == "resume" else n - n_i
            loc = local[len(local) - (n_local - n_l):] if len(local) + n_l > n_local else local
            ctx = init + loc
            m = len(ctx)
            logits, ks, vs, _ = dec.run(emb, np.arange(m, m + n), _contiguous(ctx))
            out.append(logits)
            if kind != "resume":
                new = dec.tokens(ks, vs, kind, seq, np.zeros(n))
                seq += n
                init += new[:n_i]
                local = (local + new[n_i:])[-n_local:]
                if kind == "frame":
                    pending += new[n_i:]
                    while len(pending) >= bt:
                        blocks.append(pending[:bt])
                        pending = pending[bt:]
            i += 1
            continue
        if kind == "retrieval":
            # one forward of the question text; every layer retrieves from its own query
            run = next((j for j in range(i, len(trace)) if trace[j]["kind"] != "retrieval"), len(trace)) - i
            n_pass = run // L                                  # chunks of the question text
            text = np.concatenate([x["inputs_embeds"][0, : x["n_valid"]] for x in trace[i:i + n_pass]])
            rec = {"retrieved": [], "scores": [], "query_means": []}

            def ctx_fn(layer, q):
                qbar = q.mean(dim=1)                                          # [H, Dh], pre-RoPE
                keys = torch.stack([torch.stack([x.k[layer] for x in blk], 1).mean(1)
                                    .repeat_interleave(rep, 0).reshape(-1) for blk in blocks])
                scores = keys.float() @ qbar.reshape(-1).float()             # fp32, unnormalised
                ids = sorted(torch.topk(scores, min(topk, len(blocks))).indices.tolist())
                rec["retrieved"].append(ids)
                rec["scores"].append(scores[ids].numpy())
                rec["query_means"].append(qbar.numpy())
                toks = init + [x for b in ids for x in blocks[b]]
                return toks, np.arange(len(toks))

            dec.run(text, np.arange(0, len(text)) + len(init) + min(topk, len(blocks)) * bt, ctx_fn)
            questions.append(rec)
            sel, scored = rec["retrieved"], True
            i += n_pass * L
            continue
        # video end / question prompt / decode: [init | retrieved (per layer) | question so far]
        assert kind in ("video_end", "question", "decode"), kind
        if not qtoks and not scored:
            assert len(blocks) <= topk                                # all blocks, no scoring
            sel = [list(range(len(blocks)))] * L
        scored = True
        per_layer = [init + [x for b in sel[layer] for x in blocks[b]] + qtoks for layer in range(L)]
        m = len(per_layer[0])
        logits, ks, vs, _ = dec.run(emb, np.arange(m, m + n),
                                    lambda layer, q: (per_layer[layer], np.arange(m)))
        out.append(logits)
        qtoks = qtoks + dec.tokens(ks, vs, kind, -1, np.arange(m, m + n))
        i += 1
    return out, questions, len(blocks)


def test_rekv_matches_brute_force_with_offload_spill_and_per_layer_retrieval(tmp_path):
    b = torch_bundle(tmp_path, name="rekv", chunk=8,
                     cache="{op: rekv, init_tokens: 80, local_tokens: 40, topk: 3, "
                           "question_tokens: 64, store_blocks: 2}")
    snaps: list[dict] = []
    s = _stream(b, snap=snaps, video_end=True)
    p = s.policy
    L = p.num_layers
    assert p.store.disk_blocks > 5 and p.store.ram_blocks == 2             # offloaded and spilled
    # L retrieval passes per question: "What happens?" is 2 chunks of <= 8 tokens, "And now?" 1
    kinds = [t["kind"] for t in s.trace]
    assert kinds.count("retrieval") == L * (2 + 1)
    # the video-end token opens each question turn, after the retrieval passes
    ve = [i for i, k in enumerate(kinds) if k == "video_end"]
    assert len(ve) == 2 and all(kinds[i - 1] == "retrieval" and kinds[i + 1] == "question" for i in ve)
    ref_logits, ref_q, n_blocks = reference_rekv(_load(b), s.trace, 80, 40, 3, 16)
    assert n_blocks == p.n_blocks == 14
    _check_logits(s.trace, ref_logits)
    assert len(ref_q) == len(snaps) == 2
    for got, want in zip(snaps, ref_q):
        for layer in range(L):
            ids = got["retrieved"][layer]
            assert ids.tolist() == want["retrieved"][layer]
            assert len(ids) == min(3, got["n_blocks"]) and np.all(np.diff(ids) > 0)  # time order
            np.testing.assert_allclose(got["query_means"][layer], want["query_means"][layer],
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["scores"][layer], want["scores"][layer], rtol=1e-5, atol=1e-5)


def test_rekv_block_scores_are_unnormalised_fp32_dot_products():
    """Planner level: blocks made of known keys; scores == dot(mean K expanded, q)."""
    L, hkv, h, dh, bt = 2, 2, 4, 8, 3
    pol = RekvCache(init_tokens=2, local_tokens=7, topk=2, block_tokens=bt, question_tokens=8,
                    store_blocks=1, num_layers=L, num_kv_heads=hkv, head_dim=dh, num_heads=h)
    kv = KVBuffer([L, 2, 1, hkv, pol.capacity, dh])
    pol.attach(kv)
    rng = np.random.default_rng(0)
    written = []
    for kind, n in [("prefix", 2)] + [("frame", bt)] * 6:
        step = pol.plan_step(n, n, kind=kind)
        new = rng.standard_normal((L, 2, 1, hkv, n, dh)).astype(np.float32) * 3
        kv.write(new, step.write_slots)
        pol.commit(step)
        if kind == "frame":
            written.append(new[:, 0, 0])                                   # [L, Hkv, bt, Dh]
    assert pol.n_blocks == 6 and pol.store.n_blocks == 4 and pol.store.disk_blocks == 3
    q = rng.standard_normal((h, dh)).astype(np.float32)
    for layer in range(L):
        want = np.array([np.dot(np.repeat(w[layer].mean(axis=1), h // hkv, axis=0).reshape(-1), q.reshape(-1))
                         for w in written], dtype=np.float32)
        np.testing.assert_allclose(pol.block_scores(layer, q), want, rtol=1e-6, atol=1e-6)
        assert not np.allclose(want / np.linalg.norm(q), want)             # really unnormalised
        ids, sc = pol.top_blocks(layer, q, 2)
        assert ids.tolist() == sorted(np.argsort(-want)[:2].tolist())
        np.testing.assert_allclose(sc, want[ids], rtol=1e-6, atol=1e-6)
        # payloads read back (disk, RAM, local) are what was written
        for blk, w in enumerate(written):
            np.testing.assert_array_equal(pol._block_layer(blk, layer)[0], w[layer])


def test_rekv_with_all_blocks_retrieved_equals_full_attention(tmp_path):
    full = torch_bundle(tmp_path, name="full", chunk=16, cache="{op: full, capacity_tokens: 1024}")
    rk = torch_bundle(tmp_path, name="rk", chunk=16,
                      cache="{op: rekv, init_tokens: 96, local_tokens: 512, topk: 16, "
                            "question_tokens: 64}")
    a = Session.open(full, "torch", overload="none", trace=True)
    r = Session.open(rk, "torch", overload="none", trace=True)
    for s in (a, r):
        for f in frames(9):
            s.push_frame(f)
        "".join(s.ask("What is in the frames?"))
    assert r.policy.n_blocks == 9 and all(x.tolist() == list(range(9)) for x in r.policy.retrieved)
    assert [t["kind"] for t in a.trace] == [t["kind"] for t in r.trace]    # no retrieval pass needed
    # up to the end of the answer (after it, rekv drops the question turn and full keeps it)
    end = [t["kind"] for t in a.trace].index("resume")
    assert sum(t["kind"] == "decode" for t in a.trace[:end]) >= 3
    for i, (x, y) in enumerate(zip(a.trace[:end], r.trace[:end])):
        err = np.abs(x["logits"] - y["logits"]).max()
        assert err < 1e-4, f"step {i} ({x['kind']}): {err:.3g}"


# ----------------------------------------------------------------------------- carrier
def reference_carrier(model, trace, limit):
    """VideoScan over lists: returns chunk logits, the carriers (Tok) kept, and their embeddings."""
    dec = BruteDecoder(model)
    sink, carriers, embs, qtoks = [], [], [], []
    out = []
    for t in trace:
        kind, n = t["kind"], t["n_valid"]
        emb = t["inputs_embeds"][0, :n]
        if kind == "frame":
            frame = torch.from_numpy(emb[: n - 1]).float()
            carrier = frame.mean(0)                                            # carrier = frame mean
            np.testing.assert_allclose(emb[n - 1], carrier.numpy(), rtol=1e-5, atol=1e-6)
            x = torch.cat([frame, carrier[None]]).numpy()
            ctx = sink + carriers
            m = len(ctx)                                                     # cache length
            logits, ks, vs, _ = dec.run(x, np.arange(m, m + n),
                                        lambda layer, q: (ctx, [c.pos for c in ctx]))
            carriers.append(dec.tokens(ks, vs, "carrier", 0, np.arange(m, m + n))[-1])
            embs.append(carrier)
            if len(carriers) == limit:
                e = torch.stack(embs)
                drop = int(torch.cosine_similarity(e[:-1], e[1:], dim=1).argmax())
                del carriers[drop], embs[drop]
            qtoks = []
        else:
            turn = kind in ("video_end", "question", "decode")                # the question turn
            ctx = sink + carriers + (qtoks if turn else [])
            m = len(ctx)
            logits, ks, vs, _ = dec.run(emb, np.arange(m, m + n),
                                        lambda layer, q: (ctx, [c.pos for c in ctx]))
            new = dec.tokens(ks, vs, kind, 0, np.arange(m, m + n))
            if kind == "prefix":
                sink += new
            elif turn:
                qtoks += new
            else:
                qtoks = []
        out.append(logits)
    return out, carriers


def test_carrier_matches_brute_force_videoscan(tmp_path):
    b = torch_bundle(tmp_path, name="car", chunk=16,
                     cache="{op: carrier, sink_tokens: 80, carriers: 5, question_tokens: 64}")
    s = _stream(b, video_end=True)
    p = s.policy
    assert p.dropped == 14 - 4                                # memory full after the 5th frame
    assert [t["kind"] for t in s.trace].count("video_end") == 2
    ref, carriers = reference_carrier(_load(b), s.trace, 5)
    _check_logits(s.trace, ref)
    live = np.flatnonzero(p.slot_seq[p.c0:p.q0] >= 0)
    live = live[np.argsort(p.slot_seq[p.c0:p.q0][live])]
    assert p.slot_pos[p.c0 + live].tolist() == [c.pos for c in carriers]     # insertion positions
    assert s.trace[-1]["inputs_embeds"].shape[1] == 17                      # K + carrier


def test_video_end_opens_the_question_turn_in_rekv_and_carrier():
    """Planner level, both policies: the video-end token goes to the question region, is
    visible to the question prompt and every answer token, never enters the stream regions,
    and is gone after ``resume`` (rekv here with all blocks retrieved: no scoring pass)."""
    rekv = RekvCache(init_tokens=4, local_tokens=8, topk=4, block_tokens=2, question_tokens=8,
                     store_blocks=2, num_layers=1, num_kv_heads=1, head_dim=2, num_heads=1)
    car = CarrierCache(4, 3, 8, 2)
    for pol in (rekv, car):
        pol.attach(KVBuffer([1, 2, 1, 1, pol.capacity, 2]))
        tokens = np.ones((1, 2, 2), np.float32)

        def step(kind, n):
            if kind == "frame" and pol is car:
                pol.prepare_frame(tokens, 2, None)
                n += 1
            plan = pol.plan_step(n, n, kind=kind)
            pol.commit(plan, {"query_mean": np.zeros((1, 1, 1, 2), np.float32)})
            return plan

        step("prefix", 3)
        for _ in range(3):
            step("frame", 2)
        stream_before = pol.slot_seq[: pol.q0].copy()
        pol.prepare_question(lambda: step("retrieval", 2))
        ve = step("video_end", 1)
        slot = int(ve.write_slots[0])
        assert pol.q0 <= slot < pol.capacity                         # the question region
        assert np.array_equal(pol.slot_seq[: pol.q0], stream_before)   # nothing streamed
        for kind, n in [("question", 3), ("decode", 1), ("decode", 1)]:
            plan = step(kind, n)
            assert plan.cache_valid[slot]
            if kind == "question":               # the question follows it directly
                assert plan.cache_positions[slot] == plan.positions[0] - 1
        after = step("resume", 2)
        assert not after.cache_valid[pol.q0:].any()
        assert np.array_equal(pol.slot_seq[: pol.q0], stream_before)


# ----------------------------------------------------------------------------- hour-long runs
K, L, HKV, DH, H, C = 16, 2, 2, 16, 4, 64


def _policies(tmp_path):
    return {
        "full": FullCache(40_000),
        "sink_window": SinkWindowCache(4, 512),
        "streaming_vlm": StreamingVLMCache(128, 256, 32, K),
        "rekv": RekvCache(init_tokens=80, local_tokens=512, topk=8, block_tokens=K, question_tokens=64,
                          store_blocks=128, num_layers=L, num_kv_heads=HKV, head_dim=DH, num_heads=H,
                          store_dir=tmp_path / "rekv-store"),
        "carrier": CarrierCache(80, 64, 64, C),
    }


def _run_hour(pol, rng, n_frames=7200, question_every=1200, marks=(3600, 7200)):
    """Prefix, then n_frames frames of K tokens (and a question every ``question_every``
    frames) through the planner and a KVBuffer with random new_kv. Returns what was seen."""
    kv = KVBuffer([L, 2, 1, HKV, pol.capacity, DH])
    pol.attach(kv)
    addr, data = kv.address, kv.data
    seen = {"mem": {}, "frames": 0, "gapless": True}
    new_kv = rng.standard_normal((L, 2, 1, HKV, 80, DH)).astype(np.float32)
    qmean = {"query_mean": rng.standard_normal((L, 1, H, DH)).astype(np.float32)}

    def step(n, kind, chunk=None):
        t = chunk if chunk is not None else n
        plan = pol.plan_step(t, n, kind=kind)
        if pol.name != "carrier":                       # carrier keeps insertion positions
            got = np.sort(plan.cache_positions[plan.cache_valid])
            seen["gapless"] &= bool(np.array_equal(got, np.arange(len(got))))
        kv.write(new_kv[:, :, :, :, :t], plan.write_slots)
        pol.commit(plan, qmean)

    step(74, "prefix", 74)
    try:
        for f in range(1, n_frames + 1):
            if f == marks[0] - 600:                  # steady state: trace from here on
                tracemalloc.start()
            tokens = rng.standard_normal((1, K, C)).astype(np.float32)
            chunk, n, _ = pol.prepare_frame(tokens, K, None)
            step(n, "frame", chunk.shape[1])
            seen["frames"] = f
            if f % question_every == 0:
                pol.prepare_question(lambda: step(13, "retrieval"))
                step(28, "question")
                for _ in range(6):
                    step(1, "decode")
                step(10, "resume")
            if f in marks:
                seen["mem"][f] = tracemalloc.get_traced_memory()[0]
    except CapacityError as e:
        seen["error"] = str(e)
    finally:
        tracemalloc.stop()
    assert kv.data is data and kv.address == addr == kv.data.ctypes.data   # never reallocated
    assert pol.slots_in_use <= pol.capacity
    return seen


def test_hour_of_frames_every_policy_bounded_full_stops(tmp_path):
    rng = np.random.default_rng(0)
    pols = _policies(tmp_path)
    for name, pol in pols.items():
        seen = _run_hour(pol, rng)
        assert seen["gapless"], name
        if name == "full":
            # 40,000 slots: prefix 74 + two questions (28 + 6 + 10 tokens each) + frames of 16
            assert seen["frames"] == (40_000 - 74 - 2 * 44) // K and "KV cache full" in seen["error"]
            continue
        assert seen["frames"] == 7200 and "error" not in seen, (name, seen.get("error"))
        growth = seen["mem"][7200] - seen["mem"][3600]
        assert growth < 16 * 1024, f"{name}: traced memory grew {growth} bytes over 3600 frames"
    rk = pols["rekv"]
    assert rk.n_blocks == 7200 and rk.store.ram_blocks == 128 and rk.store.disk_blocks == 7200 - 128 - 32
    assert (tmp_path / "rekv-store" / "blocks.bin").stat().st_size == rk.store.disk_blocks * rk.store.block_bytes
    assert rk.retrieval_passes == 6 * L
    car = pols["carrier"]
    assert car.dropped == 7200 - 63 and car.slots_in_use == 74 + 63         # prompt + memory - 1


# ----------------------------------------------------------------------------- plan, ops, engine
def test_plan_regions_match_policies_and_inspect(tmp_path, capsys):
    from streamgraph.cli import main

    cases = {
        "streaming_vlm": ("{op: streaming_vlm, sink_tokens: 64, text_window_tokens: 64, "
                          "vision_window_seconds: 4}", ["sink", "text_window", "vision_window"]),
        "rekv": ("{op: rekv, init_tokens: 80, local_tokens: 256, topk: 4, store_mb: 1}",
                 ["init", "local", "retrieved", "question"]),
        "carrier": ("{op: carrier, sink_tokens: 80, carriers: 32}", ["sink", "carriers", "question"]),
    }
    for name, (cache, names) in cases.items():
        g = check_graph(write_graph(tmp_path, name=name, cache=cache))
        plan = g.plan
        regs = plan.cache["regions"]
        assert [r["name"] for r in regs] == names
        slot_bytes = plan.kv.bytes // plan.kv.shape[4]
        assert sum(r["slots"] for r in regs) == plan.kv.shape[4] == plan.cache["capacity"]
        assert all(r["bytes"] == r["slots"] * slot_bytes for r in regs)
        from streamgraph.kv import make_policy
        pol = make_policy(plan.cache["op"], plan.cache["params"], plan)
        assert {n: list(v) for n, v in pol.regions().items()} == {r["name"]: [r["start"], r["slots"]] for r in regs}
        assert main(["inspect", str(tmp_path / f"{name}.yaml")]) == 0
        out = capsys.readouterr().out
        assert all(n in out for n in names) and f"KV buffer regions ({name})" in out
    svlm = check_graph(write_graph(tmp_path, name="streaming_vlm", cache=cases["streaming_vlm"][0])).plan
    assert svlm.cache["regions"][2]["slots"] == 4 * 2 * 16                   # 4 s x 2 fps x K
    rk = check_graph(write_graph(tmp_path, name="rekv", cache=cases["rekv"][0])).plan
    per_block = rk.cache["block_bytes"] + rk.cache["key_bytes"]
    assert rk.cache["store_blocks"] == (1 << 20) // per_block
    assert rk.memory.host_bytes == rk.cache["store_blocks"] * per_block
    assert ("host cache store (not in total)", rk.memory.host_bytes) in rk.memory.table()
    car = check_graph(write_graph(tmp_path, name="car", k=64, chunk=32,
                                  cache=cases["carrier"][0])).plan
    assert car.chunk_max == 65 and car.engines["decoder_step"].dims["T"] == [1, 65]
    # a window in seconds needs the stream's fps
    from streamgraph.compiler.ops import CacheContext, ShapeError
    from streamgraph.compiler.plan import cache_layout
    with pytest.raises(ShapeError, match="needs the stream's fps > 0"):
        cache_layout("streaming_vlm", {"vision_window_seconds": 4.0}, CacheContext(16, 0.0, 32, 6), svlm_cfg(tmp_path))


def svlm_cfg(tmp_path):
    return check_graph(write_graph(tmp_path, name="cfg")).cfg


@pytest.mark.parametrize("cache,field,fragment", [
    ("{op: streaming_vlm, vision_window_frames: 2, vision_window_seconds: 1}", "nodes.cache",
     "at most one of 'vision_window_frames' or 'vision_window_seconds'"),
    ("{op: streaming_vlm, text_window_tokens: 16}", "nodes.cache.text_window_tokens",
     "must be >= the decoder's prefill_chunk_tokens 32"),
    ("{op: rekv, local_tokens: 40}", "nodes.cache.local_tokens", "must be >= 48"),
    ("{op: rekv, store_blocks: 4, store_mb: 1}", "nodes.cache", "at most one of 'store_blocks' or 'store_mb'"),
    ("{op: carrier, question_tokens: 6}", "nodes.cache.question_tokens", "max_new_tokens 6"),
    ("{op: carrier, carriers: 1}", "nodes.cache.carriers", "must be >= 2"),
])
def test_cache_op_errors_are_located(tmp_path, cache, field, fragment):
    from streamgraph.errors import SpecError

    with pytest.raises(SpecError) as e:
        check_graph(write_graph(tmp_path, cache=cache))
    assert e.value.field == field and fragment in str(e.value) and e.value.line is not None


def test_query_mean_engine_output_ort_matches_torch(onnx_bundle):
    from streamgraph.backends.onnxruntime import OnnxRuntimeBackend
    from streamgraph.backends.torch import TorchBackend
    from streamgraph.compiler.bundle import Bundle

    bundle = Bundle.load(onnx_bundle)
    spec = bundle.plan.engines["decoder_step"]
    rng = np.random.default_rng(3)
    s = spec.inputs[3].shape[4]
    feeds = {"inputs_embeds": rng.standard_normal((1, 5, 64)).astype(np.float32),
             "positions": np.arange(40, 45)[None], "token_valid": np.array([[1, 1, 1, 0, 0]], bool),
             "kv_cache": rng.standard_normal(spec.inputs[3].shape).astype(np.float32),
             "cache_positions": np.arange(s)[None], "cache_valid": rng.random((1, s)) < 0.3}
    feeds.update(window_valid=feeds["cache_valid"], streaming_heads=np.zeros(np.array(spec.inputs[3].shape)[[0, 3]], bool))
    a = OnnxRuntimeBackend(bundle).run("decoder_step", feeds)
    b = TorchBackend(bundle).run("decoder_step", feeds)
    assert a["query_mean"].shape == tuple(spec.outputs[3].shape)
    np.testing.assert_allclose(a["query_mean"], b["query_mean"], atol=1e-4, rtol=0)
    # it is the mean over the 3 valid tokens of layer 0's pre-RoPE query projection
    model = TorchBackend(bundle).modules["decoder_step"].model
    layer0 = model.layers[0]
    with torch.no_grad():
        x = layer0.input_layernorm(torch.from_numpy(feeds["inputs_embeds"][0, :3]))
        q = layer0.self_attn.q_proj(x).view(3, 4, 16).mean(0).numpy()
    np.testing.assert_allclose(b["query_mean"][0, 0], q, atol=1e-5, rtol=0)


def test_block_store_spills_oldest_and_reads_back(tmp_path):
    st_ = BlockStore(2, (2, 1, 3, 4), (1, 4), cap_blocks=3, directory=tmp_path / "s")
    rng = np.random.default_rng(1)
    blocks = [(rng.standard_normal((2, 2, 1, 3, 4)).astype(np.float32),
               rng.standard_normal((2, 1, 4)).astype(np.float32)) for _ in range(11)]
    for i, (p, k) in enumerate(blocks):
        assert st_.append(p, k) == i
    assert (st_.ram_blocks, st_.disk_blocks) == (3, 8)
    assert st_.ram_bytes == 3 * (st_.block_bytes + st_.key_bytes)
    assert (tmp_path / "s" / "blocks.bin").stat().st_size == 8 * st_.block_bytes
    for i, (p, k) in enumerate(blocks):
        for layer in range(2):
            np.testing.assert_array_equal(st_.read_layer(i, layer), p[layer])
    for layer in range(2):
        got = np.concatenate(list(st_.layer_keys(layer, chunk_blocks=3)))
        np.testing.assert_array_equal(got, np.stack([k[layer] for _, k in blocks]))
    with pytest.raises(IndexError):
        st_.read_layer(11, 0)
    st_.close()
