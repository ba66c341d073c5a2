"""The KV subsystem's base: the static KV buffer, the step plan, the cache-policy base, the
chunk kinds, the typed cache layout and the policy registry.

One buffer ``kv_cache[L, 2, B, Hkv, S, Dh]`` is allocated once per session (by the backend,
which may keep it on its device) and never reallocated (DESIGN.md, "The static KV
contract"). A :class:`CachePolicy` is pure host-side index arithmetic over its slots: before
every decoder step it returns a :class:`StepPlan` (slots to write, RoPE positions, slot
visibility); after the step the backend scatters the step's new KV into ``write_slots`` and the
policy commits. Policies that move KV between regions or to host memory (ReKV) go through
:meth:`KVBuffer.read_slots` / :meth:`KVBuffer.write_slots`, never ``.data``, so a
device-resident buffer works the same.

A policy is one file of this package (``kv/full.py``, ``kv/sink_window.py``,
``kv/streaming_vlm.py``, ``kv/rekv.py``, ``kv/carrier.py``, ``kv/duo.py``) holding its
parameters (the graph node), its layout (regions, bytes, host bytes: the ONE function the
compiler's plan and the runtime class both read), its policy class and its registration: the
compiler's :class:`~streamgraph.compiler.ops.OpInfo` and a :class:`PolicySpec` in
:data:`POLICIES` (modelled on vLLM v1's KV cache manager: one spec class per attention type,
a map from spec to the manager that runs it).
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from streamgraph.compiler.ops import CacheContext, ShapeError  # noqa: F401  (re-exported)
from streamgraph.contract import DTYPES


class ChunkKind(str, enum.Enum):
    """What a chunk given to :meth:`CachePolicy.plan_step` is, in this order within a turn.

    Every policy matches the kinds explicitly (a ``match`` with every case); an unknown kind
    is a one-line ValueError (:func:`chunk_kind`). docs/kv-policies.md has the table of what
    each policy does with each kind.
    """

    #: the prompt prefix, once at session start (system prompt, opening of the first user turn)
    PREFIX = "prefix"
    #: a frame's visual tokens (``carrier``: plus the carrier token)
    FRAME = "frame"
    #: the question text, run only to score blocks and discarded (``rekv`` only, from
    #: :meth:`CachePolicy.prepare_question`, before the turn's chunks)
    RETRIEVAL = "retrieval"
    #: one embedding closing the frames of a user turn before its question (LLaVA-OneVision's
    #: ``image_newline``; only in bundles with ``prompt.video_end_embedding``, and only when
    #: frames were prefilled since the last question)
    VIDEO_END = "video_end"
    #: the question prompt (text before and after the question, ending with the assistant-turn
    #: opening), in chunks of at most ``prefill_chunk_tokens``
    QUESTION = "question"
    #: one answer token
    DECODE = "decode"
    #: the end of the answer turn and the opening of the next user turn (plus the last answer
    #: token when the answer stopped at ``max_new_tokens``)
    RESUME = "resume"


_KINDS: dict[str, ChunkKind] = {k.value: k for k in ChunkKind}


def chunk_kind(kind: "str | ChunkKind | None", policy: str) -> ChunkKind | None:
    """``kind`` as a :class:`ChunkKind` (None stays None: policies that ignore kinds accept
    it). Raises ValueError naming ``policy`` for an unknown kind."""
    if kind is None:
        return None
    k = _KINDS.get(kind)
    if k is None:
        raise ValueError(f"cache policy {policy!r}: unknown chunk kind {kind!r} "
                         f"(one of {', '.join(_KINDS)})")
    return k


def unknown_kind(policy: str, kind: Any) -> ValueError:
    """The one-line error of a kind a policy's ``match`` has no case for."""
    return ValueError(f"cache policy {policy!r}: unknown chunk kind {kind!r} (one of {', '.join(_KINDS)})")


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
        positions contiguously ignore them. ``kind`` says what the chunk is
        (:class:`ChunkKind` or its name; ``full``, ``sink_window`` and ``duo`` treat every
        kind as a stream token and also accept None). Returns ``StepPlan`` with arrays of
        ``[chunk_len]`` (write slots, positions) and ``[S]`` (cache positions, visibility).
        Raises :class:`CapacityError` when the chunk cannot be placed and ValueError for an
        unknown kind.
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


class AppendCache(CachePolicy):
    """The shared core of the policies that never evict (``full``, ``duo``): slot ``i`` holds
    stream token ``i`` at its absolute stream position (``positions: keep`` offsets honoured;
    :meth:`reserve_positions` moves the next position without writing), every written slot is
    visible, and a chunk that does not fit raises :class:`~streamgraph.errors.CapacityError`
    (the buffer never grows). Subclasses match the chunk kinds and call :meth:`plan_append`."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.next_position = 0

    def plan_append(self, chunk_len: int, n_valid: int, offsets: np.ndarray | None) -> StepPlan:
        """The step that appends the chunk's ``n_valid`` valid tokens after the last written
        slot, at ``next_position + offsets`` (``offsets`` default ``0..n_valid-1``); padding
        tokens get positions after them. Raises CapacityError when they do not fit."""
        from streamgraph.errors import CapacityError

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


def _rank_positions(visible: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, int]:
    """``cache_positions [S]`` giving the visible slots their rank 0..m-1 by ``order``
    (stream order), and m. Invisible slots get 0 (never attended)."""
    idx = np.argsort(np.where(visible, order, _NO_SEQ), kind="stable")
    m = int(visible.sum())
    pos = np.zeros(len(visible), dtype=np.int64)
    pos[idx[:m]] = np.arange(m, dtype=np.int64)
    return pos, m


def region_starts(sizes: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """``{name: slots}`` in slot order -> ``{name: (start, slots)}`` (regions are contiguous
    from slot 0)."""
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = (start, int(n))
        start += int(n)
    return out


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class KVDims:
    """Model facts a layout needs: the KV buffer's ``[L, 2, B, Hkv, S, Dh]`` without ``S``,
    the decoder width ``C`` and the query heads ``H``; ``dtype`` a name of
    :data:`~streamgraph.contract.DTYPES`."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_heads: int
    batch: int = 1
    dtype: str = "float32"

    @classmethod
    def from_config(cls, cfg, batch: int = 1, dtype: str = "float32") -> "KVDims":
        """From a :class:`~streamgraph.models.config.VLMConfig` (its ``text`` part)."""
        x = cfg.text
        return cls(int(x.num_hidden_layers), int(x.num_key_value_heads), int(x.head_dim),
                   int(x.hidden_size), int(x.num_attention_heads), int(batch), dtype)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot of the KV buffer (all layers, K and V, every KV head)."""
        return self.num_layers * 2 * self.batch * self.num_kv_heads * self.head_dim * DTYPES[self.dtype].bytes


@dataclass(frozen=True)
class Region:
    """A contiguous range of the KV buffer's slot axis: ``[start, start + slots)``, taking
    ``bytes`` of the buffer."""

    name: str
    start: int
    slots: int
    bytes: int


@dataclass(frozen=True)
class CacheLayout:
    """A cache policy's memory layout, computed once by its :class:`PolicySpec` from the
    graph's parameters and read by the compiler (plan, memory budget) and the runtime (the
    policy's regions, sizes and facts).

    ``capacity`` slots S, ``regions`` in slot order, ``host_bytes`` host RAM the policy keeps
    outside the buffer (ReKV's block store RAM tier, VideoScan's carrier embeddings),
    ``tokens_per_frame`` K (the largest frame the cache is planned for), ``frame_extra_tokens``
    tokens the policy appends to a frame's chunk, ``facts`` policy-specific JSON-able values
    (ReKV: ``block_tokens``, ``store_blocks``, ``block_bytes``, ``key_bytes``; DuoAttention:
    ``streaming_heads``...). In the manifest it is the plan's ``cache`` dict
    (:meth:`to_dict`, next to ``op`` and ``params``).
    """

    capacity: int
    regions: tuple[Region, ...]
    host_bytes: int = 0
    tokens_per_frame: int = 0
    frame_extra_tokens: int = 0
    facts: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, sizes: Mapping[str, int], dims: KVDims, *, tokens_per_frame: int,
              frame_extra_tokens: int = 0, host_bytes: int = 0, **facts: Any) -> "CacheLayout":
        """The layout of regions ``sizes`` (``{name: slots}`` in slot order) for ``dims``."""
        sb = dims.slot_bytes
        regions = tuple(Region(n, s, k, k * sb) for n, (s, k) in region_starts(sizes).items())
        return cls(sum(r.slots for r in regions), regions, int(host_bytes), int(tokens_per_frame),
                   int(frame_extra_tokens), dict(facts))

    def sizes(self) -> dict[str, int]:
        """``{name: slots}`` in slot order."""
        return {r.name: r.slots for r in self.regions}

    def region(self, name: str) -> Region:
        """The region called ``name``. Raises KeyError."""
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"cache layout has no region {name!r} (regions: {', '.join(self.sizes())})")

    def to_dict(self) -> dict:
        """JSON-able form (the plan's ``cache`` entry without ``op``/``params``)."""
        return {"capacity": self.capacity,
                "regions": [{"name": r.name, "start": r.start, "slots": r.slots, "bytes": r.bytes}
                            for r in self.regions],
                "host_bytes": self.host_bytes, "tokens_per_frame": self.tokens_per_frame,
                "frame_extra_tokens": self.frame_extra_tokens, **self.facts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheLayout":
        """Inverse of :meth:`to_dict` (extra keys such as ``op``/``params`` are ignored as
        facts are every key :meth:`to_dict` does not write itself)."""
        own = {"capacity", "regions", "host_bytes", "tokens_per_frame", "frame_extra_tokens", "op", "params"}
        return cls(int(d["capacity"]), tuple(Region(r["name"], int(r["start"]), int(r["slots"]), int(r["bytes"]))
                                             for r in d["regions"]),
                   int(d.get("host_bytes", 0)), int(d.get("tokens_per_frame", 0)),
                   int(d.get("frame_extra_tokens", 0)), {k: v for k, v in d.items() if k not in own})


# ----------------------------------------------------------------------------- registry
class PolicySpec(ABC):
    """One cache policy's spec: its graph op, parameters model, layout rule and runtime
    factory. Subclass it once per policy (in the policy's file) and :func:`register_policy`
    an instance; the registration also registers the compiler's op (``OpInfo``) from the
    same rules, so the compiler and the runtime cannot disagree on a layout.

    Modelled on vLLM v1's KV cache manager (``vllm/v1/kv_cache_interface.py``: one
    ``KVCacheSpec`` per attention type; ``single_type_kv_cache_manager.py``: a map from spec
    type to the manager that runs it).
    """

    #: the graph's ``op:`` name
    op: ClassVar[str]
    #: the pydantic params model (the graph node)
    params: ClassVar[type]
    #: tokens the policy appends to every frame's chunk (``carrier``: its carrier token)
    frame_extra_tokens: ClassVar[int] = 0

    @abstractmethod
    def region_sizes(self, p: Any, ctx: CacheContext) -> dict[str, int]:
        """``{region: slots}`` in slot order for params ``p`` (the validated node). Raises
        :class:`~streamgraph.compiler.ops.ShapeError` (``field`` names the param) for
        params that cannot work in ``ctx``."""

    def facts(self, p: Any, ctx: CacheContext, dims: KVDims) -> dict[str, Any]:
        """Policy facts the runtime needs beyond the regions, JSON-able; ``host_bytes`` among
        them is the host RAM the policy keeps (default: none). Raises ShapeError."""
        return {}

    def check(self, p: Any, tokens_per_frame: int, decoder: Any) -> None:
        """Extra graph check with the decoder node (default: none). Raises ShapeError."""

    def layout(self, p: Any, ctx: CacheContext, dims: KVDims) -> CacheLayout:
        """The policy's :class:`CacheLayout` for params ``p`` (a node or a params dict)."""
        if isinstance(p, Mapping):
            p = self.params.model_validate({"op": self.op, **p})
        facts = dict(self.facts(p, ctx, dims))
        host = int(facts.pop("host_bytes", 0))
        return CacheLayout.build(self.region_sizes(p, ctx), dims, tokens_per_frame=ctx.tokens_per_frame,
                                 frame_extra_tokens=self.frame_extra_tokens, host_bytes=host, **facts)

    @abstractmethod
    def make(self, params: Mapping[str, Any], layout: CacheLayout | None, plan: Any,
             store_dir: Any = None) -> "CachePolicy":
        """The runtime policy for ``params`` with the plan's ``layout`` (None when there is
        no plan; a policy that needs one raises ValueError)."""

    def _need(self, layout: CacheLayout | None) -> CacheLayout:
        if layout is None:
            raise ValueError(f"cache policy {self.op!r} needs the plan (region sizes, model dims)")
        return layout


#: op name -> its :class:`PolicySpec` (filled by the policy modules on import).
POLICIES: dict[str, PolicySpec] = {}


def register_policy(spec: PolicySpec, *, capacity: Callable[[Any], int] | None = None) -> PolicySpec:
    """Register ``spec`` in :data:`POLICIES` and its op in the compiler's op registry
    (``OpInfo``: kind ``cache``, output ``CachePolicy``, ``regions`` = the spec's
    :meth:`~PolicySpec.region_sizes`). ``capacity(p)`` optionally gives the capacity without a
    context (``full``, ``sink_window``). Raises ValueError for a name registered twice."""
    from streamgraph.compiler.ops import OpInfo, PortType, register

    if spec.op in POLICIES:
        raise ValueError(f"cache policy {spec.op!r} is already registered")
    POLICIES[spec.op] = spec
    check = type(spec).check is not PolicySpec.check
    register(OpInfo(spec.op, "cache", spec.params, output=PortType.CACHE_POLICY, capacity=capacity,
                    check_cache=spec.check if check else None, regions=spec.region_sizes,
                    frame_extra_tokens=spec.frame_extra_tokens))
    return spec
