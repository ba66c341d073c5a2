"""``duo``: DuoAttention — retrieval heads keep the full cache, streaming heads see only
attention sinks + a recent window.

Source: Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads" (ICLR 2025), mit-han-lab/duo-attention ``duo_attn/patch/llama.py``
(``llama_duo_attention_forward_one_way_reordered``), ``duo_attn/patch/static_kv_cache.py``
(``DuoAttentionStaticKVCache``), ``duo_attn/utils.py`` (``load_attn_pattern``,
``sparsify_attention_heads``); techniques.md section 7.

One file: the graph node (:class:`DuoNode`), the head roles (:func:`load_pattern`,
:func:`head_roles`), the layout (one region ``cache``; the roles are a layout fact), the
runtime policy (:class:`DuoCache`) and the registration.

Semantics (the reference's, as read):

* **Head roles** are per (layer, KV head): a gate ``alpha[L, Hkv]`` (the reference's
  ``full_attention_heads.tsv``, clipped to [0, 1]) thresholded — ``alpha >= threshold`` is a
  retrieval head (default 0.5) — or, with ``sparsity`` s, the ``ceil((n-1)·s)`` heads of
  smallest alpha (of n = L·Hkv) are streaming, which is the count the reference's
  ``threshold = quantile(alpha, s)`` gives for distinct values (it breaks ties with
  U(0, 1e-6) noise; here ties go to the lower (layer, head) index, deterministically).
  ``s >= 1``: every head streams; ``s <= 0``: none. The query heads of a KV head's GQA group
  share its role.
* **Positions**: every token keeps its original stream position (the reference applies
  RoPE before caching and never re-assigns positions), as ``full``.
* **Visibility**: a retrieval head attends to every cached token; a streaming head to the
  first ``sink_tokens`` tokens of the stream and the ``recent_tokens`` most recent tokens
  before the chunk, plus the chunk itself causally (the reference appends the chunk to the
  compressed streaming cache — sink + recent — attends with ``causal=True``, then keeps
  sink + the last ``recent`` again). The engine gets this as ``window_valid [B,S]`` and the
  roles as ``streaming_heads [L,Hkv]``.
* **Capacity**: tokens never leave the retrieval heads' full cache: when the buffer is full
  the next chunk raises :class:`~streamgraph.errors.CapacityError`, as the reference's
  static cache raises when ``max_size`` is exceeded (``put_full_kv``).

Cost: the KV buffer is shared by all heads (``kv_cache[L,2,B,Hkv,S,Dh]``), so a streaming
head's slots outside its window are stored but never read, and the engine's dense attention
masks them rather than skipping them. This reproduces DuoAttention's *semantics* (what each
head sees, hence its accuracy) but saves neither its memory nor its attention work yet (the
reference keeps streaming heads in a separate ``[sink+recent]`` cache and attends over it
with a smaller kernel).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from streamgraph.compiler.limits import MAX_CACHE_TOKENS, MAX_COUNT
from streamgraph.compiler.ops import NodeBase, ShapeError
from streamgraph.kv.base import (AppendCache, CacheContext, CacheLayout, ChunkKind, KVDims, PolicySpec, StepPlan,
                                 chunk_kind, region_starts, register_policy, unknown_kind)

#: the reference's pattern file name inside a pattern directory
PATTERN_FILE = "full_attention_heads.tsv"


class DuoNode(NodeBase):
    """DuoAttention KV-cache policy: retrieval heads attend to the full cache (every token
    kept at its stream position, capacity error when full, as `full`); streaming heads
    attend only to the first `sink_tokens` tokens and the `recent_tokens` most recent ones.
    Head roles per (layer, KV head) come from a gate pattern file (`pattern`, with
    `threshold` or `sparsity`), an explicit `streaming_heads` list, or a `sparsity` alone
    (heads chosen deterministically). Capacity = capacity_tokens.

    Source: Xiao et al., "DuoAttention" (ICLR 2025), mit-han-lab/duo-attention
    `duo_attn/patch/llama.py`, `duo_attn/patch/static_kv_cache.py` (techniques.md section 7)."""

    op: Literal["duo"]
    capacity_tokens: int = Field(ge=1, le=MAX_CACHE_TOKENS)
    """Capacity of the KV cache in slots (the retrieval heads' full cache)."""
    sink_tokens: int = Field(64, ge=0, le=MAX_CACHE_TOKENS)
    """Attention-sink tokens a streaming head sees: the first of the stream (DuoAttention
    sink_size = 64)."""
    recent_tokens: int = Field(256, ge=1, le=MAX_CACHE_TOKENS)
    """Most recent tokens a streaming head sees before each chunk (DuoAttention
    recent_size = 256)."""
    pattern: str | None = Field(None, min_length=1)
    """Gate pattern: DuoAttention's `full_attention_heads.tsv` (a tab-separated [layers x KV
    heads] matrix of gate values), a directory holding one, or a `.npy` array of that shape;
    relative to the graph file. Values are clipped to [0, 1]; a head is a retrieval head when
    its gate is >= `threshold`, or see `sparsity`."""
    threshold: float = Field(0.5, ge=0, le=1, allow_inf_nan=False)
    """Gate threshold with `pattern`: gate >= threshold is a retrieval head (default 0.5)."""
    sparsity: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    """Fraction of (layer, KV head) pairs made streaming. With `pattern`: the heads of
    smallest gate (overrides `threshold`, as DuoAttention's `sparsify_attention_heads`);
    alone: ceil((n-1) x sparsity) of the n heads, KV head 0 of every layer first, then KV
    head 1, ... (deterministic, spread over the layers)."""
    streaming_heads: list[Annotated[list[Annotated[int, Field(ge=0, le=MAX_COUNT)]],
                                    Field(min_length=2, max_length=2)]] | None = Field(None, max_length=MAX_COUNT)
    """Explicit streaming heads as `[layer, kv_head]` pairs; every other head is a retrieval
    head. Not with `pattern` or `sparsity`."""

    @model_validator(mode="after")
    def _one_source(self) -> "DuoNode":
        if self.pattern is not None and self.streaming_heads is not None:
            raise ValueError("give at most one of 'pattern' or 'streaming_heads', got both")
        if self.sparsity is not None and self.streaming_heads is not None:
            raise ValueError("'sparsity' chooses heads; it cannot be combined with 'streaming_heads'")
        if self.pattern is None and self.streaming_heads is None and self.sparsity is None:
            raise ValueError("duo needs head roles: give 'pattern', 'streaming_heads' or 'sparsity'")
        return self


def duo_regions(capacity_tokens: int) -> dict[str, int]:
    """``duo``'s regions: one ``cache`` region shared by every head."""
    return {"cache": int(capacity_tokens)}


def load_pattern(path: str | Path) -> np.ndarray:
    """The gate matrix ``alpha [L, Hkv]`` float64 of a pattern: a TSV file (DuoAttention's
    ``full_attention_heads.tsv``), a directory holding one, or a ``.npy`` file; clipped to
    [0, 1] as the reference's ``load_attn_pattern``. Raises ValueError (one line) when the file
    is missing, unreadable, not 2-D or not finite."""
    p = Path(path)
    if p.is_dir():
        p = p / PATTERN_FILE
    if not p.is_file():
        raise ValueError(f"pattern file {str(p)!r} does not exist")
    try:
        a = np.load(p, allow_pickle=False) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.float64, delimiter="\t",
                                                                                 ndmin=2)
    except (OSError, ValueError) as e:
        raise ValueError(f"pattern file {str(p)!r} is not readable: {str(e).splitlines()[0] if str(e) else e}") from None
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"pattern file {str(p)!r} holds a {a.ndim}-D array; expected [layers, kv_heads]")
    if not np.isfinite(a).all():
        raise ValueError(f"pattern file {str(p)!r} holds NaN or infinite values")
    return np.clip(a, 0.0, 1.0)


def head_roles(num_layers: int, num_kv_heads: int, *, alpha: np.ndarray | None = None, threshold: float = 0.5,
               sparsity: float | None = None, streaming_heads: list[list[int]] | None = None) -> np.ndarray:
    """``streaming [L, Hkv]`` bool (True = streaming head) from a gate matrix ``alpha``
    (thresholded, or the ``ceil((n-1)·sparsity)`` smallest streaming), an explicit list of
    ``[layer, kv_head]`` pairs, or ``sparsity`` alone (KV head 0 of every layer first, then
    KV head 1, ...). Raises ValueError (one line) for a pattern of the wrong shape or a pair
    out of range."""
    L, H = int(num_layers), int(num_kv_heads)
    out = np.zeros((L, H), dtype=bool)
    if streaming_heads is not None:
        for layer, head in streaming_heads:
            if not (0 <= layer < L and 0 <= head < H):
                raise ValueError(f"streaming head [{layer}, {head}] is out of range: the model has {L} layers "
                                 f"and {H} KV heads")
            out[layer, head] = True
        return out
    if alpha is not None and alpha.shape != (L, H):
        raise ValueError(f"pattern has shape {list(alpha.shape)} but the model has {L} layers x {H} KV heads")
    if sparsity is None:
        assert alpha is not None
        return ~(alpha >= threshold)
    n = L * H
    k = 0 if sparsity <= 0 else n if sparsity >= 1 else math.ceil((n - 1) * sparsity - 1e-12)
    if alpha is not None:
        order = np.lexsort((np.arange(n), alpha.reshape(-1)))       # gate ascending, then index
    else:
        order = np.arange(n).reshape(L, H).T.reshape(-1)            # head 0 of every layer, then head 1...
    out.reshape(-1)[order[:k]] = True
    return out


class DuoCache(AppendCache):
    """``duo`` — DuoAttention over one shared buffer (see the module docstring).

    ``streaming_heads [L, Hkv]`` bool: True for a streaming KV head. Slots are filled in
    stream order at their stream positions, exactly as ``full`` (both are
    :class:`~streamgraph.kv.base.AppendCache`s)
    (retrieval heads see ``cache_valid``); every step also plans ``window_valid [S]``: the
    slots of the first ``sink_tokens`` tokens and of the ``recent_tokens`` most recent tokens
    before the chunk (streaming heads). Every chunk kind is a stream token (DuoAttention keeps
    questions and answers in the cache). Raises :class:`CapacityError` when the buffer is
    full, ValueError for a ``streaming_heads`` that is not 2-D.
    """

    name = "duo"

    def __init__(self, capacity: int, sink_tokens: int, recent_tokens: int, streaming_heads: np.ndarray):
        self._sizes = duo_regions(capacity)
        super().__init__(sum(self._sizes.values()))
        self.sink, self.recent = int(sink_tokens), int(recent_tokens)
        heads = np.asarray(streaming_heads, dtype=bool)
        if heads.ndim != 2:
            raise ValueError(f"duo streaming_heads must be [layers, kv_heads], got shape {list(heads.shape)}")
        self.streaming_heads = heads

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
        step = self.plan_append(chunk_len, n_valid, offsets)
        seq = self.slot_seq
        step.window_valid = step.cache_valid & ((seq < self.sink) | (seq >= self.tokens_seen - self.recent))
        return step


class DuoSpec(PolicySpec):
    op = "duo"
    params = DuoNode

    def region_sizes(self, p: DuoNode, ctx: CacheContext) -> dict[str, int]:
        return duo_regions(p.capacity_tokens)

    def facts(self, p: DuoNode, ctx: CacheContext, dims: KVDims) -> dict[str, Any]:
        """``streaming_heads`` ([L][Hkv] bools, resolved here so the bundle needs no pattern
        file), ``sink_tokens``, ``recent_tokens``, ``streaming_fraction``."""
        alpha = None
        if p.pattern is not None:
            path = Path(p.pattern).expanduser()
            if not path.is_absolute() and ctx.base_dir is not None:
                path = Path(ctx.base_dir) / path
            try:
                alpha = load_pattern(path)
            except ValueError as e:
                raise ShapeError("pattern", str(e)) from None
        try:
            heads = head_roles(dims.num_layers, dims.num_kv_heads, alpha=alpha, threshold=p.threshold,
                               sparsity=p.sparsity, streaming_heads=p.streaming_heads)
        except ValueError as e:
            raise ShapeError("streaming_heads" if p.streaming_heads is not None else "pattern", str(e)) from None
        return {"streaming_heads": heads.tolist(), "sink_tokens": p.sink_tokens, "recent_tokens": p.recent_tokens,
                "streaming_fraction": float(heads.mean())}

    def make(self, params, layout: CacheLayout | None, plan, store_dir=None) -> DuoCache:
        layout = self._need(layout)
        f = layout.facts
        return DuoCache(layout.capacity, int(f["sink_tokens"]), int(f["recent_tokens"]),
                        np.asarray(f["streaming_heads"], dtype=bool))


register_policy(DuoSpec(), capacity=lambda p: p.capacity_tokens)
