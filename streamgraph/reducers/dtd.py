"""``dtd``: TimeChat-Online Differential Token Drop (feature method), static-shape.

Source: Yao et al., "TimeChat-Online: 80% Visual Tokens are Naturally Redundant in
Streaming Videos" (ACM MM 2025); reference code ``yaolinli/TimeChat-Online@25a1578:
eval/qwen2_5_vl/modeling_qwen2_5_vl_DTD.py`` (``Qwen2_5_VLModel.token_drop``, feature
method); techniques.md §4.

Reference semantics, per frame after the first: ``sim[p] = cos(prev[p], cur[p])`` with the
same token index of the **previous frame's full token map** (dropped tokens included);
absolute mode drops every token with ``sim > threshold``; relative mode drops the
``int(N * threshold)`` most similar tokens. The first frame is kept whole. Kept tokens keep
their original positions ("Positional Reservation").

Static-shape version (this module), per frame:

* the budget K caps the kept count: of the tokens the reference keeps, the K least similar
  (most changed) are kept; the rest of the K outputs are masked (``keep_mask`` False);
* valid outputs come first, in ascending ``source_index`` (the decoder reads them as a prefix);
* cosine is clamped to ``[-1, 1]`` so ``threshold = 1.0`` drops nothing even for identical
  tokens under float rounding (the reference can drop a token whose cosine rounds above 1);
* the previous frame's tokens are engine state (``state_prev_tokens [B,N,C]`` in,
  ``next_state_prev_tokens`` = this frame's tokens out), owned by the runtime;
* the first frame of a stream is sent whole by the runtime (``first_frame_full``): it runs the
  engine only to update the state and prefills all N encoder tokens.

One plugin file (see :mod:`streamgraph.reducers.base`): params :class:`DtdNode`, shape rule
(:func:`~streamgraph.reducers.base.budget_shape`; a frame may send N tokens: the first),
torch module ``DifferentialTokenDrop`` (defined on first use), registration.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from streamgraph.compiler.ops import (NodeBase, NodeRef, OpInfo, PortType, TokenBudget, TokenShape,
                                      register)
from streamgraph.reducers.base import VISUAL_TOKENS_INPUT, budget_shape, torch_part

__all__ = ["DtdNode", "DifferentialTokenDrop", "build"]


class DtdNode(NodeBase):
    """Token pruner: TimeChat-Online differential token drop (feature method). Drops the
    tokens whose cosine similarity with the same token of the previous frame is above
    `threshold` (or the most similar fraction, in `relative` mode), keeps at most
    `tokens_per_frame` of the rest and masks the unused budget; the first frame of a stream
    is kept whole."""

    op: Literal["dtd"]
    input: NodeRef
    """Node producing visual tokens (an encoder)."""
    tokens_per_frame: TokenBudget
    """Token budget K (cap on kept tokens per frame) or a list of budget buckets."""
    threshold: float = Field(0.5, ge=-1.0, le=1.0, allow_inf_nan=False)
    """`absolute` mode: cosine τ in [-1, 1], tokens with similarity > τ are dropped (lower
    drops more; the reference default is 0.5). `relative` mode: the fraction in [0, 1] of
    most similar tokens dropped."""
    mode: Literal["absolute", "relative"] = "absolute"
    """`absolute`: threshold on the similarity; `relative`: drop a fixed fraction."""
    positions: Literal["keep", "compact"] = "keep"
    """`keep` (reference: "positional reservation"): kept tokens keep their positions in the
    frame; `compact`: consecutive positions."""

    @model_validator(mode="after")
    def _relative_range(self) -> "DtdNode":
        if self.mode == "relative" and self.threshold < 0:
            raise ValueError(f"threshold: relative mode drops a fraction in [0, 1], got "
                             f"{self.threshold}")
        return self


def frame_tokens(params: DtdNode, inp: TokenShape) -> int:
    """Most tokens one frame sends to the decoder: N (the first frame of a stream is kept
    whole)."""
    return inp.n


def build(params: dict, k: int):
    """Torch module of budget bucket ``k`` (imports torch)."""
    return _torch()["DifferentialTokenDrop"](k, float(params.get("threshold", 0.5)),
                                             params.get("mode", "absolute"))


register(OpInfo("dtd", "reducer", DtdNode, inputs=VISUAL_TOKENS_INPUT, output=PortType.VISUAL_TOKENS,
                infer_shape=budget_shape, frame_tokens=frame_tokens, module=build))


# --------------------------------------------------------------------------- torch module

@torch_part(__name__, ("DifferentialTokenDrop",))
def _torch() -> dict:
    import torch
    from torch import Tensor

    from streamgraph.reducers.nn import Reducer, compact_valid_first, cosine, gather_rows

    class DifferentialTokenDrop(Reducer):
        """``visual_tokens [B,N,C]``, ``state_prev_tokens [B,N,C]`` -> ``tokens [B,K,C]``,
        ``keep_mask [B,K]`` bool, ``source_index [B,K]`` int64, ``next_state_prev_tokens [B,N,C]``.

        ``threshold``: cosine τ in [-1, 1] for ``mode="absolute"`` (drop ``sim > τ``; lower τ drops
        more); the dropped fraction in [0, 1] for ``mode="relative"`` (drop the ``int(N·τ)`` most
        similar). Raises ValueError for a τ out of range or an unknown mode.
        """

        state = ("prev_tokens",)
        first_frame_full = True

        def __init__(self, k: int, threshold: float = 0.5, mode: str = "absolute"):
            super().__init__(k)
            if mode not in ("absolute", "relative"):
                raise ValueError(f"mode must be 'absolute' or 'relative', got {mode!r}")
            lo = -1.0 if mode == "absolute" else 0.0
            if not lo <= threshold <= 1.0:
                raise ValueError(f"{mode} threshold must be in [{lo:g}, 1], got {threshold}")
            self.threshold = float(threshold)
            self.mode = mode

        def state_shapes(self, b: int, n: int, c: int):
            return {"prev_tokens": ([b, n, c], "float32")}

        def forward(self, visual_tokens: Tensor, state_prev_tokens: Tensor):
            b, n, _ = visual_tokens.shape
            k = min(self.k, n)
            sim = cosine(visual_tokens, state_prev_tokens).clamp(-1.0, 1.0)            # [B, N]
            # the K least similar tokens, most changed first (topk of -sim)
            neg, idx = torch.topk(-sim, k, dim=-1)                                      # [B, K]
            if self.mode == "absolute":
                valid = (-neg) <= self.threshold                                          # kept: sim <= τ
            else:
                n_keep = min(k, n - int(n * self.threshold))
                rank = torch.arange(k, device=idx.device)
                valid = (rank < n_keep)[None].expand(b, k)
            idx, valid = compact_valid_first(idx, valid, n)
            tokens = gather_rows(visual_tokens, idx)
            return tokens, valid, idx, visual_tokens.clone()

    return {"DifferentialTokenDrop": DifferentialTokenDrop}


__getattr__ = _torch.getattr
