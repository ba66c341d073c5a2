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
        tokens, refs = RefreshVisionEncoder(model.vision_tower, model.multi_modal_projector)(px)
    assert torch.equal(tokens, plain)
    cfg = model.cfg.vision
    assert refs.shape == (cfg.num_hidden_layers, 4, 1, cfg.num_patches, cfg.hidden_size)


def test_refresh_refs_and_reuse_match_brute_force(model):
    m64 = init_random_(StreamingVLM(model.cfg), 3).double().eval()
    ref_px = pixels(0).double()
    cur_px = pixels(1, ref_px, 0.8)
    with torch.no_grad():
        tokens, refs = RefreshVisionEncoder(m64.vision_tower, m64.multi_modal_projector)(ref_px)
    want_tokens, want_refs = encoder_reference(m64, ref_px)
    np.testing.assert_allclose(tokens[0].numpy(), want_tokens, atol=1e-7)
    for li, lr in enumerate(want_refs):
        for j in range(4):
            np.testing.assert_allclose(refs[li, j, 0].numpy(), lr[j], atol=1e-7)
    for r in (0.25, 0.6):
        reuse = ReuseVisionEncoder(m64.vision_tower, m64.multi_modal_projector, r)
        with torch.no_grad():
            got = reuse(cur_px, refs)[0].numpy()
        want, _ = encoder_reference(m64, cur_px, want_refs, r)
        # softmax runs in float32 inside the engine (as in the plain encoder)
        np.testing.assert_allclose(got, want, atol=1e-7)
        dense, _ = encoder_reference(m64, cur_px)
        assert np.abs(got - dense).max() > 1e-4, "reuse must differ from dense on a changed frame"


def test_full_ratio_and_unchanged_frame_equal_dense(model):
    ref_px, cur_px = pixels(0), pixels(1, pixels(0), 0.5)
    refresh = RefreshVisionEncoder(model.vision_tower, model.multi_modal_projector)
    with torch.no_grad():
        _, refs = refresh(ref_px)
        dense_cur = model.vision_encoder()(cur_px)
        dense_ref = model.vision_encoder()(ref_px)
        full = ReuseVisionEncoder(model.vision_tower, model.multi_modal_projector, 1.0)(cur_px, refs)
        same = ReuseVisionEncoder(model.vision_tower, model.multi_modal_projector, 0.25)(ref_px, refs)
    torch.testing.assert_close(full, dense_cur, atol=1e-5, rtol=0)
    torch.testing.assert_close(same, dense_ref, atol=1e-5, rtol=0)


def test_reuse_rejects_bad_ratio(model):
    with pytest.raises(ValueError, match="update_ratio"):
        ReuseVisionEncoder(model.vision_tower, model.multi_modal_projector, 0.0)
