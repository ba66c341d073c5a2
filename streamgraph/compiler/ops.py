"""Op registry: what each ``op:`` of a graph file means.

Every node of a graph names an op. The registry records, per op, its kind (``encoder``,
``reducer``, ``cache`` or ``decoder``), the pydantic model of its parameters (one model
per op; the ``op`` field is the discriminator), its input ports with their port types,
its output port type, and the static shape rules the graph checker applies.

Port types: ``Frames`` (the built-in source ``frames``), ``VisualTokens`` (per-frame
visual tokens from an encoder or a token reducer), ``Text`` (the built-in source
``query``) and ``CachePolicy`` (a KV-cache policy node, referenced by the decoder's
``cache`` field).

Adding an op is a params model plus a :func:`register` call in a plugin file: a token
reducer or an encoder with reuse is ``streamgraph/reducers/<op>.py`` (params, shape rule,
torch module, registration; see :mod:`streamgraph.reducers.base`), a cache policy
``streamgraph/kv/<op>.py``. This module holds the registry core and the built-in ops
(``vision_encoder``, ``none``, ``decoder``); it imports no plugin (the plugins import it), so
the full registry is the one :mod:`streamgraph.compiler.spec` sees after importing the plugin
packages. ``ops.<ParamsModel>`` (e.g. ``ops.TopkSaliencyNode``) resolves the params model of
any registered op by its class name.

This module never imports torch.
"""
from __future__ import annotations

import enum
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from streamgraph.compiler.limits import MAX_BUCKETS, MAX_TOKENS

__all__ = [
    "PortType", "OpKind", "Port", "TokenShape", "ShapeContext", "ShapeError", "OpInfo",
    "NodeBase", "NodeRef", "TokenBudget", "budget_values", "SOURCES", "OPS", "register", "get_op", "op_names", "producers",
    "encoder_shape", "VisionEncoderNode", "NoneNode", "DecoderNode", "CacheContext", "cache_regions",
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


@dataclass(frozen=True)
class CacheContext:
    """Facts a cache policy's region rule needs: K visual tokens per frame (after the
    reducer), the stream's sampling fps, the decoder's chunk sizes (tokens), and where the
    node's relative paths resolve (DuoAttention's head pattern file)."""

    tokens_per_frame: int
    fps: float
    prefill_chunk_tokens: int
    max_new_tokens: int
    #: directory that relative paths of the cache node resolve against (the graph file's);
    #: None = the current directory
    base_dir: str | None = None


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


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{'integer' if isinstance(value, int) else 'number'} {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if value is None:
        return "null"
    return "a mapping" if isinstance(value, dict) else f"{type(value).__name__}"


def _check_budget(value: Any) -> int | list[int]:
    """Validate a token budget: an integer in [1, MAX_TOKENS], or a non-empty list of at most
    MAX_BUCKETS distinct such integers (budget buckets), returned sorted ascending. Raises
    ValueError."""
    if isinstance(value, list):
        if not value:
            raise ValueError("expected at least one token budget, got an empty list")
        if len(value) > MAX_BUCKETS:
            raise ValueError(f"expected at most {MAX_BUCKETS} token budgets (one engine each), "
                             f"got {len(value)}")
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"item {i}: expected an integer, got {_describe(v)}")
            if not 1 <= v <= MAX_TOKENS:
                raise ValueError(f"item {i}: {_range_problem(v)}")
        if len(set(value)) != len(value):
            raise ValueError(f"token budgets must be distinct, got {value}")
        return sorted(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_describe(value)} (a token budget is an "
                         f"integer >= 1 or a list of them)")
    if not 1 <= value <= MAX_TOKENS:
        raise ValueError(_range_problem(value))
    return value


def _range_problem(value: int) -> str:
    return f"must be >= 1, got {_int(value)}" if value < 1 else f"must be <= {MAX_TOKENS}, got {_int(value)}"


def _int(value: int) -> str:
    """``value``, or for one of more than 20 digits its digit count (it may not fit a
    float)."""
    return str(value) if abs(value) < 10**20 else f"an integer of {len(str(abs(value)))} digits"


#: A token budget K (``tokens_per_frame: 32``) or several budget buckets
#: (``tokens_per_frame: [16, 32, 64]``, stored ascending); the compiler builds one reducer
#: engine per bucket so the scheduler can degrade to a smaller one.
TokenBudget = typing.Annotated[
    int | list[int], PlainValidator(_check_budget),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
                              {"type": "array", "items": {"type": "integer", "minimum": 1,
                                                          "maximum": MAX_TOKENS},
                               "minItems": 1, "maxItems": MAX_BUCKETS, "uniqueItems": True}]})]


def budget_values(budget: int | list[int]) -> list[int]:
    """Budget buckets of a ``tokens_per_frame`` value, ascending."""
    return sorted(budget) if isinstance(budget, list) else [int(budget)]


@dataclass(frozen=True)
class OpInfo:
    """Registry entry of one op.

    - ``infer_shape(params, input_shape, ctx)`` (encoders and reducers): output
      :class:`TokenShape`; ``input_shape`` is ``None`` for an encoder. Raises
      :class:`ShapeError` when the params cannot work with that input.
    - ``capacity(params)`` (cache policies): KV-cache capacity in slots.
    - ``check_cache(params, tokens_per_frame, decoder_params)`` (cache policies,
      optional): extra constraints; raises :class:`ShapeError`.
    - ``frame_tokens(params, input_shape)`` (reducers, optional): the most visual tokens one
      frame can send to the decoder when that is more than the output shape's ``n`` (DTD
      sends a stream's first frame whole); the graph's cache checks use it.
    - ``regions(params, ctx)`` (cache policies, optional): the policy's fixed-capacity
      regions of the one KV buffer, ``{name: slots}`` in slot order, for a
      :class:`CacheContext`; when set, the capacity is their sum. Raises
      :class:`ShapeError`.
    - ``frame_extra_tokens`` (cache policies): tokens the policy appends to every frame's
      chunk (VideoScan's carrier: 1), so the decoder's chunk bound is K + this.
    - ``module`` (reducer and encoder plugins): builds the op's torch module(s); imports
      torch only when called. Reducers: ``(params dict, k) -> module`` of budget bucket K;
      encoders with reuse: ``(params dict, plain encoder module) -> {engine role: module}``.
    """

    name: str
    kind: OpKind
    params: type[NodeBase]
    inputs: tuple[Port, ...] = ()
    output: PortType | None = None  # None: the op is the graph's sink (the decoder)
    infer_shape: Callable[[Any, TokenShape | None, ShapeContext], TokenShape] | None = None
    capacity: Callable[[Any], int] | None = None
    check_cache: Callable[[Any, int, Any], None] | None = None
    frame_tokens: Callable[[Any, TokenShape], int] | None = None
    regions: Callable[[Any, CacheContext], dict[str, int]] | None = None
    frame_extra_tokens: int = 0
    module: Callable[..., Any] | None = None

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


def encoder_shape(params: Any, inp: TokenShape | None, ctx: ShapeContext) -> TokenShape:
    """Shape rule of an encoder: the model's N tokens of C channels per frame, with their raster
    grid when the model has one."""
    grid = ctx.encoder_grid
    if grid is not None and grid[0] * grid[1] != ctx.encoder_tokens:
        grid = None
    return TokenShape(ctx.encoder_tokens, ctx.hidden_size, grid)


register(OpInfo("vision_encoder", "encoder", VisionEncoderNode,
                inputs=(Port("input", PortType.FRAMES),),
                output=PortType.VISUAL_TOKENS, infer_shape=encoder_shape))


# --------------------------------------------------------------------------- reducers

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


# --------------------------------------------------------------------------- cache policies
# Every cache policy (its node, layout, runtime class and registration) is one file of
# streamgraph/kv/ and registers itself there on import (``import streamgraph.kv``, done by
# compiler/spec.py).


def cache_regions(op: str, params: dict, ctx: CacheContext) -> dict[str, int]:
    """Regions ``{name: slots}`` (in slot order) of cache op ``op`` with ``params`` (a
    node's fields without ``op``/``input``). Raises KeyError for a non-cache op and
    :class:`ShapeError` for params that cannot work in ``ctx``."""
    info = OPS[op]
    if info.kind != "cache":
        raise KeyError(f"not a cache policy op: {op!r}")
    node = info.params.model_validate({"op": op, **params})
    if info.regions is not None:
        return info.regions(node, ctx)
    assert info.capacity is not None, f"op {op!r} has neither regions nor capacity"
    return {"cache": info.capacity(node)}


# --------------------------------------------------------------------------- decoder

class DecoderNode(NodeBase):
    """LLM decoder: prefills visual tokens and the text query into the KV cache and
    decodes answer tokens."""

    op: Literal["decoder"]
    input: list[NodeRef]
    """Exactly one visual-token node and the built-in text source, e.g. `[pruner, query]`."""
    cache: NodeRef
    """Name of the KV-cache policy node."""
    max_new_tokens: int = Field(32, ge=1, le=MAX_TOKENS)
    """Most tokens decoded per answer."""
    prefill_chunk_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    """Most text tokens per prefill chunk."""


register(OpInfo("decoder", "decoder", DecoderNode,
                inputs=(Port("visual", PortType.VISUAL_TOKENS),
                        Port("text", PortType.TEXT),
                        Port("cache", PortType.CACHE_POLICY, field="cache")),
                output=None))


def __getattr__(name: str) -> Any:
    """``ops.<ParamsModel>``: the params model of a registered op by class name (the plugins'
    models live in their files; this finds the ones registered so far)."""
    for info in OPS.values():
        if info.params.__name__ == name:
            return info.params
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
