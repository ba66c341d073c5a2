"""Token reducers and encoder reuse (torch side; exported into engines).

A reducer maps per-frame visual tokens ``[B,N,C]`` to a fixed token budget ``[B,K,C]`` plus
``keep_mask [B,K]`` (bool) and ``source_index [B,K]`` (int64 index of each kept token in the
frame), so every shape stays static (DESIGN.md, "Token reducers"). The engine contract
(valid tokens first, state as engine I/O) is in :mod:`streamgraph.reducers.base`.

Ops: ``topk_saliency`` (:mod:`.topk`), ``dtd`` (:mod:`.dtd`, TimeChat-Online), ``stc_pruner``
(:mod:`.stc_pruner`), ``tome`` (:mod:`.tome`); encoder reuse ``stc_cacher``
(:mod:`.stc_cacher`); ``pool`` (:mod:`.pool`, LLaVA-OneVision's 2x2 bilinear video pooling;
its token grid comes from the encoder's shape, stored by the compiler as ``params['grid']``).
"""
from streamgraph.reducers import dtd, stc_pruner, tome, topk
from streamgraph.reducers.base import REDUCERS, Reducer, budgets_of, build_reducer, register_reducer
from streamgraph.reducers.dtd import DifferentialTokenDrop
from streamgraph.reducers.pool import BilinearPool2x, bilinear_pool_2x
from streamgraph.reducers.stc_pruner import STCPruner
from streamgraph.reducers.tome import TokenMerging
from streamgraph.reducers.topk import TopKSaliency

register_reducer("topk_saliency", topk._build)
register_reducer("dtd", dtd._build)
register_reducer("stc_pruner", stc_pruner._build)
register_reducer("tome", tome._build)
register_reducer("pool", lambda params, k: BilinearPool2x(tuple(params["grid"])))

__all__ = ["REDUCERS", "Reducer", "TopKSaliency", "DifferentialTokenDrop", "STCPruner", "TokenMerging", "BilinearPool2x", "bilinear_pool_2x",
           "budgets_of", "build_reducer", "register_reducer"]
