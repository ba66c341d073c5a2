"""KV cache: the static buffer and the cache policies, one file per policy.

``kv/base.py`` holds what every policy shares (:class:`KVBuffer`, :class:`StepPlan`,
:class:`CachePolicy`, :class:`ChunkKind`, :class:`CacheLayout`, the registry
:data:`POLICIES`); each policy file (``full``, ``sink_window``, ``streaming_vlm``, ``rekv``,
``carrier``, ``duo``) holds its graph node, its layout, its policy class and its
registration. Importing this package registers every policy with the compiler's op registry
too. Torch-free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from streamgraph.kv.base import (POLICIES, CacheLayout, CachePolicy, ChunkKind, KVBuffer, KVDims, PolicySpec,
                                 Region, StepPlan, register_policy)
from streamgraph.kv.full import FullCache, FullNode
from streamgraph.kv.sink_window import SinkWindowCache, SinkWindowNode
from streamgraph.kv.streaming_vlm import StreamingVLMCache, StreamingVLMNode
from streamgraph.kv.rekv import BlockStore, RekvCache, RekvNode
from streamgraph.kv.carrier import CarrierCache, CarrierNode
from streamgraph.kv.duo import DuoCache, DuoNode

__all__ = ["POLICIES", "CacheLayout", "CachePolicy", "ChunkKind", "KVBuffer", "KVDims", "PolicySpec", "Region",
           "StepPlan", "register_policy", "make_policy", "FullCache", "FullNode", "SinkWindowCache",
           "SinkWindowNode", "StreamingVLMCache", "StreamingVLMNode", "BlockStore", "RekvCache", "RekvNode",
           "CarrierCache", "CarrierNode", "DuoCache", "DuoNode"]


def make_policy(plan_or_op: Any, params: dict | None = None, plan: Any = None, *,
                store_dir: str | Path | None = None) -> CachePolicy:
    """The runtime cache policy of a plan: ``make_policy(plan)`` (a
    :class:`~streamgraph.compiler.plan.Plan`; its ``cache`` entry names the op, params and
    layout) or ``make_policy(op, params, plan=None)``. ``full`` and ``sink_window`` need only
    their params; the others read their layout (region sizes, facts) and model dims from
    ``plan``. ``store_dir`` is where ``rekv`` spills blocks (default: a temporary directory it
    owns). Raises KeyError for an unknown op and ValueError when a policy needs ``plan`` and
    none is given."""
    if isinstance(plan_or_op, str):
        op, params = plan_or_op, dict(params or {})
    else:
        plan = plan_or_op
        op, params = plan.cache["op"], dict(plan.cache.get("params") or {})
    spec = POLICIES.get(op)
    if spec is None:
        raise KeyError(f"unknown cache policy {op!r} (one of {', '.join(sorted(POLICIES))})")
    layout = CacheLayout.from_dict(plan.cache) if plan is not None else None
    return spec.make(params, layout, plan, store_dir)
