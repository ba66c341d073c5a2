"""``pool``: LLaVA-OneVision's 2x2 bilinear pooling of a frame's visual-token grid.

LLaVA-OneVision (Li et al., "LLaVA-OneVision: Easy Visual Task Transfer", arXiv:2408.03326:
in its visual representation for video, each frame's 729 SigLIP tokens are bilinearly
interpolated down to 196) does this in transformers' ``LlavaOnevisionModel.apply_pooling``
(``transformers/models/llava_onevision/modeling_llava_onevision.py``)::

    x = feats.view(B, h, w, C).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=[ceil(h / 2), ceil(w / 2)], mode="bilinear")   # align_corners=False
    x = x.permute(0, 2, 3, 1).view(B, -1, C)

For an even side this is the exact mean of each 2x2 cell; for an odd side (SigLIP-so400m at
384 px has a 27x27 grid -> 14x14 = 196 tokens) each output token is a bilinear blend of the
four source tokens around its sample point ``(i + 0.5) * h / ceil(h/2) - 0.5``.

:func:`bilinear_pool_2x` is that function (used inside the encoder engine of ``hf`` models, so
the engine emits exactly transformers' per-frame video features); :class:`BilinearPool2x` is
the same pooling as a token reducer with the reducer contract (``tokens [B,K,C]``,
``keep_mask [B,K]``, ``source_index [B,K]``), for the ``pool`` op.

One plugin file (see :mod:`streamgraph.reducers.base`): params :class:`PoolNode`, shape rule
:func:`pool_shape`, torch module ``BilinearPool2x`` and function ``bilinear_pool_2x``
(defined on first use), registration. The compiler stores the encoder's token grid in the
reducer's params as ``grid``.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from streamgraph.compiler.ops import (NodeBase, NodeRef, OpInfo, PortType, ShapeContext, ShapeError,
                                      TokenShape, register)
from streamgraph.reducers.base import VISUAL_TOKENS_INPUT, torch_part

__all__ = ["PoolNode", "pool_shape", "pooled_grid", "bilinear_pool_2x", "pool_source_index",
           "BilinearPool2x", "build"]


class PoolNode(NodeBase):
    """Token merger: LLaVA-OneVision's 2x2 bilinear pooling of each frame's token grid
    (h x w -> ceil(h/2) x ceil(w/2) tokens; a fixed budget, every token kept)."""

    op: Literal["pool"]
    input: NodeRef
    """Node producing a frame's full token grid (the encoder)."""


def pooled_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """Output grid ``(ceil(h/2), ceil(w/2))`` of the pooling of an ``h x w`` token grid.

    Raises ValueError for a side < 1."""
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1:
        raise ValueError(f"token grid must be at least 1x1, got {h}x{w}")
    return math.ceil(h / 2), math.ceil(w / 2)


def pool_shape(params: PoolNode, inp: TokenShape | None, ctx: ShapeContext) -> TokenShape:
    """K = ceil(h/2) * ceil(w/2) (transformers' ``LlavaOnevisionModel.apply_pooling``), on the
    pooled grid. Raises ShapeError at ``input`` when the input tokens form no raster grid."""
    assert inp is not None
    if inp.grid is None:
        raise ShapeError("input", f"pool needs a raster grid of visual tokens, but its input "
                         f"({inp.n} tokens per frame) has none; put pool directly after the "
                         f"encoder")
    oh, ow = pooled_grid(inp.grid)
    return TokenShape(oh * ow, inp.c, (oh, ow))


def build(params: dict, k: Any = None):
    """Torch module of the pooling of ``params['grid']`` (``k`` is set by the grid; imports
    torch)."""
    return _torch()["BilinearPool2x"](tuple(params["grid"]))


register(OpInfo("pool", "reducer", PoolNode, inputs=VISUAL_TOKENS_INPUT, output=PortType.VISUAL_TOKENS,
                infer_shape=pool_shape, module=build))


# --------------------------------------------------------------------------- torch module

@torch_part(__name__, ("bilinear_pool_2x", "pool_source_index", "BilinearPool2x"))
def _torch() -> dict:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    def bilinear_pool_2x(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``tokens [B, h*w, C]`` (raster order over the ``grid = (h, w)`` patch grid) ->
        ``[B, ceil(h/2)*ceil(w/2), C]``, raster order; same dtype.

        Bit-for-bit the computation of transformers' ``LlavaOnevisionModel.apply_pooling``
        (``F.interpolate(mode="bilinear", align_corners=False)`` to the halved, rounded-up grid).
        Raises ValueError when ``h*w`` is not the token count."""
        b, n, c = tokens.shape
        h, w = int(grid[0]), int(grid[1])
        if h * w != n:
            raise ValueError(f"token grid {h}x{w} does not match {n} tokens")
        x = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=list(pooled_grid(grid)), mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1).reshape(b, -1, c)


    def pool_source_index(grid: tuple[int, int]) -> Tensor:
        """``[K]`` int64: for each pooled token, the raster index in the ``h x w`` source grid of
        the top-left of the 2x2 source neighbourhood its bilinear sample reads, i.e. row
        ``floor(max((i + 0.5) * h / oh - 0.5, 0))`` and column likewise (PyTorch's
        ``align_corners=False`` source coordinate). For even sides that is ``(2i, 2j)``, the
        top-left patch of the 2x2 cell that is averaged. Strictly increasing."""
        h, w = int(grid[0]), int(grid[1])
        oh, ow = pooled_grid(grid)

        def src(i: int, n_in: int, n_out: int) -> int:
            return min(int(math.floor(max((i + 0.5) * n_in / n_out - 0.5, 0.0))), n_in - 1)

        rows = [src(i, h, oh) for i in range(oh)]
        cols = [src(j, w, ow) for j in range(ow)]
        return torch.tensor([r * w + c for r in rows for c in cols], dtype=torch.int64)


    class BilinearPool2x(nn.Module):
        """Reducer ``pool``: ``tokens [B, h*w, C]`` -> ``tokens [B,K,C]``, ``keep_mask [B,K]``
        (all true), ``source_index [B,K]`` int64, with ``K = ceil(h/2) * ceil(w/2)`` — a fixed
        budget set by the grid. See :func:`bilinear_pool_2x` and :func:`pool_source_index`."""

        def __init__(self, grid: tuple[int, int]):
            super().__init__()
            self.grid = (int(grid[0]), int(grid[1]))
            self.k = pooled_grid(self.grid)[0] * pooled_grid(self.grid)[1]
            self.register_buffer("source_index", pool_source_index(self.grid), persistent=False)

        def forward(self, tokens: Tensor):
            b = tokens.shape[0]
            pooled = bilinear_pool_2x(tokens, self.grid)
            keep_mask = torch.ones(b, self.k, dtype=torch.bool, device=tokens.device)
            index = self.source_index[None].expand(b, self.k)
            return pooled, keep_mask, index

    return {"bilinear_pool_2x": bilinear_pool_2x, "pool_source_index": pool_source_index,
            "BilinearPool2x": BilinearPool2x}


__getattr__ = _torch.getattr
