"""The KV subsystem's base: the static KV buffer, the step plan and the cache-policy base.

One buffer ``kv_cache[L, 2, B, Hkv, S, Dh]`` is allocated once per session (by the backend,
which may keep it on its device) and never reallocated (DESIGN.md, "The static KV
contract"). A :class:`CachePolicy` is pure host-side index arithmetic over its slots: before
every decoder step it returns a :class:`StepPlan` (slots to write, RoPE positions, slot
visibility); after the step the backend scatters the step's new KV into ``write_slots`` and the
policy commits. Policies that move KV between regions or to host memory (ReKV) go through
:meth:`KVBuffer.read_slots` / :meth:`KVBuffer.write_slots`, never ``.data``, so a
device-resident buffer works the same.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamgraph.contract import DTYPES

#: Chunk kinds that carry text (everything but ``"frame"``; ``video_end`` is one embedding,
#: handled like text).
TEXT_KINDS = ("prefix", "video_end", "question", "decode", "resume", "retrieval")
#: Kinds that make up a question turn for the policies that keep it apart from the stream
#: (``rekv``, ``carrier``): written to their question region, dropped at ``resume``.
QUESTION_TURN_KINDS = ("video_end", "question", "decode", "retrieval")
_NO_SEQ = np.iinfo(np.int64).max



class KVBuffer:
    """The session's one KV buffer, allocated once with exactly the planned bytes.

    ``data`` has shape ``[L, 2, B, Hkv, S, Dh]``. :meth:`write` copies a step's ``new_kv
    [L,2,B,Hkv,T,Dh]`` into chosen slots in place; nothing ever replaces ``data``.
    """

    def __init__(self, shape: list[int] | tuple[int, ...], dtype: str = "float32"):
        self.data = np.zeros(tuple(shape), dtype=DTYPES[dtype].numpy)
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

    def read_slots(self, slots: np.ndarray, layer: int | None = None) -> np.ndarray:
        """A host copy of the KV in ``slots`` (batch 0): ``[L, 2, Hkv, n, Dh]``, or ``[2, Hkv,
        n, Dh]`` for one ``layer``. (A device-resident buffer copies device -> host.)"""
        slots = np.asarray(slots, dtype=np.int64)
        if layer is None:
            return self.data[:, :, 0][:, :, :, slots, :].copy()
        return self.data[layer, :, 0][:, :, slots, :].copy()

    def write_slots(self, slots: np.ndarray, values: np.ndarray, layer: int | None = None) -> None:
        """Write ``values`` (shaped as :meth:`read_slots` returns) into ``slots`` (batch 0), in
        place. (A device-resident buffer copies host -> device.)"""
        slots = np.asarray(slots, dtype=np.int64)
        if layer is None:
            view = self.data[:, :, 0]
            view[:, :, :, slots, :] = values
        else:
            self.data[layer, :, 0][:, :, slots, :] = values
        assert self.data.ctypes.data == self._address, "KV buffer was reallocated"


@dataclass
class StepPlan:
    """Index arrays for one decoder step (batch 1; shapes without the batch axis)."""

    write_slots: np.ndarray      # [T] int64, -1 = do not write
    positions: np.ndarray        # [T] int64
    cache_positions: np.ndarray  # [S] int64
    cache_valid: np.ndarray      # [S] bool
    n_new: int                   # valid tokens in the chunk (a prefix of it)
    #: [S] bool: slots visible to streaming heads (DuoAttention); None = same as cache_valid
    window_valid: np.ndarray | None = None


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
        self.kv: KVBuffer | None = None
        #: [L, Hkv] bool: True for a streaming KV head (DuoAttention), None = every head sees
        #: ``cache_valid`` (every other policy)
        self.streaming_heads: np.ndarray | None = None

    @property
    def slots_in_use(self) -> int:
        return int((self.slot_seq >= 0).sum())

    def regions(self) -> dict[str, tuple[int, int]]:
        """The policy's regions of the slot axis, ``{name: (start, slots)}`` in slot order
        (the plan's ``cache.regions`` lists the same with their bytes)."""
        return {"cache": (0, self.capacity)}

    def attach(self, kv: "KVBuffer") -> None:
        """Give the policy the session's KV buffer, for policies that move KV between regions
        or to host memory (``rekv``). Raises ValueError when its capacity differs."""
        if kv.capacity != self.capacity:
            raise ValueError(f"KV buffer has {kv.capacity} slots, policy {self.name!r} plans {self.capacity}")
        self.kv = kv

    @abstractmethod
    def plan_step(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None = None,
                  kind: str | None = None) -> StepPlan:
        """Plan a chunk of ``chunk_len`` tokens whose first ``n_valid`` are valid.

        ``offsets [n_valid]`` (optional) are position offsets of the valid tokens relative to
        the chunk start, for reducers run with ``positions: keep``; policies that renumber
        positions contiguously ignore them. ``kind`` says what the chunk is (see the module
        docstring); ``full`` and ``sink_window`` ignore it. Raises :class:`CapacityError`
        when the chunk cannot be placed.
        """

    def commit(self, plan: StepPlan, outputs: dict[str, np.ndarray] | None = None) -> None:
        """Record that the chunk's valid tokens now occupy ``plan.write_slots`` (call after
        the step's ``new_kv`` was written). ``outputs`` are the decoder step's outputs
        (``rekv`` reads ``query_mean`` from them)."""
        for j in range(plan.n_new):
            s = int(plan.write_slots[j])
            self.slot_seq[s] = self.tokens_seen + j
            self.slot_pos[s] = plan.positions[j]
        self.tokens_seen += plan.n_new

    def prepare_frame(self, tokens: np.ndarray, n_valid: int, offsets: np.ndarray | None
                      ) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Adjust a frame's chunk before it is planned: ``tokens [1,T,C]`` with ``n_valid``
        valid tokens first. Default: unchanged. (``carrier`` appends the carrier token.)"""
        return tokens, n_valid, offsets

    def reserve_positions(self, n: int) -> None:
        """Advance the stream position by ``n`` without writing a token: a frame reduced with
        ``positions: keep`` spans all its N encoder tokens' positions, so its trailing dropped
        tokens (all N when it keeps none) still move the next token's position. Policies that
        renumber positions contiguously ignore it (default); ``full`` honours it."""

    def prepare_question(self, run_retrieval_pass: Callable[[], None]) -> None:
        """Called before a question's prompt is prefilled. ``run_retrieval_pass()`` prefills
        the question text once with kind ``"retrieval"`` (its KV is discarded); a policy that
        retrieves per layer (``rekv``) calls it as often as it needs. Default: nothing."""

    def _pad(self, values: np.ndarray, chunk_len: int) -> np.ndarray:
        out = np.full(chunk_len, -1, dtype=np.int64)
        out[: len(values)] = values
        return out


def _rank_positions(visible: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, int]:
    """``cache_positions [S]`` giving the visible slots their rank 0..m-1 by ``order``
    (stream order), and m. Invisible slots get 0 (never attended)."""
    idx = np.argsort(np.where(visible, order, _NO_SEQ), kind="stable")
    m = int(visible.sum())
    pos = np.zeros(len(visible), dtype=np.int64)
    pos[idx[:m]] = np.arange(m, dtype=np.int64)
    return pos, m
