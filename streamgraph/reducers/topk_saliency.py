"""``topk_saliency``: keep the K visual tokens with the largest feature L2 norm.

A static-shape saliency pruner in the family of FastV / VisionZip / STC-Pruner "keep top-k"
(techniques.md §11, §3.2), with the projected token's L2 norm as the saliency score (no
attention probabilities needed, so it fuses with any attention kernel). Kept tokens are
returned in their original (raster) order, so ``source_index`` is strictly increasing.

One plugin file (see :mod:`streamgraph.reducers.base`): params :class:`TopkSaliencyNode`,
shape rule :func:`~streamgraph.reducers.base.budget_shape`, torch module ``TopKSaliency``
(defined on first use), registration.
"""
from __future__ import annotations

from typing import Literal

from streamgraph.compiler.ops import NodeBase, NodeRef, OpInfo, PortType, TokenBudget, register
from streamgraph.reducers.base import VISUAL_TOKENS_INPUT, budget_shape, torch_part

__all__ = ["TopkSaliencyNode", "TopKSaliency", "build"]


class TopkSaliencyNode(NodeBase):
    """Token pruner: keeps the `tokens_per_frame` visual tokens with the largest feature
    L2 norm in each frame (a fixed token budget)."""

    op: Literal["topk_saliency"]
    input: NodeRef
    """Node producing visual tokens (the encoder; v1 allows one reducer)."""
    tokens_per_frame: TokenBudget
    """Token budget K: visual tokens kept per frame (1 <= K <= N), or a list of budget
    buckets, e.g. `[16, 32, 64]` (one engine each; the largest is the default)."""
    positions: Literal["keep", "compact"] = "compact"
    """`keep`: kept tokens keep their original positions in the frame; `compact`: they
    get consecutive positions."""


def build(params: dict, k: int):
    """Torch module of budget bucket ``k`` (imports torch)."""
    return _torch()["TopKSaliency"](k)


register(OpInfo("topk_saliency", "reducer", TopkSaliencyNode, inputs=VISUAL_TOKENS_INPUT,
                output=PortType.VISUAL_TOKENS, infer_shape=budget_shape, module=build))


# --------------------------------------------------------------------------- torch module

@torch_part(__name__, ("TopKSaliency",))
def _torch() -> dict:
    import torch
    from torch import Tensor

    from streamgraph.reducers.nn import Reducer

    class TopKSaliency(Reducer):
        """``tokens [B,N,C]`` -> ``tokens [B,K,C]``, ``keep_mask [B,K]`` bool,
        ``source_index [B,K]`` int64 (ascending).

        Ties in the norm are broken by :func:`torch.topk`'s order; K must satisfy 1 <= K <= N
        (checked by the compiler's shape inference).
        """

        def forward(self, tokens: Tensor):
            b, n, c = tokens.shape
            scores = tokens.float().pow(2).sum(-1)                      # [B, N] squared L2 norm
            idx = torch.topk(scores, self.k, dim=-1).indices              # [B, K]
            idx, _ = torch.sort(idx, dim=-1)                              # raster order
            kept = torch.gather(tokens, 1, idx[..., None].expand(b, self.k, c))
            keep_mask = torch.ones(b, self.k, dtype=torch.bool, device=tokens.device)
            return kept, keep_mask, idx

    return {"TopKSaliency": TopKSaliency}


__getattr__ = _torch.getattr
