"""``streaming_vlm``: StreamingVLM — text sink + long text window + short vision window.

One file: the graph node (:class:`StreamingVLMNode`), the layout (regions ``sink``,
``text_window``, ``vision_window``), the runtime policy (:class:`StreamingVLMCache`) and the
registration.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from streamgraph.compiler.limits import MAX_CACHE_TOKENS, MAX_COUNT, MAX_SECONDS
from streamgraph.compiler.ops import NodeBase, ShapeError
from streamgraph.errors import CapacityError
from streamgraph.kv.base import (CacheContext, CacheLayout, CachePolicy, ChunkKind, PolicySpec, StepPlan,
                                 _rank_positions, chunk_kind, region_starts, register_policy, unknown_kind)


class StreamingVLMNode(NodeBase):
    """StreamingVLM KV-cache policy: an attention sink of the first `sink_tokens` text
    tokens, a long window of the most recent `text_window_tokens` text tokens and a short
    window of the most recent vision frames; positions are re-assigned contiguously over
    what is retained ("shrink" mode). Capacity = sink + text window + frames x K.

    Source: Xu et al., "StreamingVLM" (2025), mit-han-lab/streaming-vlm
    `streaming_vlm/inference/inference.py` (techniques.md section 2)."""

    op: Literal["streaming_vlm"]
    sink_tokens: int = Field(512, ge=0, le=MAX_CACHE_TOKENS)
    """Text attention-sink slots: the first kept text tokens of the stream (system prompt,
    then the first answer tokens), kept forever (StreamingVLM text_sink = 512). Question
    prompts are kept only while their turn lasts, as StreamingVLM drops user turns."""
    text_window_tokens: int = Field(512, ge=1, le=MAX_CACHE_TOKENS)
    """Slots of the long text window: the most recent kept text tokens after the sink and
    the current question turn (StreamingVLM text_sliding_window = 512)."""
    vision_window_frames: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Short vision window in frames (each frame takes K slots). At most one of
    `vision_window_frames` / `vision_window_seconds`."""
    vision_window_seconds: float | None = Field(None, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    """Short vision window in seconds of stream, turned into ceil(seconds x stream.fps)
    frames; default 16 (StreamingVLM window_size = 16 one-second chunks) when neither is
    given."""

    @model_validator(mode="after")
    def _one_window(self) -> "StreamingVLMNode":
        if self.vision_window_frames is not None and self.vision_window_seconds is not None:
            raise ValueError("give at most one of 'vision_window_frames' or "
                             "'vision_window_seconds', got both")
        return self

    def window_frames(self, fps: float) -> int:
        """Frames in the vision window (>= 1) at ``fps`` frames per second. Raises
        ShapeError when the window is in seconds and ``fps`` is not > 0."""
        if self.vision_window_frames is not None:
            return self.vision_window_frames
        if not fps > 0:
            raise ShapeError("vision_window_seconds", f"a vision window in seconds needs the "
                             f"stream's fps > 0, got {fps}")
        seconds = 16.0 if self.vision_window_seconds is None else self.vision_window_seconds
        return max(1, math.ceil(seconds * fps - 1e-9))


def streaming_vlm_regions(sink_tokens: int, text_window_tokens: int, vision_window_slots: int) -> dict[str, int]:
    """``streaming_vlm``'s regions: ``sink``, ``text_window``, ``vision_window`` (frames x K)."""
    return {"sink": int(sink_tokens), "text_window": int(text_window_tokens),
            "vision_window": int(vision_window_slots)}


class StreamingVLMCache(CachePolicy):
    """``streaming_vlm`` — StreamingVLM: attention sink + long text window + short vision
    window, contiguous re-assigned positions ("shrink" mode).

    Source: Xu et al., "StreamingVLM: Real-Time Understanding for Infinite Video Streams"
    (2025), mit-han-lab/streaming-vlm ``streaming_vlm/inference/inference.py``
    (``process_past_kv``, ``pos_mode="shrink"``), techniques.md §2.

    What text is kept, as StreamingVLM: the system prompt and the **assistant text** (the
    answers: chunks of kind ``prefix`` and ``decode``) are kept — the first ``s`` of them in
    the sink, the later ones in the text window, as StreamingVLM's "previous text" block
    keeps its first ``text_sink`` and last ``text_sliding_window`` tokens. The **user turn**
    — the question prompt (``question``, which ends with the assistant-turn opening), the
    video-end token (``video_end``) and the turn wrapper (``resume``: end of the answer,
    start of the next user turn) — is kept only while its round is the current one: a
    ``resume`` chunk opens a new round and deletes the text of the round it closes except
    its answer (StreamingVLM deletes an aged round's user text and assistant wrapper and
    moves its assistant text to "previous text"; techniques.md §2.3 steps 1a/1c).

    Regions (slots): ``sink [0, s)`` the first ``s`` system/assistant text tokens, kept
    forever; ``text_window [s, s+tw)`` the later system/assistant text and the current
    round's user text, at most ``tw`` tokens: a text chunk takes free slots first (slots of
    deleted user text are reused) and otherwise overwrites the oldest text-window tokens;
    ``vision_window`` a ring of ``frames`` blocks of K slots, one block per frame, a frame
    overwriting the whole block of the oldest frame (whole-frame eviction, like
    StreamingVLM's dropping of the oldest 1 s video chunk). Overwritten and deleted slots
    are hidden from the chunk itself. Positions are re-assigned every step over what is
    visible: rank in stream order 0..m-1, the chunk m..m+T-1 — no gaps, start at 0, whatever
    was evicted (StreamingVLM recomputes positions over the retained ids).

    Simplifications vs the reference (documented in docs/kv-policies.md): one round — the
    current question turn — is kept verbatim (the reference keeps 16 one-second rounds;
    here a round is a question turn); aged answers stay in place in stream order rather
    than being moved into a ``<|im_start|>previous text`` turn; the sink and window of the
    previous text share the text window with the current round's user text; an answer cut
    at ``max_new_tokens`` has its last token in the ``resume`` chunk, so that one token is
    deleted with the round; 1-D RoPE positions, not Qwen2.5-VL's 3-D mRoPE.

    Raises :class:`CapacityError` for a text chunk longer than the text window or a frame
    with more than K valid tokens.
    """

    name = "streaming_vlm"

    def __init__(self, sink_tokens: int, text_window_tokens: int, vision_window_frames: int,
                 tokens_per_frame: int):
        self.sink, self.text_window = int(sink_tokens), int(text_window_tokens)
        self.frames, self.k = int(vision_window_frames), int(tokens_per_frame)
        if self.text_window < 1 or self.frames < 1 or self.k < 1 or self.sink < 0:
            raise ValueError("streaming_vlm needs text_window_tokens, vision_window_frames and "
                             "tokens_per_frame >= 1 and sink_tokens >= 0")
        self._sizes = streaming_vlm_regions(self.sink, self.text_window, self.frames * self.k)
        super().__init__(sum(self._sizes.values()))
        self.vision0 = self.sink + self.text_window
        self.text_count = 0          # text tokens ever written
        self.sink_count = 0          # sink slots filled (system prompt, then answers)
        self.frame_count = 0         # frames ever written
        self.round = 0               # current round (question turn); resume opens the next
        self.user_slot = np.zeros(self.capacity, dtype=bool)   # slot holds the current round's user text
        self._pending: tuple | None = None

    def regions(self) -> dict[str, tuple[int, int]]:
        return region_starts(self._sizes)

    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None,
                  kind: str | None = None) -> StepPlan:
        match chunk_kind(kind, self.name):
            case ChunkKind.FRAME:
                is_frame, kept = True, False
            case ChunkKind.PREFIX | ChunkKind.DECODE:       # system prompt, answers: kept past the round
                is_frame, kept = False, True
            case ChunkKind.VIDEO_END | ChunkKind.QUESTION | ChunkKind.RESUME | ChunkKind.RETRIEVAL:
                is_frame, kept = False, False              # the current round's user text
            case other:
                raise unknown_kind(self.name, other)
        if is_frame:
            if n_valid > self.k:
                raise CapacityError(f"frame of {n_valid} tokens does not fit a streaming_vlm frame "
                                    f"block of {self.k} slots")
            if n_valid == 0:                      # nothing to write: evict nothing
                write = hidden = np.zeros(0, dtype=np.int64)
            else:
                base = self.vision0 + (self.frame_count % self.frames) * self.k
                write = base + np.arange(n_valid, dtype=np.int64)
                hidden = np.arange(base, base + self.k, dtype=np.int64)
            what = "frame"
        else:                                      # text
            n_sink = max(0, min(n_valid, self.sink - self.sink_count)) if kept else 0
            n_win = n_valid - n_sink
            if n_win > self.text_window:
                raise CapacityError(f"text chunk of {n_win} tokens does not fit the streaming_vlm "
                                    f"text window of {self.text_window} tokens")
            aged = np.flatnonzero(self.user_slot) if kind == "resume" else np.zeros(0, dtype=np.int64)
            win = np.arange(self.sink, self.vision0, dtype=np.int64)
            live = self.slot_seq[win] >= 0
            live[aged - self.sink] = False
            free = win[~live]
            need = max(0, n_win - len(free))
            oldest = win[live][np.argsort(self.slot_seq[win][live], kind="stable")[:need]]
            write = np.concatenate([self.sink_count + np.arange(n_sink, dtype=np.int64),
                                    free[:n_win], oldest])
            hidden = np.concatenate([aged, oldest])
            what = ("kept" if kept else "user", n_sink, kind == "resume")
        visible = self.slot_seq >= 0
        visible[hidden] = False
        cache_pos, m = _rank_positions(visible, self.slot_seq)
        self._pending = (what, hidden, write)
        pos = np.arange(m, m + chunk_len, dtype=np.int64)
        return StepPlan(self._pad(write, chunk_len), pos, cache_pos, visible, n_valid)

    def commit(self, plan: StepPlan, outputs: dict[str, np.ndarray] | None = None) -> None:
        assert self._pending is not None, "commit without plan_step"
        what, hidden, write = self._pending
        self._pending = None
        self.slot_seq[hidden] = -1                 # evicted frame block / text, aged user text
        self.user_slot[hidden] = False
        super().commit(plan)
        if what == "frame":
            self.frame_count += plan.n_new > 0
            return
        kind, n_sink, opens_round = what
        self.round += opens_round
        self.text_count += plan.n_new
        self.sink_count += n_sink
        if kind == "user":
            self.user_slot[write[:plan.n_new]] = True


class StreamingVLMSpec(PolicySpec):
    op = "streaming_vlm"
    params = StreamingVLMNode

    def region_sizes(self, p: StreamingVLMNode, ctx: CacheContext) -> dict[str, int]:
        if p.text_window_tokens < ctx.prefill_chunk_tokens:
            raise ShapeError("text_window_tokens",
                             f"text_window_tokens {p.text_window_tokens} must be >= the decoder's "
                             f"prefill_chunk_tokens {ctx.prefill_chunk_tokens} so that a text "
                             f"chunk fits in the text window")
        return streaming_vlm_regions(p.sink_tokens, p.text_window_tokens,
                                     p.window_frames(ctx.fps) * ctx.tokens_per_frame)

    def make(self, params, layout: CacheLayout | None, plan, store_dir=None) -> StreamingVLMCache:
        layout = self._need(layout)
        sizes, k = layout.sizes(), layout.tokens_per_frame
        return StreamingVLMCache(sizes["sink"], sizes["text_window"], sizes["vision_window"] // k, k)


register_policy(StreamingVLMSpec())
