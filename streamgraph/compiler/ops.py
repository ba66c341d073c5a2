"""Op registry: what each ``op:`` of a graph file means.

Every node of a graph names an op. The registry records, per op, its kind (``encoder``,
``reducer``, ``cache`` or ``decoder``), the pydantic model of its parameters (one model
per op; the ``op`` field is the discriminator), its input ports with their port types,
its output port type, and the static shape rules the graph checker applies.

Port types: ``Frames`` (the built-in source ``frames``), ``VisualTokens`` (per-frame
visual tokens from an encoder or a token reducer), ``Text`` (the built-in source
``query``) and ``CachePolicy`` (a KV-cache policy node, referenced by the decoder's
``cache`` field).

Adding an op is a params model plus a :func:`register` call, for example::

    class PoolNode(NodeBase):
        \"\"\"Average-pool visual tokens to a token budget.\"\"\"
        op: Literal["pool"]
        input: NodeRef
        tokens_per_frame: int = Field(ge=1)

    register(OpInfo("pool", "reducer", PoolNode,
                    inputs=(Port("input", PortType.VISUAL_TOKENS),),
                    output=PortType.VISUAL_TOKENS,
                    infer_shape=_budget_shape))

This module never imports torch.
"""
from __future__ import annotations

import enum
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "PortType", "OpKind", "Port", "TokenShape", "ShapeContext", "ShapeError", "OpInfo",
    "NodeBase", "NodeRef", "SOURCES", "OPS", "register", "get_op", "op_names", "producers",
    "VisionEncoderNode", "TopkSaliencyNode", "NoneNode", "FullNode", "SinkWindowNode",
    "DecoderNode", "PoolNode",
]


class PortType(str, enum.Enum):
    """Type of the value flowing along an edge of the graph."""

    FRAMES = "Frames"
    VISUAL_TOKENS = "VisualTokens"
    TEXT = "Text"
    CACHE_POLICY = "CachePolicy"

    def __str__(self) -> str:  # used in error messages
        return self.value


OpKind = Literal["encoder", "reducer", "cache", "decoder"]

#: Built-in sources: names a node can reference in ``input`` without defining them.
SOURCES: dict[str, PortType] = {"frames": PortType.FRAMES, "query": PortType.TEXT}


@dataclass(frozen=True)
class Port:
    """One input port of an op.

    ``field`` is the params field that names the producing node(s). Several ports can
    share one list-valued field (the decoder's ``input: [pruner, query]``): each
    reference is then assigned to the port whose type matches the producer's output.
    """

    name: str
    type: PortType
    field: str = "input"


@dataclass(frozen=True)
class TokenShape:
    """Static shape of per-frame visual tokens: ``n`` tokens of ``c`` channels; ``grid``
    (rows, cols) when the tokens still form a raster grid (``rows * cols == n``)."""

    n: int
    c: int
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class ShapeContext:
    """Facts shape rules need that are not in a node's own params."""

    encoder_tokens: int  # N: visual tokens per frame the encoder emits
    hidden_size: int  # C: decoder width (after the projector)
    encoder_grid: tuple[int, int] | None = None  # (rows, cols) of the encoder's tokens


class ShapeError(Exception):
    """Raised by a shape or cache rule; the graph checker turns it into a located
    :class:`~streamgraph.errors.GraphError` at ``nodes.<node>.<field>``."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class NodeBase(BaseModel):
    """Base of every op's params model: unknown fields are errors, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


#: A reference to another node (or a built-in source) by name.
NodeRef = typing.Annotated[str, Field(min_length=1)]


@dataclass(frozen=True)
class OpInfo:
    """Registry entry of one op.

    - ``infer_shape(params, input_shape, ctx)`` (encoders and reducers): output
      :class:`TokenShape`; ``input_shape`` is ``None`` for an encoder. Raises
      :class:`ShapeError` when the params cannot work with that input.
    - ``capacity(params)`` (cache policies): KV-cache capacity in slots.
    - ``check_cache(params, tokens_per_frame, decoder_params)`` (cache policies,
      optional): extra constraints; raises :class:`ShapeError`.
    """

    name: str
    kind: OpKind
    params: type[NodeBase]
    inputs: tuple[Port, ...] = ()
    output: PortType | None = None  # None: the op is the graph's sink (the decoder)
    infer_shape: Callable[[Any, TokenShape | None, ShapeContext], TokenShape] | None = None
    capacity: Callable[[Any], int] | None = None
    check_cache: Callable[[Any, int, Any], None] | None = None

    @property
    def doc(self) -> str:
        """First paragraph of the params model's docstring."""
        return (self.params.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")

    def input_fields(self) -> list[str]:
        """Params fields that reference other nodes, in port order, without repeats."""
        return list(dict.fromkeys(p.field for p in self.inputs))


OPS: dict[str, OpInfo] = {}


def register(info: OpInfo) -> OpInfo:
    """Add ``info`` to :data:`OPS`.

    Raises ``ValueError`` if the name is taken or the params model's ``op`` field is not
    ``Literal[info.name]``.
    """
    if info.name in OPS:
        raise ValueError(f"op {info.name!r} is already registered")
    op_field = info.params.model_fields.get("op")
    if op_field is None or typing.get_args(op_field.annotation) != (info.name,):
        raise ValueError(f"{info.params.__name__}.op must be Literal[{info.name!r}]")
    OPS[info.name] = info
    return info


def get_op(name: str) -> OpInfo:
    """Registry entry of op ``name``; ``KeyError`` naming the allowed ops if unknown."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r} (allowed: {', '.join(op_names())})") from None


def op_names() -> list[str]:
    """Registered op names, sorted."""
    return sorted(OPS)


def producers(port_type: PortType) -> list[str]:
    """Names of the registered ops whose output has ``port_type``, sorted."""
    return sorted(name for name, info in OPS.items() if info.output == port_type)


# --------------------------------------------------------------------------- encoders

class VisionEncoderNode(NodeBase):
    """Vision encoder + projector: turns each frame into visual tokens of the decoder's
    width (N tokens per frame, set by the model)."""

    op: Literal["vision_encoder"]
    input: NodeRef = "frames"
    """Frame source; only the built-in `frames` exists in v1."""


def _encoder_shape(params: VisionEncoderNode, inp: TokenShape | None,
                   ctx: ShapeContext) -> TokenShape:
    grid = ctx.encoder_grid
    if grid is not None and grid[0] * grid[1] != ctx.encoder_tokens:
        grid = None
    return TokenShape(ctx.encoder_tokens, ctx.hidden_size, grid)


register(OpInfo("vision_encoder", "encoder", VisionEncoderNode,
                inputs=(Port("input", PortType.FRAMES),),
                output=PortType.VISUAL_TOKENS, infer_shape=_encoder_shape))


# --------------------------------------------------------------------------- reducers

class TopkSaliencyNode(NodeBase):
    """Token pruner: keeps the `tokens_per_frame` visual tokens with the largest feature
    L2 norm in each frame (a fixed token budget)."""

    op: Literal["topk_saliency"]
    input: NodeRef
    """Node producing visual tokens (the encoder; v1 allows one reducer)."""
    tokens_per_frame: int = Field(ge=1)
    """Token budget K: visual tokens kept per frame (1 <= K <= N)."""
    positions: Literal["keep", "compact"] = "compact"
    """`keep`: kept tokens keep their original positions in the frame; `compact`: they
    get consecutive positions."""


def _budget_shape(params: Any, inp: TokenShape | None, ctx: ShapeContext) -> TokenShape:
    assert inp is not None
    k = params.tokens_per_frame
    if k > inp.n:
        raise ShapeError("tokens_per_frame",
                         f"token budget {k} exceeds the {inp.n} visual tokens per frame "
                         f"the encoder emits")
    return TokenShape(k, inp.c)


register(OpInfo("topk_saliency", "reducer", TopkSaliencyNode,
                inputs=(Port("input", PortType.VISUAL_TOKENS),),
                output=PortType.VISUAL_TOKENS, infer_shape=_budget_shape))


class NoneNode(NodeBase):
    """Identity token reducer: keeps every visual token."""

    op: Literal["none"]
    input: NodeRef
    """Node producing visual tokens."""


def _identity_shape(params: Any, inp: TokenShape | None, ctx: ShapeContext) -> TokenShape:
    assert inp is not None
    return inp


register(OpInfo("none", "reducer", NoneNode,
                inputs=(Port("input", PortType.VISUAL_TOKENS),),
                output=PortType.VISUAL_TOKENS, infer_shape=_identity_shape))


class PoolNode(NodeBase):
    """Token merger: LLaVA-OneVision's 2x2 bilinear pooling of each frame's token grid
    (h x w -> ceil(h/2) x ceil(w/2) tokens; a fixed budget, every token kept)."""

    op: Literal["pool"]
    input: NodeRef
    """Node producing a frame's full token grid (the encoder)."""


def _pool_shape(params: PoolNode, inp: TokenShape | None, ctx: ShapeContext) -> TokenShape:
    """K = ceil(h/2) * ceil(w/2) (transformers' ``LlavaOnevisionModel.apply_pooling``);
    ``source_index`` is the top-left source token of each output's bilinear footprint (see
    :mod:`streamgraph.reducers.pool`)."""
    assert inp is not None
    if inp.grid is None:
        raise ShapeError("input", f"pool needs a raster grid of visual tokens, but its input "
                         f"({inp.n} tokens per frame) has none; put pool directly after the "
                         f"encoder")
    h, w = inp.grid
    oh, ow = -(-h // 2), -(-w // 2)
    return TokenShape(oh * ow, inp.c, (oh, ow))


register(OpInfo("pool", "reducer", PoolNode,
                inputs=(Port("input", PortType.VISUAL_TOKENS),),
                output=PortType.VISUAL_TOKENS, infer_shape=_pool_shape))


# --------------------------------------------------------------------------- cache policies

class FullNode(NodeBase):
    """KV-cache policy: keep every token until the cache is full (then the session
    raises a capacity error)."""

    op: Literal["full"]
    capacity_tokens: int = Field(ge=1)
    """Capacity of the KV cache in slots."""


register(OpInfo("full", "cache", FullNode, output=PortType.CACHE_POLICY,
                capacity=lambda p: p.capacity_tokens))


class SinkWindowNode(NodeBase):
    """StreamingLLM KV-cache policy: keep the first `sink_tokens` tokens (attention
    sinks) plus a window of the most recent `window_tokens`; capacity = sink + window."""

    op: Literal["sink_window"]
    sink_tokens: int = Field(ge=0)
    """Attention-sink slots kept from the start of the stream."""
    window_tokens: int = Field(ge=1)
    """Slots of the recent window (evicted oldest first)."""


def _check_sink_window(params: SinkWindowNode, tokens_per_frame: int,
                       decoder: Any) -> None:
    need = max(tokens_per_frame, decoder.prefill_chunk_tokens)
    if params.window_tokens < need:
        raise ShapeError("window_tokens",
                         f"window_tokens {params.window_tokens} must be >= {need} = "
                         f"max(visual tokens per frame {tokens_per_frame}, decoder "
                         f"prefill_chunk_tokens {decoder.prefill_chunk_tokens}) so that a "
                         f"prefill chunk fits in the window")


register(OpInfo("sink_window", "cache", SinkWindowNode, output=PortType.CACHE_POLICY,
                capacity=lambda p: p.sink_tokens + p.window_tokens,
                check_cache=_check_sink_window))


# --------------------------------------------------------------------------- decoder

class DecoderNode(NodeBase):
    """LLM decoder: prefills visual tokens and the text query into the KV cache and
    decodes answer tokens."""

    op: Literal["decoder"]
    input: list[NodeRef]
    """Exactly one visual-token node and the built-in text source, e.g. `[pruner, query]`."""
    cache: NodeRef
    """Name of the KV-cache policy node."""
    max_new_tokens: int = Field(32, ge=1)
    """Most tokens decoded per answer."""
    prefill_chunk_tokens: int = Field(64, ge=1)
    """Most text tokens per prefill chunk."""


register(OpInfo("decoder", "decoder", DecoderNode,
                inputs=(Port("visual", PortType.VISUAL_TOKENS),
                        Port("text", PortType.TEXT),
                        Port("cache", PortType.CACHE_POLICY, field="cache")),
                output=None))
