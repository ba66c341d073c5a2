"""``topk_saliency``: keep the K visual tokens with the largest feature L2 norm.

A static-shape saliency pruner in the family of FastV / VisionZip / STC-Pruner "keep top-k"
(techniques.md §11, §3.2), with the projected token's L2 norm as the saliency score (no
attention probabilities needed, so it fuses with any attention kernel). Kept tokens are
returned in their original (raster) order, so ``source_index`` is strictly increasing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class TopKSaliency(nn.Module):
    """``tokens [B,N,C]`` -> ``tokens [B,K,C]``, ``keep_mask [B,K]`` bool,
    ``source_index [B,K]`` int64 (ascending).

    Ties in the norm are broken by :func:`torch.topk`'s order; K must satisfy 1 <= K <= N
    (checked by the compiler's shape inference).
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, tokens: Tensor):
        b, n, c = tokens.shape
        scores = tokens.float().pow(2).sum(-1)                      # [B, N] squared L2 norm
        idx = torch.topk(scores, self.k, dim=-1).indices              # [B, K]
        idx, _ = torch.sort(idx, dim=-1)                              # raster order
        kept = torch.gather(tokens, 1, idx[..., None].expand(b, self.k, c))
        keep_mask = torch.ones(b, self.k, dtype=torch.bool, device=tokens.device)
        return kept, keep_mask, idx


def build_reducer(op: str, params: dict, *, grid: tuple[int, int] | None = None) -> nn.Module | None:
    """Torch module for a reducer op, or ``None`` for the identity reducer ``none``.

    ``grid`` is the (rows, cols) token grid of the reducer's input (needed by ``pool``).
    Raises KeyError for an op that is not a reducer, ValueError for ``pool`` without a grid."""
    if op == "none":
        return None
    if op == "topk_saliency":
        return TopKSaliency(int(params["tokens_per_frame"]))
    if op == "pool":
        from streamgraph.reducers.pool import BilinearPool2x

        if grid is None:
            raise ValueError("reducer 'pool' needs the token grid of its input")
        return BilinearPool2x(tuple(grid))
    raise KeyError(f"not a reducer op: {op!r}")
