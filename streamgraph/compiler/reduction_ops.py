"""Registry entries of the token-reduction ops: ``dtd``, ``stc_pruner``, ``tome`` (token
reducers) and ``stc_cacher`` (an encoder with STC-Cacher reuse). Imported by
:mod:`streamgraph.compiler.ops`; torch-free. The torch modules behind them are in
:mod:`streamgraph.reducers`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from streamgraph.compiler.ops import (NodeBase, NodeRef, OpInfo, Port, PortType, TokenBudget,
                                      TokenShape, _budget_shape, _encoder_shape, register)

__all__ = ["DtdNode", "StcPrunerNode", "TomeNode", "StcCacherNode"]


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
    refresh_every: int = Field(2, ge=1, le=1 << 20)  # limits.MAX_COUNT
    """A refresh (full encode that stores new reference buffers) every this many encoded
    frames; 1 = every frame (no reuse)."""
    skip_threshold: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    """Frame-level skip: reuse the last encoded frame's visual tokens outright when the mean
    absolute pixel difference (resized RGB in [0, 1]) to that frame is below this; 0
    disables."""


def _dtd_frame_tokens(params: DtdNode, inp: TokenShape) -> int:
    return inp.n  # the first frame of a stream is kept whole


_VT = (Port("input", PortType.VISUAL_TOKENS),)
register(OpInfo("dtd", "reducer", DtdNode, inputs=_VT, output=PortType.VISUAL_TOKENS,
                infer_shape=_budget_shape, frame_tokens=_dtd_frame_tokens))
register(OpInfo("stc_pruner", "reducer", StcPrunerNode, inputs=_VT, output=PortType.VISUAL_TOKENS,
                infer_shape=_budget_shape))
register(OpInfo("tome", "reducer", TomeNode, inputs=_VT, output=PortType.VISUAL_TOKENS,
                infer_shape=_budget_shape))
register(OpInfo("stc_cacher", "encoder", StcCacherNode, inputs=(Port("input", PortType.FRAMES),),
                output=PortType.VISUAL_TOKENS, infer_shape=_encoder_shape))

