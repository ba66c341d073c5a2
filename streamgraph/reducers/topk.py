"""``topk_saliency``: keep the K visual tokens with the largest feature L2 norm.

A static-shape saliency pruner in the family of FastV / VisionZip / STC-Pruner "keep top-k"
(techniques.md §11, §3.2), with the projected token's L2 norm as the saliency score (no
attention probabilities needed, so it fuses with any attention kernel). Kept tokens are
returned in their original (raster) order, so ``source_index`` is strictly increasing.
"""
from __future__ import annotations

import torch
from torch import Tensor

from streamgraph.reducers.base import Reducer


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


def _build(params: dict, k: int) -> TopKSaliency:
    return TopKSaliency(k)
