"""Token reduction in the compiled pipeline: budget buckets (spec, plan, engines, Session
budget switching), DTD's first frame and text kept whole, STC-Cacher refresh/reuse/skip in the
runtime, and every reducer op exported with the dynamo exporter matching torch under ORT."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamgraph.compiler.bundle import Bundle
from streamgraph.compiler.compile import check_graph, compile_graph
from streamgraph.compiler.lower import export_engine
from streamgraph.compiler.plan import EnginePlan
from streamgraph.compiler.spec import parse_spec
from streamgraph.errors import GraphError, SpecError
from streamgraph.reducers import build_reducer
from streamgraph.runtime.session import Session
from tests.conftest import frames, graph_text, write_graph

N = 64  # tiny preset at 64x64: 8x8 patches

RED_GRAPH = """\
version: 1
name: {name}
model: {{preset: tiny, seed: 0}}
stream: {{fps: 2, frame_size: [64, 64]}}
nodes:
  encoder: {encoder}
  pruner:  {reducer}
  cache:   {{op: sink_window, sink_tokens: 4, window_tokens: 256}}
  llm:     {{op: decoder, input: [pruner, query], cache: cache, max_new_tokens: 4, prefill_chunk_tokens: 32}}
slo: {{frame_deadline_ms: 250, ttft_ms: 500, overload: none}}
budget: {{memory_mb: 512}}
"""


def red_graph(tmp_path, name, encoder="{op: vision_encoder}",
              reducer="{op: topk_saliency, input: encoder, tokens_per_frame: 16}"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(RED_GRAPH.format(name=name, encoder=encoder, reducer=reducer))
    return p


@pytest.fixture(scope="module")
def dtd_cacher_bundle(tmp_path_factory):
    """stc_cacher encoder (reuse every other frame) -> dtd with buckets [8, 16], ONNX engines."""
    d = tmp_path_factory.mktemp("red")
    g = red_graph(d, "dtd-cacher", "{op: stc_cacher, update_ratio: 0.25, refresh_every: 2}",
                  "{op: dtd, input: encoder, tokens_per_frame: [16, 8], threshold: 0.999}")
    return compile_graph(g, d / "b").bundle.path


# --------------------------------------------------------------------------- spec and plan

def test_budget_spec_int_list_and_errors():
    base = graph_text()
    assert parse_spec(base).nodes["pruner"].tokens_per_frame == 16          # an int still works
    spec = parse_spec(base.replace("tokens_per_frame: 16", "tokens_per_frame: [32, 8, 16]"))
    assert spec.nodes["pruner"].tokens_per_frame == [8, 16, 32]             # stored ascending
    for bad, msg in [("[8, 8]", "must be distinct"), ("[]", "at least one"), ("[8, 0]", "item 1: must be >= 1"),
                     ("[8, 2.5]", "item 1: expected an integer"), ("0", "must be >= 1, got 0")]:
        with pytest.raises(SpecError, match=msg) as e:
            parse_spec(base.replace("tokens_per_frame: 16", f"tokens_per_frame: {bad}"), "g.yaml")
        assert e.value.field == "nodes.pruner.tokens_per_frame"


def test_plan_has_an_engine_per_bucket_and_chunk_covers_largest(tmp_path):
    g = check_graph(write_graph(tmp_path, k=16))
    assert g.plan.budgets == [16] and "reducer_k16" in g.plan.engines
    p = tmp_path / "b.yaml"
    p.write_text(graph_text(name="b", chunk=8).replace("tokens_per_frame: 16", "tokens_per_frame: [24, 4, 12]"))
    plan = check_graph(p).plan
    assert plan.budgets == [4, 12, 24] and plan.tokens_per_frame == 24
    assert {f"reducer_k{k}" for k in (4, 12, 24)} <= set(plan.engines) and "reducer" not in plan.engines
    for k in plan.budgets:
        outs = {s.name: s.shape for s in plan.engines[f"reducer_k{k}"].outputs}
        assert outs == {"tokens": [1, k, 64], "keep_mask": [1, k], "source_index": [1, k]}
    assert plan.chunk_max == 24                                             # > prefill_chunk_tokens 8
    assert plan.engines["decoder_step"].dims["T"] == [1, 24]


def test_dtd_first_frame_whole_sizes_the_plan_and_cache_checks(tmp_path):
    g = check_graph(red_graph(tmp_path, "d", reducer="{op: dtd, input: encoder, tokens_per_frame: [8, 16]}"))
    plan = g.plan
    assert plan.chunk_max == N and g.pipeline.max_frame_tokens == N and plan.tokens_per_frame == 16
    assert plan.reducer["first_frame_full"] and plan.reducer["state"] == ["state_prev_tokens"]
    assert plan.reducer["params"]["positions"] == "keep"                    # reference: positions kept
    small = red_graph(tmp_path, "d2", reducer="{op: dtd, input: encoder, tokens_per_frame: 16}")
    small.write_text(small.read_text().replace("window_tokens: 256", "window_tokens: 62"))
    with pytest.raises(GraphError, match=r"window_tokens 62 must be >= 64 = max\(visual tokens per frame 64"):
        check_graph(small)


def test_new_op_params_are_validated(tmp_path):
    bad = [("{op: dtd, input: encoder, tokens_per_frame: 8, threshold: 1.5}", "must be <= 1"),
           ("{op: dtd, input: encoder, tokens_per_frame: 8, mode: relative, threshold: -0.2}", "relative mode"),
           ("{op: stc_pruner, input: encoder, tokens_per_frame: 8, scoring: l2}", "expected one of"),
           ("{op: tome, input: encoder, tokens_per_frame: 80}", "token budget 80 exceeds the 64")]
    for i, (reducer, msg) in enumerate(bad):
        with pytest.raises((SpecError, GraphError), match=msg):
            check_graph(red_graph(tmp_path, f"x{i}", reducer=reducer))
    with pytest.raises(SpecError, match="update_ratio: must be > 0"):
        check_graph(red_graph(tmp_path, "c", encoder="{op: stc_cacher, update_ratio: 0}"))


# --------------------------------------------------------------------------- runtime (ORT vs torch)

def test_dtd_cacher_session_ort_matches_torch_with_budget_switching(dtd_cacher_bundle):
    plan = Bundle.load(dtd_cacher_bundle).plan
    assert {"vision_encoder_reuse", "reducer_k8", "reducer_k16"} <= set(plan.engines)
    assert [s.name for s in plan.engines["vision_encoder"].outputs] == ["visual_tokens", "encoder_refs"]
    fl = frames(9)
    ort = Session.open(dtd_cacher_bundle, "onnxruntime", trace=True)
    ref = Session.open(dtd_cacher_bundle, "torch", trace=True)
    assert ort.budgets == [8, 16]
    budgets = [None, 8, 16, 8, None, 8, 16, 16, 8]
    recs = []
    for f, b in zip(fl, budgets):
        ra, rb = ort.push_frame(f, budget=b), ref.push_frame(f, budget=b)
        assert (ra.tokens_kept, ra.budget, ra.encoder) == (rb.tokens_kept, rb.budget, rb.encoder)
        recs.append(ra)
    ans = ["".join(s.ask("What moves?")) for s in (ort, ref)]
    assert ans[0] == ans[1]
    # first frame kept whole at N; then at most the requested budget, as a valid prefix
    assert (recs[0].tokens_kept, recs[0].budget) == (N, N)
    for r, b in zip(recs[1:], budgets[1:]):
        assert r.budget == (b or 16) and 0 <= r.tokens_kept <= r.budget
    assert any(0 < r.tokens_kept < r.budget for r in recs[1:]), [r.tokens_kept for r in recs]
    assert [r.encoder for r in recs] == ["refresh", "reuse"] * 4 + ["refresh"]
    assert [t["kind"] for t in ort.trace] == [t["kind"] for t in ref.trace]
    for a, b in zip(ort.trace, ref.trace):
        assert np.abs(a["logits"] - b["logits"]).max() < 1e-4, a["kind"]
        np.testing.assert_allclose(a["last_hidden"], b["last_hidden"], atol=1e-4)
    # all text is kept: every prompt token of the question is prefilled
    q = [t for t in ort.trace if t["kind"] == "question"]
    assert sum(t["n_valid"] for t in q) == ort.questions[0].prompt_tokens
    # frames are prefilled as their valid prefix only
    frame_steps = [t for t in ort.trace if t["kind"] == "frame"]
    assert [t["n_valid"] for t in frame_steps] == [r.tokens_kept for r in recs if r.tokens_kept]
    assert all(t["inputs_embeds"].shape[1] == t["n_valid"] for t in frame_steps)
    with pytest.raises(ValueError, match=r"token budget 12 is not a compiled bucket \(buckets: 8, 16\)"):
        ort.push_frame(fl[0], budget=12)


def test_cacher_and_dtd_engines_ort_match_torch(dtd_cacher_bundle):
    from streamgraph.backends.onnxruntime import OnnxRuntimeBackend
    from streamgraph.backends.torch import TorchBackend

    bundle = Bundle.load(dtd_cacher_bundle)
    ort, ref = OnnxRuntimeBackend(bundle), TorchBackend(bundle)
    rng = np.random.default_rng(3)
    px = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    px2 = px + 0.5 * rng.standard_normal(px.shape).astype(np.float32) * (rng.random((1, 1, 64, 64)) < 0.3)
    a, b = ort.run("vision_encoder", {"pixel_values": px}), ref.run("vision_encoder", {"pixel_values": px})
    for name in ("visual_tokens", "encoder_refs"):
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=0, err_msg=name)
    feeds = {"pixel_values": px2, "encoder_refs": b["encoder_refs"]}
    reuse_ort = ort.run("vision_encoder_reuse", feeds)["visual_tokens"]
    reuse_ref = ref.run("vision_encoder_reuse", feeds)["visual_tokens"]
    np.testing.assert_allclose(reuse_ort, reuse_ref, atol=1e-5, rtol=0)
    dense = ref.run("vision_encoder", {"pixel_values": px2})["visual_tokens"]
    assert np.abs(reuse_ref - dense).max() > 1e-4          # reuse really skipped work


def _torch_session(tmp_path, name, **kw):
    b = compile_graph(red_graph(tmp_path, name, **kw), tmp_path / name, target="torch").bundle.path
    return Session.open(b, "torch", trace=True)


def test_cacher_refreshing_every_frame_equals_plain_encoder_exactly(tmp_path):
    plain = _torch_session(tmp_path, "plain")
    cacher = _torch_session(tmp_path, "cacher", encoder="{op: stc_cacher, refresh_every: 1, update_ratio: 0.25}")
    for f in frames(4):
        assert plain.push_frame(f).encoder == "full"
        assert cacher.push_frame(f).encoder == "refresh"
    for a, b in zip(plain.trace, cacher.trace):
        assert np.array_equal(a["logits"], b["logits"]) and np.array_equal(a["inputs_embeds"], b["inputs_embeds"])


def test_cacher_refresh_schedule_and_frame_skip(tmp_path):
    s = _torch_session(tmp_path, "sched", encoder="{op: stc_cacher, refresh_every: 3}")
    assert [s.push_frame(f).encoder for f in frames(7)] == ["refresh", "reuse", "reuse"] * 2 + ["refresh"]
    s = _torch_session(tmp_path, "skip", encoder="{op: stc_cacher, refresh_every: 2, skip_threshold: 0.02}")
    fl = frames(3)
    still = type(fl[0])(image=fl[0].image.copy(), timestamp=0.5, index=1, source_index=1)
    noisy = fl[0].image.astype(np.int16) + np.random.default_rng(0).integers(-3, 4, fl[0].image.shape)
    almost = type(fl[0])(image=np.clip(noisy, 0, 255).astype(np.uint8), timestamp=1.0, index=2, source_index=2)
    moved = type(fl[0])(image=255 - fl[0].image, timestamp=1.5, index=3, source_index=3)
    modes = [s.push_frame(f).encoder for f in (fl[0], still, almost, moved)]
    assert modes == ["refresh", "skip", "skip", "reuse"], modes
    assert s.encoder_stage.last_change > 0.02
    embeds = [t["inputs_embeds"] for t in s.trace if t["kind"] == "frame"]
    assert np.array_equal(embeds[0], embeds[1]) and np.array_equal(embeds[0], embeds[2])


# --------------------------------------------------------------------------- export per op

@pytest.mark.parametrize("op,params,k", [
    ("dtd", {"threshold": 0.5, "mode": "relative"}, 12),
    ("dtd", {"threshold": 0.8, "mode": "absolute"}, 20),
    ("stc_pruner", {"scoring": "gaussian", "channel_keep_ratio": 0.5}, 10),
    ("stc_pruner", {"scoring": "dual_anchor", "alpha": 0.3}, 10),
    ("tome", {}, 9),
    ("topk_saliency", {}, 16),
])
def test_op_exports_with_dynamo_and_ort_matches_torch(tmp_path, op, params, k):
    import onnxruntime as ort

    n, c = 48, 24
    module = build_reducer(op, {**params, "tokens_per_frame": k})
    ins, outs = module.io(1, n, c)
    engine = EnginePlan(f"reducer_k{k}", f"engines/{op}_k{k}.onnx", ins, outs)
    path = export_engine(module, engine, tmp_path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [s.name for s in ins]
    assert [o.name for o in sess.get_outputs()] == [s.name for s in outs]
    rng = np.random.default_rng(7)
    # state at stream start (zeros), except DTD's previous frame: its first frame is sent
    # whole by the runtime, so the engine always compares with a real frame
    state = {s.name: (rng.standard_normal(s.shape) if s.name == "state_prev_tokens" else np.zeros(s.shape))
             .astype(np.float32) for s in ins[1:]}
    prev = None
    for step in range(4):  # a short stream: state threads through both runtimes
        x = rng.standard_normal((1, n, c)).astype(np.float32) if prev is None else prev.copy()
        if prev is not None:
            moved = rng.random(n) < 0.4
            x[0, moved] += rng.standard_normal((int(moved.sum()), c)).astype(np.float32)
        prev = x
        feeds = {"visual_tokens": x, **state}
        got = dict(zip([o.name for o in outs], sess.run(None, feeds)))
        with torch.no_grad():
            want = module(*[torch.from_numpy(feeds[s.name]) for s in ins])
        want = dict(zip([o.name for o in outs], (w.numpy() for w in want)))
        np.testing.assert_array_equal(got["keep_mask"], want["keep_mask"])
        nv = int(want["keep_mask"].sum())
        for name in ("tokens", "source_index") + tuple(n for n, _ in module.extra_outputs):
            # masked rows are don't-care (ties among dropped tokens may be ordered differently)
            got[name], want[name] = got[name][:, :nv], want[name][:, :nv]
        for name in want:
            if want[name].dtype.kind == "f":
                np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5, err_msg=f"{op} {name} step {step}")
            else:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{op} {name} step {step}")
        state = {s.name: got[f"next_{s.name}"] for s in ins[1:]}


# --------------------------------------------------------------------------- positions: keep

def _dtd_kept_reference(visual: list[np.ndarray], threshold: float, budgets: list[int]) -> list[list[int]]:
    """TimeChat-Online's feature-method DTD (techniques.md §4.2), brute force in float64: the
    first frame whole; then token p is kept when cos(prev[p], cur[p]) <= τ, prev being the
    previous frame's full map; of those the ``budget`` least similar (this implementation's
    cap, docs/token-reduction.md). Returns each frame's kept token indices, ascending."""
    kept, prev = [], None
    for x, k in zip(visual, budgets):
        x = x.astype(np.float64)
        if prev is None:
            kept.append(list(range(len(x))))
        else:
            sim = [min(1.0, max(-1.0, float(prev[p] @ x[p]) / (max(np.linalg.norm(prev[p]), 1e-8)
                                                                 * max(np.linalg.norm(x[p]), 1e-8))))
                   for p in range(len(x))]
            assert all(abs(s - threshold) > 1e-6 for s in sim), "a token sits on the threshold: fragile"
            cand = sorted((p for p in range(len(x)) if sim[p] <= threshold), key=lambda p: sim[p])[:k]
            kept.append(sorted(cand))
        prev = x
    return kept


def test_dtd_positions_keep_reserves_every_frame_token_position(tmp_path):
    """docs/token-reduction.md: with `positions: keep` and the `full` cache, kept tokens keep
    their positions in the stream ("positional reservation", techniques.md §4.2 step 5): token
    j of frame f sits at base + f·N + j, whatever was dropped before it — trailing dropped
    tokens and frames that keep nothing included — and the question after F frames starts at
    base + F·N, exactly where it would without any drop."""
    g = red_graph(tmp_path, "dtdpos", reducer="{op: dtd, input: encoder, tokens_per_frame: [16, 64], "
                                              "threshold: 0.995, positions: keep}")
    g.write_text(g.read_text().replace("{op: sink_window, sink_tokens: 4, window_tokens: 256}",
                                       "{op: full, capacity_tokens: 384}"))
    s = Session.open(compile_graph(g, tmp_path / "b", target="torch").bundle.path, "torch", trace=True)
    from streamgraph.runtime.sources import Frame

    base = sum(t["n_valid"] for t in s.trace)                        # the prompt prefix
    calls, run = [], s.backend.run

    def spy(name, feeds):
        out = run(name, feeds)
        calls.append((name, {k: np.array(v) for k, v in {**feeds, **out}.items()}))
        return out

    s.backend.run = spy
    # 8x8-pixel blocks (one patch each) of a still picture repainted at random per frame; the
    # last block row only every third frame, so most frames drop their trailing tokens
    rng = np.random.default_rng(0)
    img, fl = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), []
    for i in range(9):
        img = img.copy()
        if i != 5:                                                   # frame 5 = frame 4: keeps nothing
            for b in rng.choice(56 if i % 3 else 64, 20, replace=False):
                r, c = divmod(int(b), 8)
                img[8 * r:8 * r + 8, 8 * c:8 * c + 8] = rng.integers(0, 256, (8, 8, 3))
        fl.append(Frame(image=img, timestamp=i / 2, index=i, source_index=i))
    budgets = [64 if i % 3 else 16 for i in range(len(fl))]          # bucket switching
    visual, steps = [], []
    for f, k in zip(fl, budgets):
        calls.clear()
        s.push_frame(f, budget=k)
        visual.append(next(c["visual_tokens"][0] for n, c in calls if n == "vision_encoder"))
        steps.append([c for n, c in calls if n == "decoder_step"])
    kept = _dtd_kept_reference(visual, 0.995, budgets)
    n = visual[0].shape[0]
    assert not kept[5] and not steps[5], "an unchanged frame keeps no token and runs no decoder step"
    assert any(len(kept[f]) == 16 < 20 for f in (3, 6, 9)), "the budget cap applies"
    assert sum(1 for f in range(1, len(fl)) if kept[f] and kept[f][-1] < n - 1) >= 3   # trailing drops
    for f, (want, st) in enumerate(zip(kept, steps)):
        if want:
            (c,) = st
            nv = int(c["token_valid"][0].sum())
            assert c["positions"][0, :nv].tolist() == [base + f * n + j for j in want], f"frame {f}"
    calls.clear()
    "".join(s.ask("What moved?"))
    first = next(c for name, c in calls if name == "decoder_step")
    assert int(first["positions"][0, 0]) == base + len(fl) * n
