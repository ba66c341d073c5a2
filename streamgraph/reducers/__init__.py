"""Token reducers (torch side; exported into engines).

A reducer maps per-frame visual tokens ``[B,N,C]`` to a fixed token budget ``[B,K,C]`` plus
``keep_mask [B,K]`` (bool) and ``source_index [B,K]`` (int64 index of each kept token in the
frame), so every shape stays static (DESIGN.md, "Token reducers").
"""
from streamgraph.reducers.pool import BilinearPool2x, bilinear_pool_2x
from streamgraph.reducers.topk import TopKSaliency, build_reducer

__all__ = ["TopKSaliency", "BilinearPool2x", "bilinear_pool_2x", "build_reducer"]
