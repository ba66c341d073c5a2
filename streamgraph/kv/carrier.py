"""``carrier``: VideoScan — one semantic carrier token per frame in a fixed carrier memory.

One file: the graph node (:class:`CarrierNode`), the layout (regions ``sink``, ``carriers``,
``question``; the carrier embeddings' host bytes), the runtime policy (:class:`CarrierCache`)
and the registration.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from streamgraph.compiler.limits import MAX_CACHE_TOKENS
from streamgraph.compiler.ops import NodeBase, ShapeError
from streamgraph.errors import CapacityError
from streamgraph.kv.base import (CacheContext, CacheLayout, CachePolicy, ChunkKind, KVDims, PolicySpec, StepPlan,
                                 chunk_kind, region_starts, register_policy, unknown_kind)


class CarrierNode(NodeBase):
    """VideoScan KV-cache policy: each frame is prefilled with one carrier token (the mean
    of its visual tokens) appended; only the carrier's KV is kept, in a carrier memory of
    `carriers` slots; when it is full, the earlier carrier of the most similar adjacent
    pair (cosine of carrier embeddings) is dropped. Positions are fixed at insertion
    (cache length). Capacity = sink + carriers + question.

    Source: Li et al., "VideoScan" (2025), LyliAgave/VideoScan `llava/model/llava_arch.py`
    (`prepare_inputs_wo_last_frame`, MAX_MEMORY_LIMIT = 64) and `llava/video_streamer.py`
    (techniques.md section 8)."""

    op: Literal["carrier"]
    sink_tokens: int = Field(128, ge=1, le=MAX_CACHE_TOKENS)
    """Slots for the system prompt at the start of the stream, kept forever."""
    carriers: int = Field(64, ge=2, le=MAX_CACHE_TOKENS)
    """Carrier memory in slots (VideoScan MAX_MEMORY_LIMIT = 64): after each frame at most
    `carriers - 1` carriers remain."""
    question_tokens: int = Field(256, ge=1, le=MAX_CACHE_TOKENS)
    """Slots for the question prompt plus the answer (discarded after the answer)."""


def carrier_regions(sink_tokens: int, carriers: int, question_tokens: int) -> dict[str, int]:
    """``carrier``'s regions: ``sink``, ``carriers``, ``question``."""
    return {"sink": int(sink_tokens), "carriers": int(carriers), "question": int(question_tokens)}


class CarrierCache(CachePolicy):
    """``carrier`` — VideoScan: one semantic carrier token per frame in a fixed carrier
    memory.

    Source: Li et al., "VideoScan: Enabling Efficient Streaming Video Understanding via
    Frame-level Semantic Carriers" (2025), LyliAgave/VideoScan ``llava/model/llava_arch.py``
    (``prepare_inputs_wo_last_frame``, ``MAX_MEMORY_LIMIT = 64``) and
    ``llava/video_streamer.py`` (``set_past_key_values``); techniques.md §8.

    Regions (slots): ``sink`` the system prompt (``"prefix"`` tokens), kept forever;
    ``carriers`` the carrier memory; ``question`` the question prompt and answer.

    Per frame, :meth:`prepare_frame` appends the carrier embedding — the mean of the frame's
    valid visual tokens ``[C]`` — after them. The chunk [frame tokens | carrier] is prefilled
    at positions continuing from the cache length (the number of visible slots: sink +
    carriers), attending to sink + carriers and causally to itself; only the carrier's KV is
    written (the frame tokens' KV is discarded), and its position stays fixed (the reference
    caches rotated keys and never re-rotates them). When the memory then holds ``carriers``
    carriers, the cosine similarity of each adjacent pair of carrier *embeddings* (insertion
    order) is computed and the earlier carrier of the most similar pair is dropped (its slot
    freed), so at most ``carriers - 1`` remain after a frame. The question turn — the
    ``video_end`` token if any, the question prompt, the answer — attends to sink + carriers
    + itself at positions continuing from the cache length; its KV is discarded at
    ``"resume"``.

    Raises :class:`CapacityError` when the prompt exceeds the sink region or a question +
    answer exceeds the question region.
    """

    name = "carrier"

    def __init__(self, sink_tokens: int, carriers: int, question_tokens: int, hidden_size: int):
        self.n_sink, self.n_carriers, self.n_question = int(sink_tokens), int(carriers), int(question_tokens)
        if self.n_carriers < 2 or self.n_sink < 1 or self.n_question < 1:
            raise ValueError("carrier needs carriers >= 2, sink_tokens >= 1, question_tokens >= 1")
        self._sizes = carrier_regions(self.n_sink, self.n_carriers, self.n_question)
        super().__init__(sum(self._sizes.values()))
        self.c0 = self.n_sink
        self.q0 = self.n_sink + self.n_carriers
        self.embeddings = np.zeros((self.n_carriers, int(hidden_size)), dtype=np.float32)
        self.sink_count = 0
        self.q_count = 0
        self.dropped = 0                     # carriers dropped so far
        self._carrier: np.ndarray | None = None
        self._pending: tuple | None = None

    def regions(self) -> dict[str, tuple[int, int]]:
        return region_starts(self._sizes)

    def prepare_frame(self, tokens: np.ndarray, n_valid: int, offsets: np.ndarray | None
                      ) -> tuple[np.ndarray, int, np.ndarray | None]:
        """``tokens [1,T,C]`` -> ``[1,T+1,C]`` with the carrier (mean of the ``n_valid``
        valid tokens, float32) at index ``n_valid``; offsets are dropped (positions are
        compact). A frame without valid tokens is returned unchanged (no carrier)."""
        if n_valid == 0:
            self._carrier = None
            return tokens, n_valid, offsets
        carrier = tokens[0, :n_valid].astype(np.float32).mean(axis=0)
        out = np.empty((1, tokens.shape[1] + 1, tokens.shape[2]), dtype=tokens.dtype)
        out[0, :n_valid] = tokens[0, :n_valid]
        out[0, n_valid] = carrier
        out[0, n_valid + 1:] = tokens[0, n_valid:]
        self._carrier = carrier
        return out, n_valid + 1, None

    def _base_visible(self) -> np.ndarray:
        visible = self.slot_seq >= 0
        visible[self.q0:] = False
        return visible

    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None,
                  kind: str | None = None) -> StepPlan:
        match chunk_kind(kind, self.name):
            case ChunkKind.VIDEO_END | ChunkKind.QUESTION | ChunkKind.DECODE | ChunkKind.RETRIEVAL:
                turn = True                              # the question turn: question region
            case ChunkKind.PREFIX | ChunkKind.FRAME | ChunkKind.RESUME:
                turn = False                             # sink / carriers / discarded
            case other:
                raise unknown_kind(self.name, other)
        visible = self._base_visible()
        if turn:
            if self.q_count + n_valid > self.n_question:
                raise CapacityError(
                    f"question of {self.q_count + n_valid} tokens (prompt + answer so far) does not fit "
                    f"the carrier question region of {self.n_question} slots; raise question_tokens")
            visible[self.q0: self.q0 + self.q_count] = True
            write = self.q0 + self.q_count + np.arange(n_valid, dtype=np.int64)
            what = "question"
        else:
            self.q_count = 0                      # any earlier question/answer KV is dropped
            if kind == "frame" and n_valid:
                if self._carrier is None:
                    raise RuntimeError("carrier: a frame chunk without prepare_frame()")
                free = np.flatnonzero(self.slot_seq[self.c0: self.q0] < 0)
                write = np.full(n_valid, -1, dtype=np.int64)
                write[n_valid - 1] = self.c0 + int(free[0])    # only the carrier is kept
                what = "frame"
            elif kind == "prefix":
                if self.sink_count + n_valid > self.n_sink:
                    raise CapacityError(f"prompt of {self.sink_count + n_valid} tokens does not fit the "
                                        f"carrier sink of {self.n_sink} slots; raise sink_tokens")
                write = self.sink_count + np.arange(n_valid, dtype=np.int64)
                what = "prefix"
            else:                                  # resume (or a frame without tokens)
                write = np.zeros(0, dtype=np.int64)
                what = "discard"
        m = int(visible.sum())
        self._pending = (what,)
        return StepPlan(self._pad(write, chunk_len), np.arange(m, m + chunk_len, dtype=np.int64),
                        self.slot_pos.copy(), visible, n_valid)

    def commit(self, plan: StepPlan, outputs: dict[str, np.ndarray] | None = None) -> None:
        assert self._pending is not None, "commit without plan_step"
        what = self._pending[0]
        self._pending = None
        n = plan.n_new
        if what == "question":
            w = plan.write_slots[:n]
            self.slot_pos[w] = plan.positions[:n]
            self.q_count += n
        elif what == "prefix":
            super().commit(plan)
            self.sink_count += n
        elif what == "frame":
            s = int(plan.write_slots[n - 1])
            self.slot_seq[s] = self.tokens_seen
            self.slot_pos[s] = plan.positions[n - 1]
            self.tokens_seen += 1
            self.embeddings[s - self.c0] = self._carrier
            self._carrier = None
            self._drop_if_full()

    def _drop_if_full(self) -> None:
        seqs = self.slot_seq[self.c0: self.q0]
        live = np.flatnonzero(seqs >= 0)
        if len(live) < self.n_carriers:
            return
        order = live[np.argsort(seqs[live], kind="stable")]        # insertion order
        e = self.embeddings[order]
        a, b = e[:-1], e[1:]
        eps = np.float32(1e-8)
        na = np.maximum(np.linalg.norm(a, axis=1), eps)
        nb = np.maximum(np.linalg.norm(b, axis=1), eps)
        sims = (a * b).sum(axis=1) / (na * nb)
        drop = int(order[int(np.argmax(sims))])                    # earlier of the most similar pair
        self.slot_seq[self.c0 + drop] = -1
        self.dropped += 1


class CarrierSpec(PolicySpec):
    op = "carrier"
    params = CarrierNode
    frame_extra_tokens = 1

    def region_sizes(self, p: CarrierNode, ctx: CacheContext) -> dict[str, int]:
        if p.question_tokens < ctx.max_new_tokens + 1:
            raise ShapeError("question_tokens",
                             f"question_tokens {p.question_tokens} must be > the decoder's "
                             f"max_new_tokens {ctx.max_new_tokens} (question prompt + answer)")
        return carrier_regions(p.sink_tokens, p.carriers, p.question_tokens)

    def facts(self, p: CarrierNode, ctx: CacheContext, dims: KVDims) -> dict[str, Any]:
        """``host_bytes``: the carrier embeddings ``[carriers, C]`` float32."""
        return {"host_bytes": p.carriers * dims.hidden_size * 4}

    def make(self, params, layout: CacheLayout | None, plan, store_dir=None) -> CarrierCache:
        sizes = self._need(layout).sizes()
        return CarrierCache(sizes["sink"], sizes["carriers"], sizes["question"], plan.hidden_size)


register_policy(CarrierSpec())
