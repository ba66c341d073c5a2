"""``sink_window``: StreamingLLM attention sinks + a recent window, contiguous positions.

One file: the graph node (:class:`SinkWindowNode`), the layout (regions ``sink``,
``window``), the runtime policy (:class:`SinkWindowCache`) and the registration.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from streamgraph.compiler.limits import MAX_CACHE_TOKENS
from streamgraph.compiler.ops import NodeBase, ShapeError
from streamgraph.errors import CapacityError
from streamgraph.kv.base import (CacheContext, CacheLayout, CachePolicy, ChunkKind, PolicySpec, StepPlan,
                                 chunk_kind, region_starts, register_policy, unknown_kind)


class SinkWindowNode(NodeBase):
    """StreamingLLM KV-cache policy: keep the first `sink_tokens` tokens (attention
    sinks) plus a window of the most recent `window_tokens`; capacity = sink + window."""

    op: Literal["sink_window"]
    sink_tokens: int = Field(ge=0, le=MAX_CACHE_TOKENS)
    """Attention-sink slots kept from the start of the stream."""
    window_tokens: int = Field(ge=1, le=MAX_CACHE_TOKENS)
    """Slots of the recent window (evicted oldest first)."""


def sink_window_regions(sink_tokens: int, window_tokens: int) -> dict[str, int]:
    """``sink_window``'s regions: ``sink`` then ``window``."""
    return {"sink": int(sink_tokens), "window": int(window_tokens)}


class SinkWindowCache(CachePolicy):
    """``sink_window`` — StreamingLLM attention sinks + recent window with position shift.

    Source: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR
    2024), mit-han-lab/streaming-llm ``StartRecentKVCache`` + ``pos_shift`` (techniques.md §1).

    Slots ``[0, sink)`` hold the first ``sink`` tokens of the stream forever; slots ``[sink,
    S)`` are a ring over the most recent ``window`` tokens. A chunk of n tokens overwrites the
    n oldest window slots; those are hidden from the chunk (``evict_for_space``: the chunk sees
    the sinks + the ``window - n`` most recent tokens). Positions are re-assigned every step:
    visible slots get their rank in stream order (0..m-1, sinks first), the new tokens m..m+n-1
    — "index in cache" positions, so no gaps, whatever was evicted. Every chunk kind is a
    stream token.
    """

    name = "sink_window"

    def __init__(self, sink_tokens: int, window_tokens: int):
        self._sizes = sink_window_regions(sink_tokens, window_tokens)
        super().__init__(sum(self._sizes.values()))
        self.sink = int(sink_tokens)
        self.window = int(window_tokens)

    def _slot_of(self, seq: np.ndarray) -> np.ndarray:
        return np.where(seq < self.sink, seq, self.sink + (seq - self.sink) % self.window)

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
        if n_valid > self.window:
            raise CapacityError(f"chunk of {n_valid} tokens does not fit the sink_window window of "
                                f"{self.window} tokens")
        seqs = self.tokens_seen + np.arange(n_valid, dtype=np.int64)
        write = self._slot_of(seqs)
        visible = self.slot_seq >= 0
        visible[write] = False                       # evicted to make room for this chunk
        order = np.argsort(np.where(visible, self.slot_seq, np.iinfo(np.int64).max), kind="stable")
        m = int(visible.sum())
        cache_pos = np.zeros(self.capacity, dtype=np.int64)
        cache_pos[order[:m]] = np.arange(m, dtype=np.int64)
        pos = np.arange(m, m + chunk_len, dtype=np.int64)
        return StepPlan(self._pad(write, chunk_len), pos, cache_pos, visible, n_valid)


class SinkWindowSpec(PolicySpec):
    op = "sink_window"
    params = SinkWindowNode

    def region_sizes(self, p: SinkWindowNode, ctx: CacheContext) -> dict[str, int]:
        return sink_window_regions(p.sink_tokens, p.window_tokens)

    def check(self, p: SinkWindowNode, tokens_per_frame: int, decoder: Any) -> None:
        need = max(tokens_per_frame, decoder.prefill_chunk_tokens)
        if p.window_tokens < need:
            raise ShapeError("window_tokens",
                             f"window_tokens {p.window_tokens} must be >= {need} = "
                             f"max(visual tokens per frame {tokens_per_frame}, decoder "
                             f"prefill_chunk_tokens {decoder.prefill_chunk_tokens}) so that a "
                             f"prefill chunk fits in the window")

    def make(self, params, layout: CacheLayout | None, plan, store_dir=None) -> SinkWindowCache:
        return SinkWindowCache(int(params["sink_tokens"]), int(params["window_tokens"]))


register_policy(SinkWindowSpec(), capacity=lambda p: p.sink_tokens + p.window_tokens)
