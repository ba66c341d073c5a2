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
from streamgraph.errors import CapacityError
from streamgraph.kv.base import (CacheContext, CacheLayout, CachePolicy, ChunkKind, PolicySpec, StepPlan,
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


class FullCache(CachePolicy):
    """``full``: every token is kept at its absolute stream position until the buffer is
    full, then :class:`CapacityError` (no eviction). Every chunk kind is a stream token."""

    name = "full"

    def __init__(self, capacity: int):
        self._sizes = full_regions(capacity)
        super().__init__(sum(self._sizes.values()))
        self.next_position = 0

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
        used = self.tokens_seen
        if used + n_valid > self.capacity:
            raise CapacityError(
                f"KV cache full: policy {self.name!r} has {self.capacity} slots, {used} in use, and the next "
                f"chunk needs {n_valid}; raise capacity_tokens or use an evicting policy (sink_window)")
        rel = np.arange(n_valid, dtype=np.int64) if offsets is None else np.asarray(offsets, np.int64)
        positions = self.next_position + rel
        write = np.arange(used, used + n_valid, dtype=np.int64)
        pos = np.zeros(chunk_len, dtype=np.int64)
        pos[:n_valid] = positions
        if n_valid < chunk_len:
            pos[n_valid:] = positions[-1] + 1 if n_valid else self.next_position
        return StepPlan(self._pad(write, chunk_len), pos, self.slot_pos.copy(), self.slot_seq >= 0, n_valid)

    def commit(self, plan: StepPlan, outputs: dict[str, np.ndarray] | None = None) -> None:
        super().commit(plan)
        if plan.n_new:
            self.next_position = int(plan.positions[plan.n_new - 1]) + 1

    def reserve_positions(self, n: int) -> None:
        self.next_position += int(n)


class FullSpec(PolicySpec):
    op = "full"
    params = FullNode

    def region_sizes(self, p: FullNode, ctx: CacheContext) -> dict[str, int]:
        return full_regions(p.capacity_tokens)

    def make(self, params, layout: CacheLayout | None, plan, store_dir=None) -> FullCache:
        return FullCache(int(params["capacity_tokens"]))


register_policy(FullSpec(), capacity=lambda p: p.capacity_tokens)
