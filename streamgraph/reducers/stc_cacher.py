"""``stc_cacher``: STC-Cacher encoder reuse — on non-refresh frames every ViT layer recomputes
only a fixed fraction of tokens and reuses the reference frame's outputs for the rest.

Source: "STC: Streaming Token Compression for Streaming Video LLMs" — reference code
``lern-to-write/STC@9b13ce0:model/custom_siglip.py`` (``forward_with_selective_key_recompute``,
``register_cache_by_key_Siglip``), ``model/cache.py`` (``STC_CACHE``), refactor
``stc/cacher/reference_forward.py``; techniques.md §3.1.

Two engines, both with the plain encoder's weights:

* refresh — :class:`RefreshVisionEncoder`, exported as ``vision_encoder`` with one extra
  output: ``pixel_values [B,3,H,W]`` -> ``visual_tokens [B,N,C]`` (exactly the plain encoder's
  ops) and ``encoder_refs [L,4,B,T,Cv]`` float32, per layer ``[K_ref, V_ref, A_ref, M_ref]``:
  the keys and values of LN1(h) (after ``k_proj``/``v_proj``), the attention branch after
  ``out_proj`` and the MLP branch, each before its residual add;
* reuse — :class:`ReuseVisionEncoder`, engine ``vision_encoder_reuse``: ``pixel_values``,
  ``encoder_refs`` -> ``visual_tokens``. Per layer, input ``h [B,T,Cv]``:

  1. ``x1 = LN1(h)``; ``K = k_proj(x1)`` for all tokens;
  2. ``score[t] = cos(K[t], K_ref[t])`` (same position);
  3. ``idx`` = the ``n = max(1, min(int(T·r), T))`` **least similar** tokens (``topk`` smallest);
  4. ``Q = q_proj(x1[idx])``, ``V = V_ref`` with rows ``idx`` replaced by ``v_proj(x1[idx])``;
  5. ``A = A_ref`` with rows ``idx`` replaced by ``out_proj(softmax(Q·Kᵀ/√d)·V)`` (all T keys);
  6. ``h2 = h + A``; ``M = M_ref`` with rows ``idx`` replaced by ``mlp(LN2(h2[idx]))``;
     ``out = h2 + M`` (LN2 is per token, so normalizing only the selected rows is identical).

The reference buffers are never updated by the reuse engine (the reference stores them on
refresh frames only). The runtime owns them and decides per frame: refresh every
``refresh_every`` encoded frames, reuse otherwise (``streamgraph.runtime.pipeline``). Shapes
are static because n is fixed at build time. The patch embedding and the projector stay dense.

T is the ViT's patch count and L the layers that run (``VisionConfig.layers_used``: up to the
deepest feature layer), so for a LLaVA-OneVision checkpoint (``vision_feature_layer`` -2 or
several layers; 2x2 bilinear video pooling after the projector) the references hold the
unpooled ViT tokens of the used layers, and both engines end with the plain encoder's
feature selection, projector and pooling (:meth:`VisionEncoder.head
<streamgraph.models.vlm.VisionEncoder.head>`): ``N`` = pooled tokens, ``T`` = ViT tokens. This
is the reference's placement (STC patches the SigLIP layers; LLaVA-OV's projector and pooling
run after the tower, dense).

One plugin file (see :mod:`streamgraph.reducers.base`): params :class:`StcCacherNode` (an
encoder op), shape rule (the plain encoder's), torch modules ``RefreshVisionEncoder`` and
``ReuseVisionEncoder`` (defined on first use; :func:`build` maps them to their engines),
registration.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from streamgraph.compiler.limits import MAX_COUNT
from streamgraph.compiler.ops import (NodeBase, NodeRef, OpInfo, Port, PortType, encoder_shape,
                                      register)
from streamgraph.contract import VISION_ENCODER, VISION_ENCODER_REUSE
from streamgraph.reducers.base import torch_part

__all__ = ["StcCacherNode", "selected_count", "RefreshVisionEncoder", "ReuseVisionEncoder", "build"]


class StcCacherNode(NodeBase):
    """Vision encoder + projector with STC-Cacher reuse: on non-refresh frames every ViT
    layer recomputes only the `update_ratio` fraction of tokens least similar to the
    reference frame and reuses the reference outputs for the rest; optionally skips the
    encoder for frames that barely changed."""

    op: Literal["stc_cacher"]
    input: NodeRef = "frames"
    """Frame source; only the built-in `frames` exists."""
    update_ratio: float = Field(0.25, gt=0.0, le=1.0, allow_inf_nan=False)
    """Fraction r of tokens recomputed per layer on reuse frames (n = max(1, int(N·r)))."""
    refresh_every: int = Field(2, ge=1, le=MAX_COUNT)
    """A refresh (full encode that stores new reference buffers) every this many encoded
    frames; 1 = every frame (no reuse)."""
    skip_threshold: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    """Frame-level skip: reuse the last encoded frame's visual tokens outright when the mean
    absolute pixel difference (resized RGB in [0, 1]) to that frame is below this; 0
    disables."""


def selected_count(t: int, update_ratio: float) -> int:
    """Tokens recomputed per layer on a reuse frame: ``max(1, min(int(T·r), T))``."""
    return max(1, min(int(t * update_ratio), t))


def build(params: dict, encoder: Any) -> dict:
    """The two engines' modules around the plain vision encoder module ``encoder``:
    ``{"vision_encoder": RefreshVisionEncoder, "vision_encoder_reuse": ReuseVisionEncoder}``
    (imports torch)."""
    t = _torch()
    return {VISION_ENCODER: t["RefreshVisionEncoder"](encoder),
            VISION_ENCODER_REUSE: t["ReuseVisionEncoder"](encoder, float(params.get("update_ratio", 0.25)))}


register(OpInfo("stc_cacher", "encoder", StcCacherNode, inputs=(Port("input", PortType.FRAMES),),
                output=PortType.VISUAL_TOKENS, infer_shape=encoder_shape, module=build))


# --------------------------------------------------------------------------- torch modules

@torch_part(__name__, ("RefreshVisionEncoder", "ReuseVisionEncoder"))
def _torch() -> dict:
    import torch
    from torch import Tensor, nn

    from streamgraph.reducers.nn import cosine, gather_rows

    def _attend(attn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Multi-head attention of ``q [B,Tq,C]`` over ``k, v [B,T,C]`` with ``attn``'s heads,
        the same op sequence as :class:`streamgraph.models.vlm.SiglipAttention`; returns the
        output after ``out_proj`` ``[B,Tq,C]``."""
        b, tq, c = q.shape
        t = k.shape[1]
        h, d = attn.num_heads, attn.head_dim
        q = q.view(b, tq, h, d).transpose(1, 2)
        k = k.view(b, t, h, d).transpose(1, 2)
        v = v.view(b, t, h, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (d ** -0.5)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, tq, c)
        return attn.out_proj(out)


    class RefreshVisionEncoder(nn.Module):
        """Refresh engine: ``pixel_values [B,3,H,W]`` -> ``visual_tokens [B,N,C]``,
        ``encoder_refs [L,4,B,T,Cv]`` (see the module docstring).

        ``encoder`` is the plain :class:`~streamgraph.models.vlm.VisionEncoder`; its feature-layer
        selection, projector and (LLaVA-OneVision) 2x2 pooling are applied exactly as it applies
        them, so ``visual_tokens`` equals the plain encoder's output."""

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, pixel_values: Tensor):
            tower = self.encoder.vision_tower
            x = tower.embeddings(pixel_values)
            hidden, refs = [x], []
            for layer in tower.encoder.layers:
                attn = layer.self_attn
                x1 = layer.layer_norm1(x)
                q, k, v = attn.q_proj(x1), attn.k_proj(x1), attn.v_proj(x1)
                a = _attend(attn, q, k, v)
                x = x + a
                m = layer.mlp(layer.layer_norm2(x))
                x = x + m
                hidden.append(x)
                refs.append(torch.stack([k, v, a, m]))
            # no layer runs when the features are the patch embeddings (vision_feature_layer 0)
            stacked = torch.stack(refs) if refs else x.new_zeros((0, 4, *x.shape))
            return self.encoder.head(tower.select_features(hidden)), stacked


    class ReuseVisionEncoder(nn.Module):
        """Reuse engine: ``pixel_values [B,3,H,W]``, ``encoder_refs [L,4,B,T,Cv]`` ->
        ``visual_tokens [B,N,C]``, recomputing ``selected_count(T, update_ratio)`` of the T ViT
        tokens per layer, then the plain encoder's feature selection, projector and pooling
        (``encoder``: the plain :class:`~streamgraph.models.vlm.VisionEncoder`).

        Raises ValueError for ``update_ratio`` outside (0, 1]."""

        def __init__(self, encoder, update_ratio: float = 0.25):
            super().__init__()
            if not 0.0 < update_ratio <= 1.0:
                raise ValueError(f"update_ratio must be in (0, 1], got {update_ratio}")
            self.encoder = encoder
            self.update_ratio = float(update_ratio)

        def forward(self, pixel_values: Tensor, encoder_refs: Tensor):
            tower = self.encoder.vision_tower
            x = tower.embeddings(pixel_values)
            b, t, c = x.shape
            n = selected_count(t, self.update_ratio)
            rows = torch.arange(b, device=x.device)[:, None].expand(b, n)
            hidden = [x]
            for li, layer in enumerate(tower.encoder.layers):
                attn = layer.self_attn
                refs = encoder_refs[li]
                k_ref, v_ref, a_ref, m_ref = refs[0], refs[1], refs[2], refs[3]
                x1 = layer.layer_norm1(x)
                k = attn.k_proj(x1)
                score = cosine(k, k_ref)                                                 # [B, T]
                idx = torch.topk(score, n, dim=-1, largest=False).indices                # [B, n]
                x1s = gather_rows(x1, idx)
                # row replacement: index_put exports to ScatterND (whole rows, no reduction)
                v = v_ref.index_put((rows, idx), attn.v_proj(x1s))
                a = a_ref.index_put((rows, idx), _attend(attn, attn.q_proj(x1s), k, v))
                x = x + a
                m = m_ref.index_put((rows, idx), layer.mlp(layer.layer_norm2(gather_rows(x, idx))))
                x = x + m
                hidden.append(x)
            return self.encoder.head(tower.select_features(hidden))

    return {"RefreshVisionEncoder": RefreshVisionEncoder, "ReuseVisionEncoder": ReuseVisionEncoder}


__getattr__ = _torch.getattr
