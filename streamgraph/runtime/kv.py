"""The static KV buffer and the host-side cache policies (slot planners) over it.

One buffer ``kv_cache[L, 2, B, Hkv, S, Dh]`` is allocated once per session from the plan and
never reallocated (DESIGN.md, "The static KV contract"). Before every decoder step the cache
policy chooses, as pure index arithmetic:

* ``write_slots [T]`` — slot each new token's K/V is written to after the step (-1: not
  written, for invalid tokens);
* ``positions [T]`` — RoPE position of each new token;
* ``cache_positions [S]`` and ``cache_valid [S]`` — RoPE position and visibility of each slot.

Keys are stored un-rotated, so a policy may renumber positions freely.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from streamgraph.errors import CapacityError

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class KVBuffer:
    """The session's one KV buffer, allocated once with exactly the planned bytes.

    ``data`` has shape ``[L, 2, B, Hkv, S, Dh]``. :meth:`write` copies a step's ``new_kv
    [L,2,B,Hkv,T,Dh]`` into chosen slots in place; nothing ever replaces ``data``.
    """

    def __init__(self, shape: list[int] | tuple[int, ...], dtype: str = "float32"):
        self.data = np.zeros(tuple(shape), dtype=_NP_DTYPES[dtype])
        self._address = self.data.ctypes.data

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def capacity(self) -> int:
        return int(self.data.shape[4])

    @property
    def address(self) -> int:
        """Address of the buffer's memory (constant for the life of the session)."""
        return self._address

    def write(self, new_kv: np.ndarray, write_slots: np.ndarray) -> None:
        """Write ``new_kv[..., t, :]`` into slot ``write_slots[t]`` for every ``t`` with
        ``write_slots[t] >= 0``. Raises ValueError on a shape mismatch."""
        if new_kv.shape[:4] != self.data.shape[:4] or new_kv.shape[5] != self.data.shape[5]:
            raise ValueError(f"new_kv shape {new_kv.shape} does not fit KV buffer {self.data.shape}")
        sel = write_slots >= 0
        if sel.any():
            self.data[:, :, :, :, write_slots[sel], :] = new_kv[:, :, :, :, sel, :]
        assert self.data.ctypes.data == self._address, "KV buffer was reallocated"


@dataclass
class StepPlan:
    """Index arrays for one decoder step (batch 1; shapes without the batch axis)."""

    write_slots: np.ndarray      # [T] int64, -1 = do not write
    positions: np.ndarray        # [T] int64
    cache_positions: np.ndarray  # [S] int64
    cache_valid: np.ndarray      # [S] bool
    n_new: int                   # valid tokens in the chunk (a prefix of it)


class CachePolicy(ABC):
    """Host-side slot planner over a buffer of ``capacity`` slots.

    Each slot holds one token, tagged with its stream order ``seq`` (0, 1, 2, ... over every
    token ever written). Subclasses decide which slots a chunk overwrites and which slots are
    visible at which positions. Call :meth:`plan_step` before the decoder step and
    :meth:`commit` after its ``new_kv`` was written.
    """

    name = "policy"

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.slot_seq = np.full(self.capacity, -1, dtype=np.int64)   # -1 = empty slot
        self.slot_pos = np.zeros(self.capacity, dtype=np.int64)      # stored position (if fixed)
        self.tokens_seen = 0                                          # tokens ever written

    @property
    def slots_in_use(self) -> int:
        return int((self.slot_seq >= 0).sum())

    @abstractmethod
    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None) -> StepPlan:
        """Plan a chunk of ``chunk_len`` tokens whose first ``n_valid`` are valid.

        ``offsets [n_valid]`` (optional) are position offsets of the valid tokens relative to
        the chunk start, for reducers run with ``positions: keep``; policies that renumber
        positions contiguously ignore them. Raises :class:`CapacityError` when the chunk
        cannot be placed.
        """

    def commit(self, plan: StepPlan) -> None:
        """Record that the chunk's valid tokens now occupy ``plan.write_slots``."""
        for j in range(plan.n_new):
            s = int(plan.write_slots[j])
            self.slot_seq[s] = self.tokens_seen + j
            self.slot_pos[s] = plan.positions[j]
        self.tokens_seen += plan.n_new

    def _pad(self, values: np.ndarray, chunk_len: int) -> np.ndarray:
        out = np.full(chunk_len, -1, dtype=np.int64)
        out[: len(values)] = values
        return out


class FullCache(CachePolicy):
    """``full``: every token is kept at its absolute stream position until the buffer is
    full, then :class:`CapacityError` (no eviction)."""

    name = "full"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.next_position = 0

    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None) -> StepPlan:
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

    def commit(self, plan: StepPlan) -> None:
        super().commit(plan)
        if plan.n_new:
            self.next_position = int(plan.positions[plan.n_new - 1]) + 1


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

    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None) -> StepPlan:
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


def make_policy(op: str, params: dict) -> CachePolicy:
    """Cache policy for a plan's ``cache`` entry. Raises KeyError for an unknown op."""
    if op == "full":
        return FullCache(int(params["capacity_tokens"]))
    if op == "sink_window":
        return SinkWindowCache(int(params["sink_tokens"]), int(params["window_tokens"]))
    raise KeyError(f"unknown cache policy {op!r}")
