"""Torch building blocks of the reducer plugins' modules: the :class:`Reducer` base (the engine
I/O contract of :mod:`streamgraph.reducers.base` as a module) and static-shape helpers.

Imports torch: only the plugins' torch parts import this module (on first use), never the
registry."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from streamgraph.compiler.plan import TensorSpec
from streamgraph.contract import KEEP_MASK, SOURCE_INDEX, TOKENS, VISUAL_TOKENS

#: Default eps of :func:`torch.nn.functional.cosine_similarity` (used by the reference code).
COS_EPS = 1e-8


def cosine(a: Tensor, b: Tensor, eps: float = COS_EPS) -> Tensor:
    """Cosine similarity along the last axis, as :func:`torch.nn.functional.cosine_similarity`
    computes it (each norm clamped to ``eps``), written with plain ops so it exports to ONNX
    and broadcasts. ``a [...,C]``, ``b [...,C]`` -> ``[...]`` in their dtype."""
    na = a.pow(2).sum(-1).sqrt().clamp(min=eps)
    nb = b.pow(2).sum(-1).sqrt().clamp(min=eps)
    return (a * b).sum(-1) / (na * nb)


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / max(||x||, eps)`` along the last axis (:func:`torch.nn.functional.normalize`)."""
    return x / x.pow(2).sum(-1, keepdim=True).sqrt().clamp(min=eps)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B,N,C]``, ``idx [B,K]`` int64 -> ``x[b, idx[b, k], :]`` as ``[B,K,C]``."""
    b, k = idx.shape
    return torch.gather(x, 1, idx[..., None].expand(b, k, x.shape[-1]))


def compact_valid_first(idx: Tensor, valid: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Reorder ``idx [B,K]`` (distinct token indices in ``[0, n)``) so that the entries with
    ``valid [B,K]`` come first, each group in ascending index order.

    Returns ``(idx, valid)`` reordered. Static-shape: a sort on the key ``idx + n * ~valid``.
    """
    key = idx + n * (~valid).to(idx.dtype)
    order = torch.argsort(key, dim=-1)
    return torch.gather(idx, 1, order), torch.gather(valid, 1, order)


class Reducer(nn.Module):
    """Base class of the token reducers (one instance per token budget ``k``).

    Subclasses set :attr:`state` (state tensor names, shapes from :meth:`state_shapes`),
    :attr:`extra_outputs` and, for DTD, :attr:`first_frame_full`, and implement
    ``forward(visual_tokens, *state) -> (tokens, keep_mask, source_index, *extras,
    *next_state)``.
    """

    #: Names of state tensors (engine inputs ``state_<name>``, outputs ``next_state_<name>``).
    state: tuple[str, ...] = ()
    #: ``(name, dtype)`` of extra per-token outputs of shape ``[B,K]``.
    extra_outputs: tuple[tuple[str, str], ...] = ()
    #: True when the first frame of a stream is sent whole (N tokens), as DTD does.
    first_frame_full: bool = False

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"token budget must be >= 1, got {k}")
        self.k = int(k)

    def state_shapes(self, b: int, n: int, c: int) -> dict[str, tuple[list[int], str]]:
        """``{name: (shape, dtype)}`` of each state tensor for batch ``b``, ``n`` tokens of
        ``c`` channels."""
        return {}

    def io(self, b: int, n: int, c: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Engine inputs and outputs (plan :class:`TensorSpec` lists), in forward order."""
        k, shapes = self.k, self.state_shapes(b, n, c)
        inputs = [TensorSpec(VISUAL_TOKENS, "float32", [b, n, c])]
        inputs += [TensorSpec(f"state_{s}", shapes[s][1], list(shapes[s][0])) for s in self.state]
        outputs = [TensorSpec(TOKENS, "float32", [b, k, c]), TensorSpec(KEEP_MASK, "bool", [b, k]),
                   TensorSpec(SOURCE_INDEX, "int64", [b, k])]
        outputs += [TensorSpec(name, dt, [b, k]) for name, dt in self.extra_outputs]
        outputs += [TensorSpec(f"next_state_{s}", shapes[s][1], list(shapes[s][0])) for s in self.state]
        return inputs, outputs
