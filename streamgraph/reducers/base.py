"""The reducer engine contract, shared helpers, and the reducer registry.

Every token reducer is a torch module exported into one static-shape engine per token
budget K (``reducer_k{K}``). Engine I/O, in this order:

* inputs: ``visual_tokens [B,N,C]`` float32, then the reducer's state tensors
  ``state_<name>`` (see :attr:`Reducer.state`);
* outputs: ``tokens [B,K,C]`` float32, ``keep_mask [B,K]`` bool, ``source_index [B,K]``
  int64, then op-specific extra outputs (:attr:`Reducer.extra_outputs`, e.g. ToMe's
  ``token_size``), then the next state ``next_state_<name>`` for every state input, with
  the same shape and dtype.

Contract (DESIGN.md, "Token reducers"; the decoder step reads valid tokens as a prefix):

* valid tokens form a **prefix** of the K outputs (``keep_mask`` = ``[True]*n + [False]*(K-n)``)
  and are in ascending ``source_index`` order (an order-preserving subsequence of the frame);
  masked tokens are never written to the KV cache;
* ``source_index`` is the index in ``[0, N)`` of the frame token each output row comes from
  (for a merger, the index of the token the group was merged into);
* state is never hidden in an engine: the runtime owns it, starts it at zeros, feeds
  ``state_<name>`` and replaces it with ``next_state_<name>`` after every run. State shapes
  do not depend on K, so the runtime can switch budget buckets between frames.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from streamgraph.compiler.plan import TensorSpec

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
        inputs = [TensorSpec("visual_tokens", "float32", [b, n, c])]
        inputs += [TensorSpec(f"state_{s}", shapes[s][1], list(shapes[s][0])) for s in self.state]
        outputs = [TensorSpec("tokens", "float32", [b, k, c]), TensorSpec("keep_mask", "bool", [b, k]),
                   TensorSpec("source_index", "int64", [b, k])]
        outputs += [TensorSpec(name, dt, [b, k]) for name, dt in self.extra_outputs]
        outputs += [TensorSpec(f"next_state_{s}", shapes[s][1], list(shapes[s][0])) for s in self.state]
        return inputs, outputs


# --------------------------------------------------------------------------- registry

#: op name -> factory(params dict, k) building the torch module of one budget bucket.
REDUCERS: dict[str, Callable[[dict, int], nn.Module]] = {}


def register_reducer(op: str, factory: Callable[[dict, int], nn.Module]) -> None:
    """Register the torch module factory of reducer op ``op`` (``ValueError`` if taken)."""
    if op in REDUCERS:
        raise ValueError(f"reducer {op!r} is already registered")
    REDUCERS[op] = factory


def build_reducer(op: str, params: dict, k: int | None = None) -> nn.Module | None:
    """Torch module of reducer op ``op`` at token budget ``k`` (default: the largest of
    ``params['tokens_per_frame']``), or ``None`` for the identity reducer ``none``.

    Raises KeyError for an op that is not a registered reducer."""
    if op == "none":
        return None
    if op not in REDUCERS:
        raise KeyError(f"not a reducer op: {op!r} (registered: {', '.join(sorted(REDUCERS))})")
    if k is None:
        budget = params.get("tokens_per_frame")
        k = max(budget) if isinstance(budget, list) else budget
    return REDUCERS[op](params, None if k is None else int(k))


def budgets_of(params: dict) -> list[int] | None:
    """Ascending budget buckets of a reducer's params (``tokens_per_frame`` as an int or a
    list), or None when the op has no ``tokens_per_frame``."""
    budget = params.get("tokens_per_frame")
    if budget is None:
        return None
    return sorted(budget) if isinstance(budget, list) else [int(budget)]
