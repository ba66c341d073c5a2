"""``rekv``: ReKV — local-window streaming, frame KV offloaded as blocks to a host block
store, per-layer top-k block retrieval for questions.

One file: the graph node (:class:`RekvNode`), the layout (regions ``init``, ``local``,
``retrieved``, ``question``; the block store's RAM bytes), the host block store
(:class:`BlockStore`), the runtime policy (:class:`RekvCache`) and the registration.

The block store (RAM up to a cap, then disk; torch-free).

ReKV (Becomebright/ReKV ``model/attention/kv_cache_manager.py``: ``MemoryUnit``,
``_append_global``) offloads every block of ``block_size`` frame tokens to CPU memory with a
representative key per layer (the mean of the block's keys) and loads the blocks a question
retrieves back to the GPU. Here a block is appended once, never changed, and read back per
layer:

* payload ``[L, 2, Hkv, bt, Dh]`` — un-rotated keys (index 0) and values (index 1) of the
  block's ``bt`` tokens, every layer;
* mean key ``[L, Hkv, Dh]`` float32 — mean over the block's tokens of its un-rotated keys.

The RAM tier is a ring of ``cap_blocks`` preallocated slots holding the most recent blocks.
When a block is appended to a full ring, the oldest RAM block is written to disk first (each
block is written exactly once): ``blocks.bin`` (block-major payloads) and one
``keys_l{l}.bin`` per layer (so scoring layer ``l`` reads one contiguous file), in a
directory the store owns (a fresh temporary directory unless one is given) and removes when
it is closed or garbage-collected. RAM use is therefore bounded by
``cap_blocks * (block_bytes + key_bytes)`` whatever the stream length; disk grows with it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from streamgraph.compiler.limits import MAX_CACHE_TOKENS, MAX_COUNT, MAX_MEMORY_MB
from streamgraph.compiler.ops import NodeBase, ShapeError
from streamgraph.contract import DTYPES
from streamgraph.errors import CapacityError
from streamgraph.kv.base import (CacheContext, CacheLayout, CachePolicy, ChunkKind, KVBuffer, KVDims, PolicySpec,
                                 StepPlan, _rank_positions, chunk_kind, region_starts, register_policy,
                                 unknown_kind)


class RekvNode(NodeBase):
    """ReKV KV-cache policy: stream over [init | local window]; every frame's KV is a block
    (block_tokens tokens, default K: one block per frame) with its mean key per layer;
    blocks leaving the local window are offloaded to a host block store (RAM up to a cap,
    then disk). A question retrieves, per layer, the top-k blocks by dot product of block
    mean keys with the question's mean query and answers over [init | retrieved |
    question]. Capacity = init + local + topk x block_tokens + question.

    Source: Di et al., "Streaming Video Question-Answering with In-context Video KV-Cache
    Retrieval" (ICLR 2025), Becomebright/ReKV `model/attention/kv_cache_manager.py`
    (techniques.md section 5)."""

    op: Literal["rekv"]
    init_tokens: int = Field(128, ge=0, le=MAX_CACHE_TOKENS)
    """Init slots (ReKV n_init): the system-prompt tokens at the start of the stream, kept
    forever; prompt tokens beyond them go to the local window."""
    local_tokens: int = Field(2048, ge=1, le=MAX_CACHE_TOKENS)
    """Local window (ReKV n_local): most recent stream tokens attended while encoding
    frames. Must be >= block_tokens + the largest chunk, so a block is complete before its
    first token leaves the window."""
    topk: int = Field(64, ge=1, le=MAX_COUNT)
    """Blocks retrieved per layer for a question (ReKV retrieve_size = 64)."""
    block_tokens: int | None = Field(None, ge=1, le=MAX_CACHE_TOKENS)
    """Tokens per block (ReKV block_size); default K, one block per frame."""
    question_tokens: int = Field(256, ge=1, le=MAX_CACHE_TOKENS)
    """Slots for the question prompt plus the answer (discarded after the answer)."""
    store_blocks: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Blocks the host block store keeps in RAM; older blocks spill to disk. At most one
    of `store_blocks` / `store_mb`; default 1024 blocks."""
    store_mb: float | None = Field(None, gt=0, le=MAX_MEMORY_MB, allow_inf_nan=False)
    """RAM cap of the host block store in MiB (payload + mean keys); older blocks spill to
    disk."""

    @model_validator(mode="after")
    def _one_cap(self) -> "RekvNode":
        if self.store_blocks is not None and self.store_mb is not None:
            raise ValueError("give at most one of 'store_blocks' or 'store_mb', got both")
        return self

    def block_size(self, tokens_per_frame: int) -> int:
        """Tokens per block (``block_tokens`` or K)."""
        return self.block_tokens if self.block_tokens is not None else tokens_per_frame

    def store_cap_blocks(self, block_bytes: int) -> int:
        """RAM cap of the block store in blocks, for blocks of ``block_bytes`` bytes
        (payload + mean key). Raises ShapeError when ``store_mb`` holds no block."""
        if self.store_mb is None:
            return self.store_blocks if self.store_blocks is not None else 1024
        n = int(self.store_mb * 1024 * 1024) // block_bytes
        if n < 1:
            raise ShapeError("store_mb", f"store_mb {self.store_mb:g} is less than one block "
                             f"({block_bytes} bytes)")
        return n


def rekv_regions(init_tokens: int, local_tokens: int, retrieved_slots: int, question_tokens: int) -> dict[str, int]:
    """``rekv``'s regions: ``init``, ``local``, ``retrieved`` (topk x block_tokens), ``question``."""
    return {"init": int(init_tokens), "local": int(local_tokens), "retrieved": int(retrieved_slots),
            "question": int(question_tokens)}


# ----------------------------------------------------------------------------- block store
def _close_files(fds: list[int], directory: str | None) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class BlockStore:
    """Append-only store of KV blocks with a RAM cap and disk spill.

    ``layer_shape = (2, Hkv, bt, Dh)`` is one layer of a block's payload and ``key_shape =
    (Hkv, Dh)`` one layer of its mean key; ``num_layers`` is L. ``cap_blocks`` (>= 1) is the
    number of blocks kept in RAM. ``directory``: where spilled blocks go (created if missing,
    its files removed on :meth:`close`); default: a new temporary directory, removed on
    :meth:`close` or garbage collection. Raises ValueError for ``cap_blocks < 1``.
    """

    def __init__(self, num_layers: int, layer_shape: tuple[int, ...], key_shape: tuple[int, ...],
                 cap_blocks: int, dtype=np.float32, directory: str | Path | None = None):
        if cap_blocks < 1:
            raise ValueError(f"cap_blocks must be >= 1, got {cap_blocks}")
        self.num_layers = int(num_layers)
        self.layer_shape = tuple(int(d) for d in layer_shape)
        self.key_shape = tuple(int(d) for d in key_shape)
        self.cap_blocks = int(cap_blocks)
        self.dtype = np.dtype(dtype)
        self.layer_bytes = int(np.prod(self.layer_shape)) * self.dtype.itemsize
        self.block_bytes = self.num_layers * self.layer_bytes
        self.key_layer_bytes = int(np.prod(self.key_shape)) * 4
        self.key_bytes = self.num_layers * self.key_layer_bytes
        # RAM tier, allocated once: block b lives in slot b % cap while b >= n - cap.
        self._ram_kv = np.zeros((self.cap_blocks, self.num_layers, *self.layer_shape), self.dtype)
        self._ram_keys = np.zeros((self.cap_blocks, self.num_layers, *self.key_shape), np.float32)
        self.n_blocks = 0
        self._given_dir = Path(directory) if directory is not None else None
        self.directory: Path | None = None
        self._fd_blocks: int | None = None
        self._fd_keys: list[int] = []
        self._finalizer = None

    # ------------------------------------------------------------------ accounting
    @property
    def ram_blocks(self) -> int:
        """Blocks held in RAM (<= cap_blocks)."""
        return min(self.n_blocks, self.cap_blocks)

    @property
    def disk_blocks(self) -> int:
        """Blocks spilled to disk (the oldest ``n_blocks - cap_blocks``)."""
        return max(0, self.n_blocks - self.cap_blocks)

    @property
    def ram_bytes(self) -> int:
        """Bytes of the RAM tier (allocated once: ``cap_blocks * (block_bytes + key_bytes)``)."""
        return int(self._ram_kv.nbytes + self._ram_keys.nbytes)

    @property
    def disk_bytes(self) -> int:
        """Bytes written to disk so far (payloads + mean keys)."""
        return self.disk_blocks * (self.block_bytes + self.key_bytes)

    # ------------------------------------------------------------------ disk
    def _open_disk(self) -> None:
        if self._given_dir is not None:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            self.directory = self._given_dir
            owned = None
        else:
            self.directory = Path(tempfile.mkdtemp(prefix="streamgraph-rekv-"))
            owned = str(self.directory)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self._fd_blocks = os.open(self.directory / "blocks.bin", flags, 0o600)
        self._fd_keys = [os.open(self.directory / f"keys_l{l}.bin", flags, 0o600)
                         for l in range(self.num_layers)]
        fds = [self._fd_blocks, *self._fd_keys]
        self._finalizer = weakref.finalize(self, _close_files, fds, owned)

    def _spill(self, b: int) -> None:
        """Write RAM block ``b`` (about to be overwritten in the ring) to disk."""
        if self._fd_blocks is None:
            self._open_disk()
        slot = b % self.cap_blocks
        payload = np.ascontiguousarray(self._ram_kv[slot])
        _pwrite_all(self._fd_blocks, memoryview(payload).cast("B"), b * self.block_bytes)
        for l, fd in enumerate(self._fd_keys):
            key = np.ascontiguousarray(self._ram_keys[slot, l])
            _pwrite_all(fd, memoryview(key).cast("B"), b * self.key_layer_bytes)

    def close(self) -> None:
        """Close the spill files and remove the store's own temporary directory."""
        if self._finalizer is not None:
            self._finalizer()
        elif self._given_dir is None and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ blocks
    def append(self, payload: np.ndarray, mean_key: np.ndarray) -> int:
        """Store a block: ``payload [L, *layer_shape]``, ``mean_key [L, *key_shape]``.
        Returns its id (0, 1, 2, ... in append order). Raises ValueError on a shape
        mismatch and OSError when the disk write fails."""
        if payload.shape != (self.num_layers, *self.layer_shape):
            raise ValueError(f"block payload {payload.shape} != {(self.num_layers, *self.layer_shape)}")
        if mean_key.shape != (self.num_layers, *self.key_shape):
            raise ValueError(f"block mean key {mean_key.shape} != {(self.num_layers, *self.key_shape)}")
        b = self.n_blocks
        if b >= self.cap_blocks:
            self._spill(b - self.cap_blocks)
        slot = b % self.cap_blocks
        self._ram_kv[slot] = payload
        self._ram_keys[slot] = mean_key
        self.n_blocks += 1
        return b

    def read_layer(self, b: int, layer: int) -> np.ndarray:
        """Layer ``layer`` of block ``b``'s payload, ``[*layer_shape]`` (a view into RAM or
        an array read from disk). Raises IndexError for an unknown block."""
        if not 0 <= b < self.n_blocks:
            raise IndexError(f"block {b} not in store of {self.n_blocks} blocks")
        if b >= self.n_blocks - self.cap_blocks:
            return self._ram_kv[b % self.cap_blocks, layer]
        raw = os.pread(self._fd_blocks, self.layer_bytes, b * self.block_bytes + layer * self.layer_bytes)
        return np.frombuffer(raw, self.dtype).reshape(self.layer_shape)

    def layer_keys(self, layer: int, chunk_blocks: int = 8192) -> Iterator[np.ndarray]:
        """Mean keys of layer ``layer`` for blocks ``0 .. n_blocks-1`` in order, as chunks
        ``[n, *key_shape]`` float32 of at most ``chunk_blocks`` blocks (so scoring needs
        bounded memory however many blocks there are)."""
        n_disk = self.disk_blocks
        for start in range(0, n_disk, chunk_blocks):
            stop = min(n_disk, start + chunk_blocks)
            raw = os.pread(self._fd_keys[layer], (stop - start) * self.key_layer_bytes,
                           start * self.key_layer_bytes)
            yield np.frombuffer(raw, np.float32).reshape(stop - start, *self.key_shape)
        ram_ids = np.arange(n_disk, self.n_blocks)
        for start in range(0, len(ram_ids), chunk_blocks):
            ids = ram_ids[start:start + chunk_blocks]
            yield self._ram_keys[ids % self.cap_blocks, layer]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


# ----------------------------------------------------------------------------- policy
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
    :class:`BlockStore` when its first token is about to be
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
        self._sizes = rekv_regions(self.n_init, self.n_local, self.topk * self.bt, self.n_question)
        super().__init__(sum(self._sizes.values()))
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
        return region_starts(self._sizes)

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
        match chunk_kind(kind, self.name):
            case ChunkKind.VIDEO_END | ChunkKind.QUESTION | ChunkKind.DECODE | ChunkKind.RETRIEVAL:
                turn = True                              # the question turn: question region
            case ChunkKind.PREFIX | ChunkKind.FRAME | ChunkKind.RESUME:
                turn = False                             # the stream (resume: discarded)
            case other:
                raise unknown_kind(self.name, other)
        if turn:
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


class RekvSpec(PolicySpec):
    op = "rekv"
    params = RekvNode

    def region_sizes(self, p: RekvNode, ctx: CacheContext) -> dict[str, int]:
        bt = p.block_size(ctx.tokens_per_frame)
        chunk = max(ctx.tokens_per_frame, ctx.prefill_chunk_tokens)
        if p.local_tokens < bt + chunk:
            raise ShapeError("local_tokens",
                             f"local_tokens {p.local_tokens} must be >= {bt + chunk} = block_tokens "
                             f"{bt} + the largest chunk {chunk}, so a block is complete before its "
                             f"first token leaves the local window")
        if p.question_tokens < ctx.max_new_tokens + 1:
            raise ShapeError("question_tokens",
                             f"question_tokens {p.question_tokens} must be > the decoder's "
                             f"max_new_tokens {ctx.max_new_tokens} (question prompt + answer)")
        return rekv_regions(p.init_tokens, p.local_tokens, p.topk * bt, p.question_tokens)

    def facts(self, p: RekvNode, ctx: CacheContext, dims: KVDims) -> dict[str, Any]:
        """``block_tokens``, ``store_blocks`` (RAM cap in blocks), ``block_bytes`` (payload
        ``[L,2,Hkv,bt,Dh]``), ``key_bytes`` (mean key ``[L,Hkv,Dh]`` fp32) and ``host_bytes``
        (the store's RAM tier)."""
        bt = p.block_size(ctx.tokens_per_frame)
        block_bytes = dims.num_layers * 2 * dims.num_kv_heads * bt * dims.head_dim * DTYPES[dims.dtype].bytes
        key_bytes = dims.num_layers * dims.num_kv_heads * dims.head_dim * 4
        n = p.store_cap_blocks(block_bytes + key_bytes)
        return {"block_tokens": bt, "store_blocks": n, "block_bytes": block_bytes, "key_bytes": key_bytes,
                "host_bytes": n * (block_bytes + key_bytes)}

    def make(self, params, layout: CacheLayout | None, plan, store_dir=None) -> RekvCache:
        layout = self._need(layout)
        sizes = layout.sizes()
        L, _, _, hkv, _, dh = plan.kv.shape
        qm = next(o for o in plan.engines["decoder_step"].outputs if o.name == "query_mean")
        return RekvCache(init_tokens=sizes["init"], local_tokens=sizes["local"], topk=int(params["topk"]),
                         block_tokens=int(layout.facts["block_tokens"]), question_tokens=sizes["question"],
                         store_blocks=int(layout.facts["store_blocks"]), num_layers=L, num_kv_heads=hkv,
                         head_dim=dh, num_heads=int(qm.shape[2]), store_dir=store_dir)


register_policy(RekvSpec())
