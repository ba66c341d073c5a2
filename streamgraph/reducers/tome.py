"""``tome``: Token Merging by bipartite soft matching, merged down to a fixed budget K.

Source: Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023); reference code
``facebookresearch/ToMe@af95e4b:tome/merge.py`` (``bipartite_soft_matching``, ``merge_wavg``);
techniques.md §11.3.

One round of the reference (r merges): normalize the metric; A = tokens at even positions,
B = tokens at odd positions; ``scores = A·Bᵀ``; each A token's best B (``max``); the r A tokens
with the highest best-score are merged into their B (the rest are kept, "unmerged");
output order ``[unmerged A (by descending score), B (in order)]``; features merged as a
size-weighted average (``merge_wavg``: ``Σ x·size / Σ size``) and sizes summed.

Reducer version (this module): the rounds run back to back after the projector until N
tokens become K, with a schedule fixed at build time (``r = min(n - K, n // 2)`` per round,
since one round merges at most half the tokens), so every shape is static. Differences from
the in-ViT reference: the metric is the (merged) token itself, not the attention keys (a
reducer has no keys), and there is no class token and no proportional attention (the decoder
step's attention is fixed by the engine contract). The mean is written as sum / size:
``ScatterElements(reduction='add')`` then a divide (ONNX has no mean scatter).

Outputs: K merged tokens in ascending ``source_index`` (the original index of the token each
group was merged into, i.e. its destination), all valid, and ``token_size [B,K]`` float32: how
many frame tokens each output token averages (sizes sum to N).

One plugin file (see :mod:`streamgraph.reducers.base`): params :class:`TomeNode`, shape rule
:func:`~streamgraph.reducers.base.budget_shape`, torch module ``TokenMerging`` (defined on
first use), registration.
"""
from __future__ import annotations

from typing import Literal

from streamgraph.compiler.ops import NodeBase, NodeRef, OpInfo, PortType, TokenBudget, register
from streamgraph.reducers.base import VISUAL_TOKENS_INPUT, budget_shape, torch_part

__all__ = ["TomeNode", "TokenMerging", "merge_schedule", "bipartite_round", "build"]


class TomeNode(NodeBase):
    """Token merger: ToMe bipartite soft matching, merging similar tokens (size-weighted
    mean) until `tokens_per_frame` remain."""

    op: Literal["tome"]
    input: NodeRef
    """Node producing visual tokens (an encoder)."""
    tokens_per_frame: TokenBudget
    """Token budget K (merged tokens per frame) or a list of budget buckets."""
    positions: Literal["keep", "compact"] = "compact"
    """`keep`: each merged token takes the position of the token it was merged into;
    `compact`: consecutive positions."""


def merge_schedule(n: int, k: int) -> list[int]:
    """Merges per round taking ``n`` tokens to ``k`` (each ``r <= n // 2``). ValueError if
    ``k`` is not in [1, n]."""
    if not 1 <= k <= n:
        raise ValueError(f"budget {k} must be in [1, {n}]")
    rs = []
    while n > k:
        r = min(n - k, n // 2)
        rs.append(r)
        n -= r
    return rs


def build(params: dict, k: int):
    """Torch module of budget bucket ``k`` (imports torch)."""
    return _torch()["TokenMerging"](k)


register(OpInfo("tome", "reducer", TomeNode, inputs=VISUAL_TOKENS_INPUT, output=PortType.VISUAL_TOKENS,
                infer_shape=budget_shape, module=build))


# --------------------------------------------------------------------------- torch module

@torch_part(__name__, ("TokenMerging", "bipartite_round"))
def _torch() -> dict:
    import torch
    from torch import Tensor

    from streamgraph.reducers.nn import Reducer, gather_rows, l2_normalize

    def bipartite_round(x: Tensor, size: Tensor, src: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """One bipartite soft-matching round over ``x [B,T,C]`` (size-weighted means),
        ``size [B,T,1]`` and representative index ``src [B,T,1]`` (int64), merging ``r`` tokens.
        Returns the three tensors with ``T - r`` rows, ordered ``[unmerged A, B]``."""
        b, t, c = x.shape
        metric = l2_normalize(x)
        a_m, b_m = metric[:, ::2], metric[:, 1::2]
        scores = a_m @ b_m.transpose(-1, -2)                                     # [B, Ta, Tb]
        node_max, node_idx = scores.max(dim=-1)                                   # [B, Ta]
        edge_idx = torch.argsort(node_max, dim=-1, descending=True)[..., None]    # [B, Ta, 1]
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        dst_idx = torch.gather(node_idx[..., None], 1, src_idx)                   # [B, r, 1]
        ta = a_m.shape[1]

        def merge_sum(v: Tensor) -> Tensor:
            va, vb = v[:, ::2], v[:, 1::2]
            ch = v.shape[-1]
            unm = torch.gather(va, 1, unm_idx.expand(b, ta - r, ch))
            moved = torch.gather(va, 1, src_idx.expand(b, r, ch))
            vb = vb.scatter_add(1, dst_idx.expand(b, r, ch), moved)
            return torch.cat([unm, vb], dim=1)

        mass = merge_sum(x * size)
        new_size = merge_sum(size)
        # representatives: unmerged A keep theirs, B keep theirs (merged groups take the dst's)
        src_a, src_b = src[:, ::2], src[:, 1::2]
        new_src = torch.cat([torch.gather(src_a, 1, unm_idx), src_b], dim=1)
        return mass / new_size, new_size, new_src

    class TokenMerging(Reducer):
        """``visual_tokens [B,N,C]`` -> ``tokens [B,K,C]`` (size-weighted means), ``keep_mask [B,K]``
        (all True), ``source_index [B,K]`` (ascending), ``token_size [B,K]`` float32."""

        extra_outputs = (("token_size", "float32"),)

        def forward(self, visual_tokens: Tensor):
            b, n, c = visual_tokens.shape
            x = visual_tokens
            size = torch.ones(b, n, 1, dtype=x.dtype, device=x.device)
            src = torch.arange(n, device=x.device)[None, :, None].expand(b, n, 1)
            for r in merge_schedule(n, self.k):
                x, size, src = bipartite_round(x, size, src, r)
            idx, order = torch.sort(src[..., 0], dim=-1)
            tokens = gather_rows(x, order)
            sizes = torch.gather(size[..., 0], 1, order)
            keep = torch.ones(b, self.k, dtype=torch.bool, device=x.device)
            return tokens, keep, idx, sizes

    return {"TokenMerging": TokenMerging, "bipartite_round": bipartite_round}


__getattr__ = _torch.getattr
