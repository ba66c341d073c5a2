"""Static plan: every engine's I/O shapes and the memory plan in bytes (torch-free).

The plan is computed before lowering, so a graph that cannot fit ``budget.memory_mb`` fails
in milliseconds with the numbers, not after minutes of export. It is stored in the bundle's
manifest and read back by the runtime, which allocates exactly ``plan.kv.bytes`` for the KV
buffer ``kv_cache[L, 2, B, Hkv, S, Dh]`` (DESIGN.md, "The static KV contract").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from typing_extensions import TypedDict  # pydantic validates these on Python < 3.12 only from here

from streamgraph.contract import (CACHE_POSITIONS, CACHE_VALID, DECODER_STEP, DECODER_STEP_INPUTS,
                                  DECODER_STEP_OUTPUTS, DTYPES, EMBED_TOKENS, ENCODER_REFS, INPUT_IDS,
                                  INPUTS_EMBEDS, KEEP_MASK, KV_CACHE, LAST_HIDDEN, LOGITS, NEW_KV,
                                  PIXEL_VALUES, POSITIONS, QUERY_MEAN, SOURCE_INDEX, STREAMING_HEADS,
                                  TOKEN_VALID, TOKENS, VISION_ENCODER, VISION_ENCODER_REUSE, VISUAL_TOKENS,
                                  WINDOW_VALID, engine_file, reducer_engine)
from streamgraph.errors import PlanError

MiB = 1024 * 1024


class CachePlanError(PlanError):
    """A cache policy parameter the plan cannot work with; ``field`` names it (a field of
    the graph's cache node), so the graph checker can locate the error there."""

    def __init__(self, message: str, *, field: str | None):
        super().__init__(message)
        self.field = field


@dataclass
class TensorSpec:
    """One engine input/output: ``shape`` holds ints and the symbolic chunk axis ``"T"``."""

    name: str
    dtype: str
    shape: list

    def nbytes(self, t: int) -> int:
        n = 1
        for d in self.shape:
            n *= t if d == "T" else int(d)
        return n * DTYPES[self.dtype].bytes


@dataclass
class EnginePlan:
    """One engine: file, I/O, the range of its dynamic axis, weight and activation bytes."""

    name: str
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, list[int]] = field(default_factory=dict)   # {"T": [min, max]}
    weights_bytes: int = 0
    activations_bytes: int = 0                                  # peak estimate at the largest T

    def io_bytes(self) -> int:
        t = self.dims.get("T", [1, 1])[1]
        return sum(s.nbytes(t) for s in self.inputs + self.outputs)


@dataclass
class KVPlan:
    """The one KV buffer: ``shape = [L, 2, B, Hkv, S, Dh]``, ``bytes`` = its exact size."""

    shape: list[int]
    dtype: str
    bytes: int


@dataclass
class MemoryPlan:
    """Bytes by part. ``activations_bytes`` is an estimate (peak intermediate of the largest
    engine at its largest chunk); the others are exact."""

    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    io_bytes: int
    total_bytes: int
    budget_bytes: int
    host_bytes: int = 0          # host RAM of the cache policy (ReKV block store, carriers)

    def table(self) -> list[tuple[str, int]]:
        rows = [("weights", self.weights_bytes), ("kv_cache", self.kv_cache_bytes),
                ("activations (est.)", self.activations_bytes), ("engine I/O", self.io_bytes),
                ("total", self.total_bytes), ("budget", self.budget_bytes)]
        if self.host_bytes:
            rows.append(("host cache store (not in total)", self.host_bytes))
        return rows


class ReducerEntry(TypedDict, total=False):
    """``Plan.reducer``: the token reducer the engines ``reducer_k{K}`` run."""

    op: str                     # registered reducer op
    params: dict[str, Any]      # the graph node's fields (pool: + "grid" [rows, cols])
    state: list[str]            # state inputs "state_<name>" (the runtime owns the buffers)
    first_frame_full: bool      # the first frame of a stream is sent whole (DTD)


class EncoderEntry(TypedDict):
    """``Plan.encoder``: an encoder with reuse (``stc_cacher``); None for the plain encoder."""

    op: str
    params: dict[str, Any]


@dataclass
class Plan:
    """Everything the runtime needs to know ahead of time about shapes and memory."""

    batch: int
    image_size: list[int]                 # [H, W] pixels fed to the vision encoder
    encoder_tokens: int                   # N visual tokens per frame at the encoder output
    tokens_per_frame: int                 # K tokens per frame after the reducer (largest bucket)
    hidden_size: int                      # C
    vocab_size: int
    reducer: ReducerEntry | None          # {"op", "params", "state", "first_frame_full"} or None
    cache: dict                           # {"op", "params", "capacity", "regions", "host_bytes", ...}
    chunk_max: int                        # largest prefill chunk T
    prefill_chunk_tokens: int
    max_new_tokens: int
    kv: KVPlan
    engines: dict[str, EnginePlan]
    memory: MemoryPlan
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    #: Token budget buckets, ascending; one engine ``reducer_k{K}`` each when there is a
    #: reducer (``[N]`` without one).
    budgets: list[int] = field(default_factory=list)
    #: Encoder reuse: ``{"op": "stc_cacher", "params": {...}}``, or None for the plain encoder.
    encoder: EncoderEntry | None = None
    encoder_grid: list[int] | None = None  # [rows, cols] of the N encoder tokens
    resample: str = "ffmpeg_bilinear"      # frame resize of the runtime (runtime.pipeline)
    rescale_factor: float = 1.0 / 255.0    # pixel scale before normalisation

    def reducer_engine(self, budget: int) -> str:
        """Engine name of the reducer bucket ``budget`` (``reducer_k{K}``)."""
        return reducer_engine(budget)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d["kv"] = KVPlan(**d["kv"])
        d["memory"] = MemoryPlan(**d["memory"])
        engines = {}
        for name, e in d["engines"].items():
            e = dict(e)
            e["inputs"] = [TensorSpec(**s) for s in e["inputs"]]
            e["outputs"] = [TensorSpec(**s) for s in e["outputs"]]
            engines[name] = EnginePlan(**e)
        d["engines"] = engines
        return cls(**d)


def cache_layout(op: str, params: dict, ctx, cfg, batch: int = 1, dtype: str = "float32") -> dict:
    """The cache policy's part of the plan, as the manifest stores it: the policy's typed
    :class:`~streamgraph.kv.base.CacheLayout` (computed by its spec in ``streamgraph/kv/<op>.py``,
    the one place a layout is written) as a dict — ``capacity`` (slots S), ``regions`` (list of
    ``{"name", "start", "slots", "bytes"}`` in slot order; bytes of the KV buffer each region
    takes), ``host_bytes`` (host RAM the policy keeps outside the buffer: the ReKV block
    store's RAM tier, VideoScan's carrier embeddings), ``tokens_per_frame``,
    ``frame_extra_tokens`` and the policy's facts (ReKV: ``block_tokens``, ``store_blocks``,
    ``block_bytes``, ``key_bytes``; DuoAttention: ``streaming_heads``, ...).

    ``ctx`` is a :class:`~streamgraph.compiler.ops.CacheContext`, ``cfg`` the model config.
    Raises KeyError for an unknown cache op and :class:`~streamgraph.compiler.ops.ShapeError`
    for params that do not work."""
    from streamgraph.kv import POLICIES, KVDims

    return POLICIES[op].layout(params, ctx, KVDims.from_config(cfg, batch, dtype)).to_dict()


def _vision_activation_bytes(cfg, b: int) -> int:
    v = cfg.vision
    n = v.num_patches
    scores = b * v.num_attention_heads * n * n * 4 * 2          # scores + probs, fp32
    mlp = b * n * v.intermediate_size * 4 * 2
    hidden = b * n * v.hidden_size * 4 * 6
    proj = b * n * cfg.text.hidden_size * 4 * 3
    return scores + mlp + hidden + proj


def _decoder_activation_bytes(cfg, b: int, t: int, s: int) -> int:
    x = cfg.text
    ctx = s + t
    scores = b * x.num_attention_heads * t * ctx * 4 * 3         # scores, mask fill, probs
    kv_expanded = 2 * b * x.num_attention_heads * ctx * x.head_dim * 4 * 2  # rope'd + GQA-expanded
    mlp = b * t * x.intermediate_size * 4 * 3
    hidden = b * t * x.hidden_size * 4 * 8
    logits = b * x.vocab_size * 4
    return scores + kv_expanded + mlp + hidden + logits


def make_plan(*, cfg, reducer: dict | None, tokens_per_frame: int, cache: dict,
              prefill_chunk_tokens: int, max_new_tokens: int, budget_mb: float,
              engine_weight_bytes: dict[str, int], batch: int = 1, dtype: str = "float32",
              budgets: list[int] | None = None,
              reducer_io: dict[int, tuple[list[TensorSpec], list[TensorSpec]]] | None = None,
              encoder: dict | None = None, max_frame_tokens: int | None = None,
              fps: float = 0.0, layout: dict | None = None) -> Plan:
    """Plan shapes and memory.

    ``cfg`` is a :class:`~streamgraph.models.config.VLMConfig`; ``reducer``/``cache`` are
    ``{"op", "params"}`` dicts; ``engine_weight_bytes`` maps engine name -> bytes of its
    parameters. ``budgets`` are the reducer's budget buckets (default ``[tokens_per_frame]``);
    ``reducer_io`` maps a bucket to its engine's (inputs, outputs) (default: ``visual_tokens``
    -> ``tokens, keep_mask, source_index``). ``encoder`` is ``{"op": "stc_cacher", "params"}``
    for encoder reuse (adds output ``encoder_refs [Lv,4,B,N,Cv]`` to ``vision_encoder`` and the
    engine ``vision_encoder_reuse``). ``max_frame_tokens`` (default K) bounds the prefill chunk
    when a reducer can send a frame whole. ``fps`` is the stream's sampling fps (cache
    windows given in seconds). ``layout`` is the cache policy's :func:`cache_layout` when the
    caller computed it (the ``plan_cache_layout`` pass); else it is computed here. Raises
    :class:`CachePlanError` for cache parameters that do not work and :class:`PlanError` when
    the total exceeds ``budget_mb`` MiB, naming every part.
    """
    from streamgraph.compiler.ops import CacheContext, ShapeError

    v, x = cfg.vision, cfg.text
    b, n, k, c = batch, cfg.encoder_tokens, tokens_per_frame, x.hidden_size
    budgets = sorted(budgets) if budgets else [k]
    try:
        layout = layout or cache_layout(cache["op"], cache["params"],
                              CacheContext(max(k, max_frame_tokens or 0), float(fps), prefill_chunk_tokens,
                                           max_new_tokens),
                              cfg, b, dtype)
    except ShapeError as e:
        raise CachePlanError(e.message, field=e.field) from None
    cap = layout["capacity"]
    t_max = max(max(k, max_frame_tokens or 0) + layout["frame_extra_tokens"], prefill_chunk_tokens)
    kv_shape = [x.num_hidden_layers, 2, b, x.num_key_value_heads, cap, x.head_dim]
    kv_bytes = math.prod(kv_shape) * DTYPES[dtype].bytes  # exact: numpy's int64 can overflow
    h, w = v.image_size
    f, i64, bl = dtype, "int64", "bool"

    engines: dict[str, EnginePlan] = {}
    pixels = TensorSpec(PIXEL_VALUES, f, [b, v.num_channels, h, w])
    # STC-Cacher references: the layers that run (up to the deepest feature layer) x ViT tokens
    refs = TensorSpec(ENCODER_REFS, f, [v.layers_used, 4, b, v.num_patches, v.hidden_size])
    engines[VISION_ENCODER] = EnginePlan(
        VISION_ENCODER, engine_file(VISION_ENCODER), [pixels],
        [TensorSpec(VISUAL_TOKENS, f, [b, n, c])] + ([refs] if encoder is not None else []),
        weights_bytes=engine_weight_bytes.get(VISION_ENCODER, 0),
        activations_bytes=_vision_activation_bytes(cfg, b))
    if encoder is not None:
        engines[VISION_ENCODER_REUSE] = EnginePlan(
            VISION_ENCODER_REUSE, engine_file(VISION_ENCODER_REUSE), [pixels, refs],
            [TensorSpec(VISUAL_TOKENS, f, [b, n, c])],
            weights_bytes=engine_weight_bytes.get(VISION_ENCODER_REUSE, 0),
            activations_bytes=_vision_activation_bytes(cfg, b))
    if reducer is not None:
        for kb in budgets:
            name = reducer_engine(kb)
            ins, outs = (reducer_io or {}).get(kb) or (
                [TensorSpec(VISUAL_TOKENS, f, [b, n, c])],
                [TensorSpec(TOKENS, f, [b, kb, c]), TensorSpec(KEEP_MASK, bl, [b, kb]),
                 TensorSpec(SOURCE_INDEX, i64, [b, kb])])
            engines[name] = EnginePlan(name, engine_file(name), ins, outs,
                                       weights_bytes=engine_weight_bytes.get(name, 0),
                                       activations_bytes=b * n * c * 4 * 2)
    engines[EMBED_TOKENS] = EnginePlan(
        EMBED_TOKENS, engine_file(EMBED_TOKENS),
        [TensorSpec(INPUT_IDS, i64, [b, "T"])], [TensorSpec(INPUTS_EMBEDS, f, [b, "T", c])],
        dims={"T": [1, t_max]}, weights_bytes=engine_weight_bytes.get(EMBED_TOKENS, 0))
    # decoder_step's I/O in the contract's engine order (contract.DECODER_STEP_INPUTS/_OUTPUTS)
    dec_in = {INPUTS_EMBEDS: (f, [b, "T", c]), POSITIONS: (i64, [b, "T"]), TOKEN_VALID: (bl, [b, "T"]),
              KV_CACHE: (f, kv_shape), CACHE_POSITIONS: (i64, [b, cap]), CACHE_VALID: (bl, [b, cap]),
              WINDOW_VALID: (bl, [b, cap]), STREAMING_HEADS: (bl, [x.num_hidden_layers, x.num_key_value_heads])}
    dec_out = {LOGITS: ("float32", [b, x.vocab_size]),
               NEW_KV: (f, [x.num_hidden_layers, 2, b, x.num_key_value_heads, "T", x.head_dim]),
               LAST_HIDDEN: (f, [b, c]),
               QUERY_MEAN: ("float32", [x.num_hidden_layers, b, x.num_attention_heads, x.head_dim])}
    engines[DECODER_STEP] = EnginePlan(
        DECODER_STEP, engine_file(DECODER_STEP),
        [TensorSpec(name, *dec_in[name]) for name in DECODER_STEP_INPUTS],
        [TensorSpec(name, *dec_out[name]) for name in DECODER_STEP_OUTPUTS],
        dims={"T": [1, t_max]}, weights_bytes=engine_weight_bytes.get(DECODER_STEP, 0),
        activations_bytes=_decoder_activation_bytes(cfg, b, t_max, cap))

    weights = sum(e.weights_bytes for e in engines.values())
    acts = max(e.activations_bytes for e in engines.values())
    # The KV buffer is an input of decoder_step but lives once, in the runtime: do not count it
    # again as engine I/O.
    io = sum(e.io_bytes() for e in engines.values()) - kv_bytes
    total = weights + kv_bytes + acts + io
    budget = int(budget_mb * MiB)
    memory = MemoryPlan(weights, kv_bytes, acts, io, total, budget, host_bytes=layout["host_bytes"])
    if total > budget:
        parts = ", ".join(f"{name} {val / MiB:.1f} MiB" for name, val in memory.table()[:4])
        raise PlanError(f"plan needs {total / MiB:.1f} MiB ({parts}) but budget.memory_mb is "
                        f"{budget_mb:g}; raise the budget or shrink the cache/token budget")
    return Plan(
        batch=b, image_size=[h, w], encoder_tokens=n, tokens_per_frame=k, hidden_size=c,
        vocab_size=x.vocab_size, reducer=reducer, cache={**cache, **layout},
        chunk_max=t_max, prefill_chunk_tokens=prefill_chunk_tokens, max_new_tokens=max_new_tokens,
        kv=KVPlan(kv_shape, dtype, kv_bytes), engines=engines, memory=memory,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        budgets=budgets if reducer is not None else [k], encoder=encoder,
        encoder_grid=list(cfg.encoder_grid), resample=cfg.resample, rescale_factor=cfg.rescale_factor)
