"""Token reducers and encoder reuse: one plugin file per op, registered on import.

A reducer maps per-frame visual tokens ``[B,N,C]`` to a fixed token budget ``[B,K,C]`` plus
``keep_mask [B,K]`` (bool) and ``source_index [B,K]`` (int64 index of each kept token in the
frame), so every shape stays static (DESIGN.md, "Token reducers"). The engine contract
(valid tokens first, state as engine I/O) is in :mod:`streamgraph.reducers.base`.

Plugins (each: params, shape rule, torch module, registration): ``topk_saliency``
(:mod:`.topk_saliency`), ``dtd`` (:mod:`.dtd`, TimeChat-Online), ``stc_pruner``
(:mod:`.stc_pruner`), ``tome`` (:mod:`.tome`), ``pool`` (:mod:`.pool`, LLaVA-OneVision's 2x2
bilinear video pooling; its token grid comes from the encoder's shape, stored by the compiler
as ``params['grid']``) and the encoder with reuse ``stc_cacher`` (:mod:`.stc_cacher`). The
identity reducer ``none`` is built into :mod:`streamgraph.compiler.ops`.

Importing this package does not import torch (the compiler's graph checks and the runtime's
bundle checks read the registry); the torch modules are defined on first use. Adding a
reducer is one file here plus its line below.
"""
from streamgraph.reducers import dtd, pool, stc_cacher, stc_pruner, tome, topk_saliency  # noqa: F401  (register)
from streamgraph.reducers.base import budgets_of, build_reducer, reducer_factories

#: op name -> module factory ``(params dict, k) -> torch module`` of every reducer plugin.
REDUCERS = reducer_factories()

#: Torch names re-exported from the plugins (defined on first access, PEP 562).
_TORCH_NAMES = {"TopKSaliency": topk_saliency, "DifferentialTokenDrop": dtd, "STCPruner": stc_pruner,
                "TokenMerging": tome, "BilinearPool2x": pool, "bilinear_pool_2x": pool}

__all__ = ["REDUCERS", "budgets_of", "build_reducer", *_TORCH_NAMES]


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        return getattr(_TORCH_NAMES[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
