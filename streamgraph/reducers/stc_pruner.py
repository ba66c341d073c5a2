"""``stc_pruner``: STC-Pruner — keep the K most novel tokens against a temporal (memory) and a
spatial (frame) anchor.

Source: "STC: Streaming Token Compression for Streaming Video LLMs" — reference code
``lern-to-write/STC@9b13ce0:model/prune.py`` (``STC_Pruner.compress``, ``ScoreCalculator``)
and the refactor ``stc/pruner`` (``STCPruner._score``, ``scoring.dual_anchor_scores``);
techniques.md §3.2. One call per frame (F = 1, the streaming case).

``scoring="gaussian"`` (the released behaviour, default), per frame ``X [N,C]``:

1. channel subset: the ``D' = max(1, int(C·channel_keep_ratio))`` channels of lowest variance
   over the frame's N tokens (population variance; ``topk(var, D', largest=False)`` order);
2. memory: the frame's mean over tokens of ``X'`` is appended to the history; the memory anchor
   is the mean of all history means (current included). The history is kept as a running
   ``(sum, count)`` — elementwise, exactly the mean of the list, including the reference's quirk
   that history means from different frames may come from different channel subsets;
3. ``Xn = normalize(X')``; frame anchor = mean of ``Xn`` over tokens; memory anchor normalized;
4. ``g(x, a) = Σ_{α∈{1/8,1/4,1/2,1,2}} exp(-||x - a||² / 2α)``;
   score = ``g(Xn, memory) + g(Xn, frame)``; keep the K tokens with the **lowest** score.

``scoring="dual_anchor"`` (the paper pseudocode, refactor): score = ``α·(1 - cos(Xn, temporal))
+ (1-α)·(1 - cos(Xn, spatial))`` with temporal = normalized memory anchor, spatial =
normalized mean of ``X'``; keep the K **highest**.

Output rows are unmodified full-channel input rows, ascending ``source_index``, all valid.
State (engine I/O, owned by the runtime): ``state_memory_sum [B,D']`` and
``state_memory_count [B]`` (float32; zeros at stream start).

One plugin file (see :mod:`streamgraph.reducers.base`): params :class:`StcPrunerNode`, shape
rule :func:`~streamgraph.reducers.base.budget_shape`, torch module ``STCPruner`` (defined on
first use), registration.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from streamgraph.compiler.ops import NodeBase, NodeRef, OpInfo, PortType, TokenBudget, register
from streamgraph.reducers.base import VISUAL_TOKENS_INPUT, budget_shape, torch_part

__all__ = ["StcPrunerNode", "STCPruner", "GAUSSIAN_ALPHAS", "gaussian_similarity", "build"]

GAUSSIAN_ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)


class StcPrunerNode(NodeBase):
    """Token pruner: STC-Pruner. Keeps the `tokens_per_frame` tokens most novel with respect to
    a temporal anchor (running mean of past frames) and a spatial anchor (the frame's mean)."""

    op: Literal["stc_pruner"]
    input: NodeRef
    """Node producing visual tokens (an encoder)."""
    tokens_per_frame: TokenBudget
    """Token budget K or a list of budget buckets."""
    scoring: Literal["gaussian", "dual_anchor"] = "gaussian"
    """`gaussian`: the released code's multi-bandwidth Gaussian similarity to both anchors,
    keep the lowest; `dual_anchor`: the paper's blend of cosine distances, keep the highest."""
    channel_keep_ratio: float = Field(0.5, gt=0.0, le=1.0, allow_inf_nan=False)
    """Fraction of channels (lowest variance) used for scoring."""
    alpha: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    """`dual_anchor` only: weight of the temporal distance (1 - alpha: spatial)."""
    positions: Literal["keep", "compact"] = "compact"
    """`keep`: kept tokens keep their positions in the frame; `compact`: consecutive."""


def build(params: dict, k: int):
    """Torch module of budget bucket ``k`` (imports torch)."""
    return _torch()["STCPruner"](k, params.get("scoring", "gaussian"),
                                 float(params.get("channel_keep_ratio", 0.5)), float(params.get("alpha", 0.5)))


register(OpInfo("stc_pruner", "reducer", StcPrunerNode, inputs=VISUAL_TOKENS_INPUT,
                output=PortType.VISUAL_TOKENS, infer_shape=budget_shape, module=build))


# --------------------------------------------------------------------------- torch module

@torch_part(__name__, ("STCPruner", "gaussian_similarity"))
def _torch() -> dict:
    import torch
    from torch import Tensor

    from streamgraph.reducers.nn import Reducer, cosine, gather_rows, l2_normalize

    def gaussian_similarity(x: Tensor, a: Tensor) -> Tensor:
        """``Σ_α exp(-||x - a||² / (2α))`` over :data:`GAUSSIAN_ALPHAS`; ``x [B,N,D]``, ``a [B,1,D]``
        -> ``[B,N]``."""
        d2 = (x - a).pow(2).sum(-1)
        out = torch.zeros_like(d2)
        for alpha in GAUSSIAN_ALPHAS:
            out = out + torch.exp(-d2 / (2.0 * alpha))
        return out

    class STCPruner(Reducer):
        """``visual_tokens [B,N,C]``, ``state_memory_sum [B,D']``, ``state_memory_count [B]`` ->
        ``tokens [B,K,C]``, ``keep_mask [B,K]`` (all True), ``source_index [B,K]`` (ascending),
        ``next_state_memory_sum``, ``next_state_memory_count``.

        Raises ValueError for an unknown ``scoring``, ``channel_keep_ratio`` outside (0, 1] or
        ``alpha`` outside [0, 1].
        """

        state = ("memory_sum", "memory_count")

        def __init__(self, k: int, scoring: str = "gaussian", channel_keep_ratio: float = 0.5,
                     alpha: float = 0.5):
            super().__init__(k)
            if scoring not in ("gaussian", "dual_anchor"):
                raise ValueError(f"scoring must be 'gaussian' or 'dual_anchor', got {scoring!r}")
            if not 0.0 < channel_keep_ratio <= 1.0:
                raise ValueError(f"channel_keep_ratio must be in (0, 1], got {channel_keep_ratio}")
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {alpha}")
            self.scoring = scoring
            self.channel_keep_ratio = float(channel_keep_ratio)
            self.alpha = float(alpha)

        def channels(self, c: int) -> int:
            """D', the scoring channels kept out of ``c``."""
            return max(1, int(c * self.channel_keep_ratio))

        def state_shapes(self, b: int, n: int, c: int):
            return {"memory_sum": ([b, self.channels(c)], "float32"), "memory_count": ([b], "float32")}

        def forward(self, visual_tokens: Tensor, state_memory_sum: Tensor, state_memory_count: Tensor):
            x = visual_tokens
            b, n, c = x.shape
            d = self.channels(c)
            var = (x - x.mean(1, keepdim=True)).pow(2).mean(1)                           # [B, C]
            ch = torch.topk(var, d, dim=-1, largest=False).indices                       # [B, D']
            xs = torch.gather(x, 2, ch[:, None, :].expand(b, n, d))                      # [B, N, D']
            mean = xs.mean(1)                                                            # [B, D']
            mem_sum = state_memory_sum + mean
            mem_count = state_memory_count + 1.0
            memory = mem_sum / mem_count[:, None]                                        # [B, D']
            xn = l2_normalize(xs)
            if self.scoring == "gaussian":
                frame = xn.mean(1, keepdim=True)
                score = gaussian_similarity(xn, l2_normalize(memory)[:, None]) + gaussian_similarity(xn, frame)
                idx = torch.topk(score, self.k, dim=-1, largest=False).indices
            else:
                spatial = l2_normalize(mean)[:, None]
                temporal = l2_normalize(memory)[:, None]
                score = (self.alpha * (1.0 - cosine(xn, temporal))
                         + (1.0 - self.alpha) * (1.0 - cosine(xn, spatial)))
                idx = torch.topk(score, self.k, dim=-1, largest=True).indices
            idx, _ = torch.sort(idx, dim=-1)
            tokens = gather_rows(visual_tokens, idx)
            keep = torch.ones(b, self.k, dtype=torch.bool, device=x.device)
            return tokens, keep, idx, mem_sum, mem_count

    return {"STCPruner": STCPruner, "gaussian_similarity": gaussian_similarity}


__getattr__ = _torch.getattr
