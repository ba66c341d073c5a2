"""STC-Cacher conformance (techniques.md §3.1, §3.5): the refresh engine is the plain encoder,
the reuse engine matches a brute-force per-token re-implementation of the selective layer, and
the invariants (r = 1 is dense; a frame equal to its reference is dense for any r)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamgraph.models.config import tiny_config
from streamgraph.models.vlm import StreamingVLM, init_random_
from streamgraph.reducers.stc_cacher import RefreshVisionEncoder, ReuseVisionEncoder, selected_count


@pytest.fixture(scope="module")
def model():
    return init_random_(StreamingVLM(tiny_config((48, 48))), 3).eval()


def pixels(seed: int, base: torch.Tensor | None = None, change: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, 48, 48, generator=g)
    return noise if base is None else base + change * noise * (torch.rand(1, 1, 48, 48, generator=g) < 0.3)


# --------------------------------------------------------------------------- brute force (numpy)

def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _weights(layer):
    p = {k: v.detach().double().numpy() for k, v in layer.state_dict().items()}
    return p, layer.layer_norm1.eps, layer.self_attn.num_heads


def _lin(p, name, x):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def layer_reference(h, layer, refs=None, r=1.0):
    """One SigLIP pre-LN layer. Without ``refs``: dense, returns (out, [K, V, A, M]).
    With ``refs = [K_ref, V_ref, A_ref, M_ref]``: STC selective recompute of the
    ``max(1, min(int(T*r), T))`` tokens whose key is least cosine-similar to K_ref."""
    p, eps, heads = _weights(layer)
    t, c = h.shape
    d = c // heads
    x1 = np.stack([_ln(h[i], p["layer_norm1.weight"], p["layer_norm1.bias"], eps) for i in range(t)])
    k = _lin(p, "self_attn.k_proj", x1)
    if refs is None:
        sel = list(range(t))
        v, a, m = np.zeros_like(h), np.zeros_like(h), np.zeros_like(h)
    else:
        k_ref, v_ref, a_ref, m_ref = refs
        score = [float(k[i] @ k_ref[i]) / (max(np.linalg.norm(k[i]), 1e-8) * max(np.linalg.norm(k_ref[i]), 1e-8))
                 for i in range(t)]
        n = max(1, min(int(t * r), t))
        sel = sorted(range(t), key=lambda i: score[i])[:n]
        v, a, m = v_ref.copy(), a_ref.copy(), m_ref.copy()
    for i in sel:
        v[i] = _lin(p, "self_attn.v_proj", x1[i])
    for i in sel:
        q = _lin(p, "self_attn.q_proj", x1[i])
        heads_out = []
        for hh in range(heads):
            s = slice(hh * d, (hh + 1) * d)
            logits = k[:, s] @ q[s] / math.sqrt(d)
            w = np.exp(logits - logits.max())
            heads_out.append((w / w.sum()) @ v[:, s])
        a[i] = _lin(p, "self_attn.out_proj", np.concatenate(heads_out))
    h2 = h + a
    for i in sel:
        x2 = _ln(h2[i], p["layer_norm2.weight"], p["layer_norm2.bias"], eps)
        m[i] = _lin(p, "mlp.fc2", _gelu_tanh(_lin(p, "mlp.fc1", x2)))
    return h2 + m, [k, v, a, m]


def encoder_reference(model, px, refs=None, r=1.0):
    """ViT + projector with the brute-force layers; returns (visual_tokens, per-layer refs)."""
    tower = model.vision_tower
    with torch.no_grad():
        h = tower.embeddings(px.double())[0].numpy()
    new_refs = []
    for li, layer in enumerate(tower.encoder.layers):
        h, lr = layer_reference(h, layer, None if refs is None else refs[li], r)
        new_refs.append(lr)
    with torch.no_grad():
        out = model.multi_modal_projector(torch.from_numpy(h)[None])[0].numpy()
    return out, new_refs


# --------------------------------------------------------------------------- tests

def test_selected_count():
    assert selected_count(256, 0.25) == 64
    assert selected_count(729, 0.25) == 182          # techniques.md: T=729, r=0.25 -> 182
    assert selected_count(256, 0.001) == 1
    assert selected_count(256, 1.0) == 256


def test_refresh_engine_is_the_plain_encoder_exactly(model):
    px = pixels(0)
    with torch.no_grad():
        plain = model.vision_encoder()(px)
        tokens, refs = RefreshVisionEncoder(model.vision_encoder())(px)
    assert torch.equal(tokens, plain)
    cfg = model.cfg.vision
    assert refs.shape == (cfg.layers_used, 4, 1, cfg.num_patches, cfg.hidden_size)


def test_refresh_refs_and_reuse_match_brute_force(model):
    m64 = init_random_(StreamingVLM(model.cfg), 3).double().eval()
    ref_px = pixels(0).double()
    cur_px = pixels(1, ref_px, 0.8)
    with torch.no_grad():
        tokens, refs = RefreshVisionEncoder(m64.vision_encoder())(ref_px)
    want_tokens, want_refs = encoder_reference(m64, ref_px)
    np.testing.assert_allclose(tokens[0].numpy(), want_tokens, atol=1e-7)
    for li, lr in enumerate(want_refs):
        for j in range(4):
            np.testing.assert_allclose(refs[li, j, 0].numpy(), lr[j], atol=1e-7)
    for r in (0.25, 0.6):
        reuse = ReuseVisionEncoder(m64.vision_encoder(), r)
        with torch.no_grad():
            got = reuse(cur_px, refs)[0].numpy()
        want, _ = encoder_reference(m64, cur_px, want_refs, r)
        # softmax runs in float32 inside the engine (as in the plain encoder)
        np.testing.assert_allclose(got, want, atol=1e-7)
        dense, _ = encoder_reference(m64, cur_px)
        assert np.abs(got - dense).max() > 1e-4, "reuse must differ from dense on a changed frame"


def test_full_ratio_and_unchanged_frame_equal_dense(model):
    ref_px, cur_px = pixels(0), pixels(1, pixels(0), 0.5)
    refresh = RefreshVisionEncoder(model.vision_encoder())
    with torch.no_grad():
        _, refs = refresh(ref_px)
        dense_cur = model.vision_encoder()(cur_px)
        dense_ref = model.vision_encoder()(ref_px)
        full = ReuseVisionEncoder(model.vision_encoder(), 1.0)(cur_px, refs)
        same = ReuseVisionEncoder(model.vision_encoder(), 0.25)(ref_px, refs)
    torch.testing.assert_close(full, dense_cur, atol=1e-5, rtol=0)
    torch.testing.assert_close(same, dense_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("feature_layers", [(0,), (1, -2)])
def test_feature_layers_and_pooling(feature_layers):
    """LLaVA-OneVision layouts: features read below the last layer, several layers
    concatenated, or the patch embeddings (no layer runs), then 2x2 bilinear pooling of an odd
    5x5 grid. References cover exactly the layers that run; refresh is the plain encoder
    bit for bit; reuse at r = 1 and reuse of the reference frame itself equal the plain encoder."""
    from streamgraph.models.config import VisionConfig, VLMConfig

    vision = VisionConfig(image_size=(40, 40), patch_size=8, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=3, num_attention_heads=4, feature_layers=feature_layers)
    m = init_random_(StreamingVLM(VLMConfig(vision=vision, video_pooling="bilinear_2x")), 4).eval()
    plain = m.vision_encoder()
    px0 = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    px1 = px0 + 0.5 * torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, refs = RefreshVisionEncoder(plain)(px0)
        assert torch.equal(tokens, plain(px0)) and tokens.shape == (1, 9, 64)
        assert refs.shape == (vision.layers_used, 4, 1, 25, 32)
        torch.testing.assert_close(ReuseVisionEncoder(plain, 1.0)(px1, refs), plain(px1), atol=1e-5, rtol=0)
        torch.testing.assert_close(ReuseVisionEncoder(plain, 0.25)(px0, refs), plain(px0), atol=1e-5, rtol=0)
        if vision.layers_used:
            assert (ReuseVisionEncoder(plain, 0.25)(px1, refs) - plain(px1)).abs().max() > 1e-4


def test_reuse_rejects_bad_ratio(model):
    with pytest.raises(ValueError, match="update_ratio"):
        ReuseVisionEncoder(model.vision_encoder(), 0.0)


# --------------------------------------------------------------------------- Hugging Face checkpoint

def hf_encoder_reference(hf_model, px, refs=None, r=1.0):
    """transformers' LLaVA-OneVision video features of one frame ``px [1,3,H,W]``, with the
    SigLIP layers replaced by the brute-force STC layer above (dense without ``refs``),
    float64: embeddings -> layers -> ``hidden_states[vision_feature_layer]`` -> transformers'
    ``multi_modal_projector`` -> ``apply_pooling``. Returns (tokens [N, C], per-layer refs of
    the layers that feed the selected hidden states)."""
    m = hf_model.model
    tower = m.vision_tower.vision_model if hasattr(m.vision_tower, "vision_model") else m.vision_tower
    n_layers = len(tower.encoder.layers)
    vfl = m.config.vision_feature_layer
    picks = [vfl] if isinstance(vfl, int) else list(vfl)
    picks = [i if i >= 0 else n_layers + 1 + i for i in picks]
    with torch.no_grad():
        h = tower.embeddings(px.double())[0].numpy()
    hidden, new_refs = [h], []
    for li in range(max(picks)):
        h, lr = layer_reference(h, tower.encoder.layers[li], None if refs is None else refs[li], r)
        hidden.append(h)
        new_refs.append(lr)
    feats = torch.from_numpy(np.concatenate([hidden[i] for i in picks], axis=-1))[None]
    with torch.no_grad():
        out = m.apply_pooling(m.multi_modal_projector(feats))[0].numpy()
    return out, new_refs


def test_hf_checkpoint_with_stc_cacher_compiles_and_matches_transformers(hf_checkpoint, tmp_path):
    """An HF LLaVA-OneVision checkpoint (3-layer SigLIP read at vision_feature_layer=-2, 5x5
    patches pooled 2x2 to 3x3) with stc_cacher: the plan sizes the reference buffers for the 2
    layers that run and the 25 ViT tokens (not the 9 pooled ones); the refresh and reuse
    engines export (the compile path: plan -> lower's modules -> dynamo export) and, under ONNX
    Runtime, the refresh engine emits transformers' get_video_features and the brute-force
    references, the reuse engine the brute-force selective recompute (techniques.md §3.1)
    followed by transformers' projector and pooling; a session alternates refresh/reuse.
    (The decoder engines are those of test_hf_checkpoint.py; they are not exported again.)"""
    import copy

    import onnxruntime as ort

    from streamgraph.compiler.compile import check_graph, compile_graph
    from streamgraph.compiler.lower import export_engine, plan_engine_modules
    from streamgraph.runtime.session import Session
    from tests.conftest import frames, write_hf_graph

    path, hf_model = hf_checkpoint
    vc = hf_model.config.vision_config
    t_vit = (vc.image_size // vc.patch_size) ** 2
    layers = vc.num_hidden_layers + 1 + hf_model.config.vision_feature_layer
    r = 0.25
    g = write_hf_graph(tmp_path, path, name="hf-stc")
    g.write_text(g.read_text().replace("encoder: {op: vision_encoder}",
                                       f"encoder: {{op: stc_cacher, update_ratio: {r}, refresh_every: 2}}"))
    checked = check_graph(g)
    plan = checked.plan
    refs_spec = next(s for s in plan.engines["vision_encoder_reuse"].inputs if s.name == "encoder_refs")
    assert refs_spec.shape == [layers, 4, 1, t_vit, vc.hidden_size]
    mods = plan_engine_modules(checked.model, plan)
    run = {}
    for name in ("vision_encoder", "vision_encoder_reuse"):
        sess = ort.InferenceSession(str(export_engine(mods[name], plan.engines[name], tmp_path)))
        run[name] = lambda feeds, sess=sess: dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    h64 = copy.deepcopy(hf_model).double().eval()
    px0 = torch.randn(1, 3, vc.image_size, vc.image_size, generator=torch.Generator().manual_seed(5))
    g1 = torch.Generator().manual_seed(6)                  # px0 with ~30% of its pixels changed
    px1 = px0 + 0.8 * torch.randn(px0.shape, generator=g1) * (torch.rand(1, 1, *px0.shape[2:], generator=g1) < 0.3)
    out0 = run["vision_encoder"]({"pixel_values": px0.numpy()})
    with torch.no_grad():
        transformers_tokens = hf_model.model.get_video_features(px0[None]).pooler_output[0][:-1].numpy()
    np.testing.assert_allclose(out0["visual_tokens"][0], transformers_tokens, atol=1e-5, rtol=0)
    want0, want_refs = hf_encoder_reference(h64, px0)
    np.testing.assert_allclose(want0, transformers_tokens, atol=1e-5)      # the brute force is transformers
    for li, lr in enumerate(want_refs):
        for j in range(4):
            np.testing.assert_allclose(out0["encoder_refs"][li, j, 0], lr[j], atol=1e-5)

    got1 = run["vision_encoder_reuse"]({"pixel_values": px1.numpy(),
                                        "encoder_refs": out0["encoder_refs"]})["visual_tokens"][0]
    want1, _ = hf_encoder_reference(h64, px1, want_refs, r)
    np.testing.assert_allclose(got1, want1, atol=1e-5)
    dense1, _ = hf_encoder_reference(h64, px1)
    assert np.abs(got1 - dense1).max() > 1e-3, "reuse must differ from dense on a changed frame"

    bundle = compile_graph(g, tmp_path / "bundle", target="torch").bundle.path
    s = Session.open(bundle, "torch", overload="none")
    recs = [s.push_frame(f) for f in frames(3, size=(48, 64), seed=1)]
    assert [rec.encoder for rec in recs] == ["refresh", "reuse", "refresh"]
    assert [rec.tokens_kept for rec in recs] == [transformers_tokens.shape[0]] * 3
