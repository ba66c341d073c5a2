"""What every reducer plugin shares, torch-free: the engine contract, the budget shape rule,
the module factory lookup and the lazy definition of a plugin's torch part.

A reducer is one plugin file ``streamgraph/reducers/<op>.py`` holding its parameters (the
graph node, a :class:`~streamgraph.compiler.ops.NodeBase`), its shape rule, its torch module
and its registration (one :func:`~streamgraph.compiler.ops.register` call whose
``OpInfo.module`` builds the module). Importing a plugin never imports torch: the graph
checks (``streamgraph validate``) and the bundle checks of the torch-free runtime read the
registry. The torch part of a plugin is defined by a function run on first use
(:func:`torch_part`): ``build(params, k)`` calls it, and so does a module attribute lookup of
one of its names (``from streamgraph.reducers.dtd import DifferentialTokenDrop``, PEP 562).

Every token reducer is exported into one static-shape engine per token budget K
(``reducer_k{K}``). Engine I/O, in this order:

* inputs: ``visual_tokens [B,N,C]`` float32, then the reducer's state tensors
  ``state_<name>`` (see :attr:`streamgraph.reducers.nn.Reducer.state`);
* outputs: ``tokens [B,K,C]`` float32, ``keep_mask [B,K]`` bool, ``source_index [B,K]``
  int64, then op-specific extra outputs (``Reducer.extra_outputs``, e.g. ToMe's
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

import functools
from typing import Any, Callable

from streamgraph.compiler.ops import (OPS, Port, PortType, ShapeContext, ShapeError, TokenShape,
                                      budget_values)

__all__ = ["VISUAL_TOKENS_INPUT", "budget_shape", "build_reducer", "budgets_of", "reducer_factories",
           "torch_part"]

#: The input port of a token reducer: the visual tokens of an encoder (or another reducer).
VISUAL_TOKENS_INPUT = (Port("input", PortType.VISUAL_TOKENS),)


def budget_shape(params: Any, inp: TokenShape | None, ctx: ShapeContext) -> TokenShape:
    """Shape rule of a reducer with a ``tokens_per_frame`` budget: ``[K, C]`` tokens per frame,
    K the largest bucket. Raises :class:`~streamgraph.compiler.ops.ShapeError` at
    ``tokens_per_frame`` when K exceeds the N tokens of the input."""
    assert inp is not None
    k = max(budget_values(params.tokens_per_frame))
    if k > inp.n:
        raise ShapeError("tokens_per_frame",
                         f"token budget {k} exceeds the {inp.n} visual tokens per frame "
                         f"the encoder emits")
    return TokenShape(k, inp.c)


def torch_part(module: str, names: tuple[str, ...]) -> Callable[[Callable[[], dict]], Callable[[], dict]]:
    """Decorator of a plugin's torch section: ``define() -> {name: object}`` imports torch and
    defines the plugin's module classes and torch helpers; it runs once, on first use.

    Returns the cached ``define``; its ``getattr`` attribute is a module ``__getattr__``
    (PEP 562) that resolves exactly ``names`` through it, so ``from <module> import Name``
    works without defining anything at import time. Usage::

        @torch_part(__name__, ("TokenMerging",))
        def _torch() -> dict: ...
        __getattr__ = _torch.getattr
    """
    def wrap(define: Callable[[], dict]) -> Callable[[], dict]:
        @functools.cache
        def cached() -> dict:
            defined = define()
            for name, obj in defined.items():   # named as if defined at the module's top level
                if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
                    obj.__module__, obj.__qualname__ = module, name
            return defined

        def __getattr__(name: str) -> Any:
            if name in names:
                return cached()[name]
            raise AttributeError(f"module {module!r} has no attribute {name!r}")

        cached.getattr = __getattr__  # type: ignore[attr-defined]
        return cached
    return wrap


def reducer_factories() -> dict[str, Callable[[dict, int], Any]]:
    """op name -> module factory ``(params dict, k) -> torch module`` of every registered
    reducer with a torch module (every reducer but the identity ``none``)."""
    return {name: info.module for name, info in OPS.items()
            if info.kind == "reducer" and info.module is not None}


def build_reducer(op: str, params: dict, k: int | None = None) -> Any:
    """Torch module of reducer op ``op`` at token budget ``k`` (default: the largest of
    ``params['tokens_per_frame']``), or ``None`` for the identity reducer ``none``. Imports
    torch (through the plugin's torch part).

    Raises KeyError for an op that is not a registered reducer."""
    if op == "none":
        return None
    factories = reducer_factories()
    if op not in factories:
        raise KeyError(f"not a reducer op: {op!r} (registered: {', '.join(sorted(factories))})")
    if k is None:
        budget = params.get("tokens_per_frame")
        k = max(budget) if isinstance(budget, list) else budget
    return factories[op](params, None if k is None else int(k))


def budgets_of(params: dict) -> list[int] | None:
    """Ascending budget buckets of a reducer's params (``tokens_per_frame`` as an int or a
    list), or None when the op has no ``tokens_per_frame``."""
    budget = params.get("tokens_per_frame")
    if budget is None:
        return None
    return sorted(budget) if isinstance(budget, list) else [int(budget)]
