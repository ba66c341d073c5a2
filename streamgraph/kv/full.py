"""``full``: every token kept at its absolute stream position until the buffer is full.

One file: the graph node (:class:`FullNode`), the layout (one region ``cache``), the runtime
policy (:class:`FullCache`) and the registration.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from streamgraph.compiler.limits import MAX_CACHE_TOKENS
from streamgraph.compiler.ops import NodeBase
from streamgraph.kv.base import (AppendCache, CacheContext, CacheLayout, ChunkKind, PolicySpec, StepPlan,
                                 chunk_kind, region_starts, register_policy, unknown_kind)


class FullNode(NodeBase):
    """KV-cache policy: keep every token until the cache is full (then the session
    raises a capacity error)."""

    op: Literal["full"]
    capacity_tokens: int = Field(ge=1, le=MAX_CACHE_TOKENS)
    """Capacity of the KV cache in slots."""


def full_regions(capacity_tokens: int) -> dict[str, int]:
    """``full``'s regions: one ``cache`` region of ``capacity_tokens`` slots."""
    return {"cache": int(capacity_tokens)}


class FullCache(AppendCache):
    """``full``: every token is kept at its absolute stream position until the buffer is
    full, then :class:`CapacityError` (no eviction). Every chunk kind is a stream token."""

    name = "full"

    def __init__(self, capacity: int):
        self._sizes = full_regions(capacity)
        super().__init__(sum(self._sizes.values()))

    def regions(self) -> dict[str, tuple[int, int]]:
        return region_starts(self._sizes)

    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None,
                  kind: str | None = None) -> StepPlan:
        match chunk_kind(kind, self.name):
            case (None | ChunkKind.PREFIX | ChunkKind.FRAME | ChunkKind.RETRIEVAL | ChunkKind.VIDEO_END
                  | ChunkKind.QUESTION | ChunkKind.DECODE | ChunkKind.RESUME):
                pass                                     # every token is a stream token
            case other:
                raise unknown_kind(self.name, other)
        return self.plan_append(chunk_len, n_valid, offsets)


class FullSpec(PolicySpec):
    op = "full"
    params = FullNode

    def region_sizes(self, p: FullNode, ctx: CacheContext) -> dict[str, int]:
        return full_regions(p.capacity_tokens)

    def make(self, params, layout: CacheLayout | None, plan, store_dir=None) -> FullCache:
        return FullCache(int(params["capacity_tokens"]))


register_policy(FullSpec(), capacity=lambda p: p.capacity_tokens)
