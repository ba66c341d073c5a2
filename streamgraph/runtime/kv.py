"""The static KV buffer and the host-side cache policies (slot planners) over it.

One buffer ``kv_cache[L, 2, B, Hkv, S, Dh]`` is allocated once per session from the plan and
never reallocated (DESIGN.md, "The static KV contract"). Before every decoder step the cache
policy chooses, as pure index arithmetic:

* ``write_slots [T]`` — slot each new token's K/V is written to after the step (-1: not
  written, for invalid tokens);
* ``positions [T]`` — RoPE position of each new token;
* ``cache_positions [S]`` and ``cache_valid [S]`` — RoPE position and visibility of each slot.

Keys are stored un-rotated, so a policy may renumber positions freely.

Every policy divides the buffer's slot axis into fixed-capacity regions (:meth:`CachePolicy
.regions`; the plan lists them with their bytes). Policies:

=================  =====================================================================
``full``           every token at its stream position until full, then CapacityError
``sink_window``    StreamingLLM: sinks + recent window, contiguous positions
``streaming_vlm``  StreamingVLM: text sink + long text window + short vision window
``rekv``           ReKV: init + local window; frames offloaded as blocks to a host store;
                   per-layer top-k block retrieval for questions
``carrier``        VideoScan: one carrier token per frame in a fixed carrier memory
=================  =====================================================================

The session tells a policy what each chunk is (``kind``), in this order within a turn:

* ``"prefix"`` — the prompt prefix, once at session start (system prompt, opening of the
  first user turn);
* ``"frame"`` — a frame's visual tokens (``carrier``: plus the carrier token);
* ``"retrieval"`` — the question text, run only to score blocks and discarded (``rekv``
  only, from :meth:`CachePolicy.prepare_question`, which runs before the turn's chunks);
* ``"video_end"`` — one embedding closing the frames of a user turn before its question
  (LLaVA-OneVision's ``image_newline``, only in bundles whose manifest has
  ``prompt.video_end_embedding``, and only when frames were prefilled since the last
  question);
* ``"question"`` — the question prompt (the text before and after the question, ending with
  the assistant-turn opening), in chunks of at most ``prefill_chunk_tokens``;
* ``"decode"`` — one answer token;
* ``"resume"`` — the end of the answer turn and the opening of the next user turn (plus
  the last answer token when the answer stopped at ``max_new_tokens``).

What each policy does with each kind (docs/kv-policies.md has the table): ``full`` and
``sink_window`` ignore kinds (every token is a stream token). ``streaming_vlm`` keeps
``prefix`` and ``decode`` (system prompt and answers) and keeps the user turn
(``video_end``, ``question``, ``resume``) only while its round is current. ``rekv`` and
``carrier`` stream ``prefix`` and ``frame``; ``video_end``, ``question``, ``decode`` (and
``retrieval``) form the question turn, written to the question region and dropped at
``resume``, whose own KV is not kept either.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamgraph.errors import CapacityError
from streamgraph.runtime.offload import BlockStore

from streamgraph.kv.base import (QUESTION_TURN_KINDS, TEXT_KINDS, _NO_SEQ, CachePolicy,  # noqa: F401
                                 KVBuffer, StepPlan, _rank_positions)


class FullCache(CachePolicy):
    """``full``: every token is kept at its absolute stream position until the buffer is
    full, then :class:`CapacityError` (no eviction)."""

    name = "full"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.next_position = 0

    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None,
                  kind: str | None = None) -> StepPlan:
        used = self.tokens_seen
        if used + n_valid > self.capacity:
            raise CapacityError(
                f"KV cache full: policy 'full' has {self.capacity} slots, {used} in use, and the next "
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


class SinkWindowCache(CachePolicy):
    """``sink_window`` — StreamingLLM attention sinks + recent window with position shift.

    Source: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR
    2024), mit-han-lab/streaming-llm ``StartRecentKVCache`` + ``pos_shift`` (techniques.md §1).

    Slots ``[0, sink)`` hold the first ``sink`` tokens of the stream forever; slots ``[sink,
    S)`` are a ring over the most recent ``window`` tokens. A chunk of n tokens overwrites the
    n oldest window slots; those are hidden from the chunk (``evict_for_space``: the chunk sees
    the sinks + the ``window - n`` most recent tokens). Positions are re-assigned every step:
    visible slots get their rank in stream order (0..m-1, sinks first), the new tokens m..m+n-1
    — "index in cache" positions, so no gaps, whatever was evicted.
    """

    name = "sink_window"

    def __init__(self, sink_tokens: int, window_tokens: int):
        super().__init__(sink_tokens + window_tokens)
        self.sink = int(sink_tokens)
        self.window = int(window_tokens)

    def _slot_of(self, seq: np.ndarray) -> np.ndarray:
        return np.where(seq < self.sink, seq, self.sink + (seq - self.sink) % self.window)

    def regions(self) -> dict[str, tuple[int, int]]:
        return {"sink": (0, self.sink), "window": (self.sink, self.window)}

    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None,
                  kind: str | None = None) -> StepPlan:
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
    #: text kinds kept past their round: the system prompt and the assistant's answers
    KEPT_TEXT = ("prefix", "decode")

    def __init__(self, sink_tokens: int, text_window_tokens: int, vision_window_frames: int,
                 tokens_per_frame: int):
        self.sink, self.text_window = int(sink_tokens), int(text_window_tokens)
        self.frames, self.k = int(vision_window_frames), int(tokens_per_frame)
        if self.text_window < 1 or self.frames < 1 or self.k < 1 or self.sink < 0:
            raise ValueError("streaming_vlm needs text_window_tokens, vision_window_frames and "
                             "tokens_per_frame >= 1 and sink_tokens >= 0")
        super().__init__(self.sink + self.text_window + self.frames * self.k)
        self.vision0 = self.sink + self.text_window
        self.text_count = 0          # text tokens ever written
        self.sink_count = 0          # sink slots filled (system prompt, then answers)
        self.frame_count = 0         # frames ever written
        self.round = 0               # current round (question turn); resume opens the next
        self.user_slot = np.zeros(self.capacity, dtype=bool)   # slot holds the current round's user text
        self._pending: tuple | None = None

    def regions(self) -> dict[str, tuple[int, int]]:
        return {"sink": (0, self.sink), "text_window": (self.sink, self.text_window),
                "vision_window": (self.vision0, self.frames * self.k)}

    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None,
                  kind: str | None = None) -> StepPlan:
        if kind == "frame":
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
        else:                                      # every other kind is text (TEXT_KINDS)
            kept = kind in self.KEPT_TEXT
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


class RekvCache(CachePolicy):
    """``rekv`` — ReKV: local-window streaming, frame KV offloaded as blocks to a host block
    store, per-layer top-k block retrieval for questions.

    Source: Di et al., "Streaming Video Question-Answering with In-context Video KV-Cache
    Retrieval" (ICLR 2025), Becomebright/ReKV ``model/attention/kv_cache_manager.py``
    (``ContextManager``: ``_append_global``, ``_calc_block_topk``, ``get_retrieved_kv``) and
    ``model/llava_onevision_rekv.py`` (``question_answering``); techniques.md §5.

    Regions (slots): ``init [0, n_init)`` the system-prompt (``"prefix"``) tokens, kept
    forever; ``local`` a ring over the most recent stream tokens (frames, and prompt tokens
    beyond ``init``); ``retrieved`` ``topk`` blocks of ``bt`` slots; ``question`` the
    question prompt and answer.

    Streaming (kinds ``prefix``/``frame``): StreamingLLM over [init | local] (positions =
    rank in stream order; a chunk of n tokens overwrites the n oldest local slots). Frame
    tokens are cut into blocks of ``bt`` consecutive frame tokens (``bt = K``: one block per
    frame); a block's mean key per layer ``[L, Hkv, Dh]`` (mean of its un-rotated keys) is
    taken when the block is complete, and its payload ``[L, 2, Hkv, bt, Dh]`` is copied to the
    :class:`~streamgraph.runtime.offload.BlockStore` when its first token is about to be
    overwritten in the local window (RAM up to ``store_blocks``, then disk).

    Questions (:meth:`prepare_question`): every complete block — offloaded or still in the
    local window — is a candidate, as in ReKV. With ``n`` blocks and ``n <= topk`` all are
    loaded. Otherwise, for each layer ``l`` in order, the question text is prefilled once
    (kind ``"retrieval"``) with layers ``< l`` already seeing their retrieved blocks; the
    engine's ``query_mean[l]`` (mean over the question tokens of the pre-RoPE query, per query
    head) is scored against every block's mean key expanded to the query heads (GQA), as an
    unnormalised fp32 dot product over ``H*Dh``; the top-``topk`` block ids, sorted ascending
    (time order), are copied into layer ``l``'s slice of the ``retrieved`` region. This is
    exactly ReKV's per-layer retrieval inside one forward pass (layer ``l``'s query depends
    on what layers ``< l`` retrieved), at the cost of ``L`` extra question prefills. The
    prompt and answer then attend to [init | retrieved (time order) | question] at positions
    0..len-1; a ``video_end`` chunk (after :meth:`prepare_question`) opens the question turn
    the same way, so the question follows it as it follows the video in the model's own
    sequence. Every layer retrieves ``min(topk, n)`` blocks of ``bt`` tokens, so the visible
    slots and positions are the same in every layer and the engine's shared ``cache_valid
    [B,S]`` / ``cache_positions [B,S]`` suffice. The question and answer KV are discarded at
    ``"resume"`` (ReKV does not keep them); streaming continues over [init | local].

    Deviation: ReKV encodes frames with init keys at "one angle" (queries rotated at
    ``n_local``); per-slot positions cannot express that for a chunk of several queries, so
    init is attended with StreamingLLM positions instead. ``ReKV chunk_size`` > 1 (grouped
    blocks) is not implemented (chunk_size = 1, the released default).

    Raises :class:`CapacityError` when a question prompt + answer exceeds the question
    region, and when a frame token would leave the local window before its block is
    complete (the compiler rejects such a configuration).
    """

    name = "rekv"

    def __init__(self, *, init_tokens: int, local_tokens: int, topk: int, block_tokens: int,
                 question_tokens: int, store_blocks: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, num_heads: int, store_dir: str | Path | None = None):
        self.n_init, self.n_local, self.topk = int(init_tokens), int(local_tokens), int(topk)
        self.bt, self.n_question = int(block_tokens), int(question_tokens)
        if min(self.n_local, self.topk, self.bt, self.n_question) < 1 or self.n_init < 0:
            raise ValueError("rekv needs local_tokens, topk, block_tokens, question_tokens >= 1")
        super().__init__(self.n_init + self.n_local + self.topk * self.bt + self.n_question)
        self.local0 = self.n_init
        self.ret0 = self.n_init + self.n_local
        self.q0 = self.ret0 + self.topk * self.bt
        self.num_layers, self.num_kv_heads = int(num_layers), int(num_kv_heads)
        self.head_dim, self.num_heads = int(head_dim), int(num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.store = BlockStore(self.num_layers, (2, self.num_kv_heads, self.bt, self.head_dim),
                                (self.num_kv_heads, self.head_dim), store_blocks, directory=store_dir)
        self.init_count = 0                  # init slots filled
        self.local_count = 0                 # tokens ever written to the local ring
        self.pending: list[int] = []         # local slots of frame tokens not yet in a block
        self.slot_block = np.full(self.capacity, -1, dtype=np.int64)  # block of a local slot
        self.local_blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id -> (slots, mean key)
        self.n_blocks = 0                    # complete blocks (ids 0..n-1 in time order)
        self.mode = "stream"                 # or "question"
        self.q_count = 0                     # tokens in the question region
        self.n_sel = 0                       # blocks in the retrieved region (every layer)
        self.retrieved: list[np.ndarray] = []  # per layer: block ids in the retrieved region
        self.scores: list[np.ndarray | None] = []  # per layer: scores of the retrieved blocks
        self.query_means: np.ndarray | None = None  # [L, H, Dh] used for scoring (last question)
        self.retrieval_passes = 0            # question prefills run for retrieval, in total
        self._pending: tuple | None = None
        self._qsum: np.ndarray | None = None
        self._qn = 0

    def regions(self) -> dict[str, tuple[int, int]]:
        return {"init": (0, self.n_init), "local": (self.local0, self.n_local),
                "retrieved": (self.ret0, self.topk * self.bt), "question": (self.q0, self.n_question)}

    @property
    def slots_in_use(self) -> int:
        stream = int((self.slot_seq[: self.ret0] >= 0).sum())
        return stream + (self.n_sel * self.bt + self.q_count if self.mode == "question" else 0)

    # ------------------------------------------------------------------ blocks
    def _need_kv(self) -> "KVBuffer":
        if self.kv is None:
            raise RuntimeError("rekv policy has no KV buffer: call attach(kv) first")
        return self.kv

    def _offload(self, b: int) -> None:
        """Copy block ``b`` (still in the local window) to the block store."""
        assert b == self.store.n_blocks, (b, self.store.n_blocks)
        slots, key = self.local_blocks.pop(b)
        payload = self._need_kv().read_slots(slots)                      # [L, 2, Hkv, bt, Dh]
        self.store.append(payload, key)
        self.slot_block[slots] = -1

    def _cut_blocks(self) -> None:
        kv = self._need_kv()
        while len(self.pending) >= self.bt:
            slots = np.asarray(self.pending[: self.bt], dtype=np.int64)
            del self.pending[: self.bt]
            keys = kv.read_slots(slots)[:, 0]                               # [L, Hkv, bt, Dh]
            key = keys.astype(np.float32).mean(axis=2)                       # [L, Hkv, Dh]
            self.local_blocks[self.n_blocks] = (slots, key)
            self.slot_block[slots] = self.n_blocks
            self.n_blocks += 1

    def _block_layer(self, b: int, layer: int) -> np.ndarray:
        """Layer ``layer`` of block ``b``'s payload ``[2, Hkv, bt, Dh]``."""
        if b < self.store.n_blocks:
            return self.store.read_layer(b, layer)
        slots, _ = self.local_blocks[b]
        return self._need_kv().read_slots(slots, layer)

    def _layer_keys(self, layer: int):
        yield from self.store.layer_keys(layer)
        local = [self.local_blocks[b][1][layer] for b in range(self.store.n_blocks, self.n_blocks)]
        if local:
            yield np.stack(local)

    def _chunk_scores(self, keys: np.ndarray, q: np.ndarray) -> np.ndarray:
        rep = self.num_heads // self.num_kv_heads
        return (np.repeat(keys, rep, axis=1).reshape(len(keys), -1).astype(np.float32) @ q).astype(np.float32)

    def block_scores(self, layer: int, query_mean: np.ndarray) -> np.ndarray:
        """Scores ``[n_blocks]`` float32 of every block for layer ``layer``: the dot product
        of the block's mean key, expanded from Hkv to H query heads (GQA), with ``query_mean
        [H, Dh]``, flattened over ``H*Dh``, in fp32, unnormalised (ReKV
        ``VectorTensor.get_cosine_similarity``, which despite its name does not normalise).
        Memory O(n_blocks); retrieval itself uses :meth:`top_blocks`."""
        q = np.asarray(query_mean, dtype=np.float32).reshape(-1)
        out = [self._chunk_scores(k, q) for k in self._layer_keys(layer)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def top_blocks(self, layer: int, query_mean: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best blocks of layer ``layer`` by :meth:`block_scores` (ties: lower id
        first), as ``(ids ascending, their scores)``. Streams over the mean keys chunk by
        chunk keeping a running top-k, so memory is O(k + chunk) however long the stream."""
        q = np.asarray(query_mean, dtype=np.float32).reshape(-1)
        best_ids, best = np.zeros(0, np.int64), np.zeros(0, np.float32)
        start = 0
        for keys in self._layer_keys(layer):
            ids = np.concatenate([best_ids, np.arange(start, start + len(keys), dtype=np.int64)])
            sc = np.concatenate([best, self._chunk_scores(keys, q)])
            keep = np.lexsort((ids, -sc))[:k]            # score descending, then id ascending
            best_ids, best = ids[keep], sc[keep]
            start += len(keys)
        order = np.argsort(best_ids, kind="stable")
        return best_ids[order], best[order]

    def _load(self, layer: int, ids: np.ndarray) -> None:
        kv = self._need_kv()
        for j, b in enumerate(ids):
            lo = self.ret0 + j * self.bt
            kv.write_slots(np.arange(lo, lo + self.bt), self._block_layer(int(b), layer), layer)

    # ------------------------------------------------------------------ questions
    def prepare_question(self, run_retrieval_pass: Callable[[], None]) -> None:
        n, L = self.n_blocks, self.num_layers
        self.mode, self.q_count = "question", 0
        self.n_sel = min(self.topk, n)
        self.scores = [None] * L
        self.query_means = None
        if n <= self.topk:
            ids = np.arange(n, dtype=np.int64)
            self.retrieved = [ids] * L
            for layer in range(L):
                self._load(layer, ids)
            return
        self.retrieved = [np.zeros(0, np.int64)] * L
        self.query_means = np.zeros((L, self.num_heads, self.head_dim), np.float32)
        for layer in range(L):
            self._qsum = np.zeros((L, self.num_heads, self.head_dim), np.float64)
            self._qn, self.q_count = 0, 0
            run_retrieval_pass()
            self.retrieval_passes += 1
            if self._qn == 0:
                raise RuntimeError("rekv retrieval pass ran no question tokens")
            q = (self._qsum[layer] / self._qn).astype(np.float32)
            self.query_means[layer] = q
            ids, scores = self.top_blocks(layer, q, self.topk)
            self.scores[layer], self.retrieved[layer] = scores, ids
            self._load(layer, ids)
        self._qsum, self.q_count = None, 0

    # ------------------------------------------------------------------ planning
    def _question_view(self) -> tuple[np.ndarray, np.ndarray, int]:
        visible = np.zeros(self.capacity, dtype=bool)
        visible[: self.init_count] = True
        r = self.n_sel * self.bt
        visible[self.ret0: self.ret0 + r] = True
        visible[self.q0: self.q0 + self.q_count] = True
        pos = np.zeros(self.capacity, dtype=np.int64)
        pos[: self.init_count] = np.arange(self.init_count)
        pos[self.ret0: self.ret0 + r] = self.init_count + np.arange(r)
        pos[self.q0: self.q0 + self.q_count] = self.init_count + r + np.arange(self.q_count)
        return visible, pos, self.init_count + r + self.q_count

    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None,
                  kind: str | None = None) -> StepPlan:
        if kind in QUESTION_TURN_KINDS:
            if self.mode != "question":
                raise RuntimeError("rekv: a question chunk without prepare_question()")
            if self.q_count + n_valid > self.n_question:
                raise CapacityError(
                    f"question of {self.q_count + n_valid} tokens (prompt + answer so far) does not fit "
                    f"the rekv question region of {self.n_question} slots; raise question_tokens")
            visible, cache_pos, m = self._question_view()
            write = self.q0 + self.q_count + np.arange(n_valid, dtype=np.int64)
            self._pending = ("question", kind)
            return StepPlan(self._pad(write, chunk_len), np.arange(m, m + chunk_len, dtype=np.int64),
                            cache_pos, visible, n_valid)
        if self.mode == "question":                 # the answer is over: drop question KV
            self.mode, self.q_count, self.n_sel = "stream", 0, 0
        stream = np.zeros(self.capacity, dtype=bool)
        stream[: self.ret0] = True
        if kind == "resume":                        # discarded, like ReKV's question turn
            visible = (self.slot_seq >= 0) & stream
            cache_pos, m = _rank_positions(visible, self.slot_seq)
            self._pending = ("discard", kind)
            return StepPlan(self._pad(np.zeros(0, np.int64), chunk_len),
                            np.arange(m, m + chunk_len, dtype=np.int64), cache_pos, visible, n_valid)
        n_init = min(self.n_init - self.init_count, n_valid) if kind == "prefix" else 0
        n_loc = n_valid - n_init
        if n_loc > self.n_local:
            raise CapacityError(f"chunk of {n_loc} tokens does not fit the rekv local window of "
                                f"{self.n_local} tokens")
        loc = self.local0 + (self.local_count + np.arange(n_loc, dtype=np.int64)) % self.n_local
        write = np.concatenate([self.init_count + np.arange(n_init, dtype=np.int64), loc])
        pending = set(self.pending)
        if any(int(s) in pending for s in loc):
            raise CapacityError("rekv: a frame token would leave the local window before its block is "
                                "complete; raise local_tokens (>= block_tokens + the largest chunk)")
        for b in sorted({int(b) for b in self.slot_block[loc] if b >= 0}):
            self._offload(b)                        # copy out before the step overwrites it
        visible = (self.slot_seq >= 0) & stream
        visible[loc] = False
        cache_pos, m = _rank_positions(visible, self.slot_seq)
        self._pending = ("stream", kind, loc)
        return StepPlan(self._pad(write, chunk_len), np.arange(m, m + chunk_len, dtype=np.int64),
                        cache_pos, visible, n_valid)

    def commit(self, plan: StepPlan, outputs: dict[str, np.ndarray] | None = None) -> None:
        assert self._pending is not None, "commit without plan_step"
        what, kind = self._pending[0], self._pending[1]
        n = plan.n_new
        if what == "stream":
            loc = self._pending[2]
            self.slot_seq[loc] = -1
            super().commit(plan)
            self.init_count += n - len(loc)
            self.local_count += len(loc)
            if kind == "frame":
                self.pending.extend(int(s) for s in loc)
                self._cut_blocks()
        elif what == "question":
            w = plan.write_slots[:n]
            self.slot_pos[w] = plan.positions[:n]
            self.q_count += n
            if kind == "retrieval" and self._qsum is not None and n:
                if outputs is None or "query_mean" not in outputs:
                    raise RuntimeError("rekv retrieval needs the decoder step's query_mean output")
                self._qsum += outputs["query_mean"][:, 0].astype(np.float64) * n
                self._qn += n
        self._pending = None


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
        super().__init__(self.n_sink + self.n_carriers + self.n_question)
        self.c0 = self.n_sink
        self.q0 = self.n_sink + self.n_carriers
        self.embeddings = np.zeros((self.n_carriers, int(hidden_size)), dtype=np.float32)
        self.sink_count = 0
        self.q_count = 0
        self.dropped = 0                     # carriers dropped so far
        self._carrier: np.ndarray | None = None
        self._pending: tuple | None = None

    def regions(self) -> dict[str, tuple[int, int]]:
        return {"sink": (0, self.n_sink), "carriers": (self.c0, self.n_carriers),
                "question": (self.q0, self.n_question)}

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
        visible = self._base_visible()
        if kind in QUESTION_TURN_KINDS:
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


def make_policy(op: str, params: dict, plan=None, *, store_dir: str | Path | None = None) -> CachePolicy:
    """Cache policy for a plan's ``cache`` entry (``op``, ``params``). ``plan`` (a
    :class:`~streamgraph.compiler.plan.Plan`) supplies the region sizes and model dims the
    ``streaming_vlm``, ``rekv`` and ``carrier`` policies need; ``store_dir`` is where
    ``rekv`` spills blocks (default: a temporary directory it owns). Raises KeyError for an
    unknown op and ValueError when a policy needs ``plan`` and none is given."""
    if op == "full":
        return FullCache(int(params["capacity_tokens"]))
    if op == "sink_window":
        return SinkWindowCache(int(params["sink_tokens"]), int(params["window_tokens"]))
    if op not in ("streaming_vlm", "rekv", "carrier"):
        raise KeyError(f"unknown cache policy {op!r}")
    if plan is None:
        raise ValueError(f"cache policy {op!r} needs the plan (region sizes, model dims)")
    cache = plan.cache
    sizes = {r["name"]: int(r["slots"]) for r in cache["regions"]}
    k = int(cache["tokens_per_frame"])
    if op == "streaming_vlm":
        return StreamingVLMCache(sizes["sink"], sizes["text_window"], sizes["vision_window"] // k, k)
    L, _, _, hkv, _, dh = plan.kv.shape
    if op == "rekv":
        qm = next(o for o in plan.engines["decoder_step"].outputs if o.name == "query_mean")
        return RekvCache(init_tokens=sizes["init"], local_tokens=sizes["local"], topk=int(params["topk"]),
                         block_tokens=int(cache["block_tokens"]), question_tokens=sizes["question"],
                         store_blocks=int(cache["store_blocks"]), num_layers=L, num_kv_heads=hkv,
                         head_dim=dh, num_heads=int(qm.shape[2]), store_dir=store_dir)
    return CarrierCache(sizes["sink"], sizes["carriers"], sizes["question"], plan.hidden_size)
