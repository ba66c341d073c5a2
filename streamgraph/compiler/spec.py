"""Graph files: YAML -> typed, validated :class:`GraphSpec`.

Every problem in a graph file raises :class:`~streamgraph.errors.SpecError` whose ``str``
is one line, ``FILE:LINE:COL: FIELD: MESSAGE``, pointing at the YAML node at fault::

    g.yaml:10:40: slo.ttft_ms: must be > 0, got -5

Parsing composes the YAML (keeping every node's line and column), rejects duplicate
keys, constructs plain values, checks each node's ``op`` against the registry
(:mod:`streamgraph.compiler.ops`; this module imports the plugin packages
:mod:`streamgraph.reducers` and :mod:`streamgraph.kv`, so it sees every op), then
validates with pydantic (strict types, unknown fields forbidden; every number finite and
within the bounds of :mod:`streamgraph.compiler.limits`) and converts pydantic's errors
into located messages. YAML is read as PyYAML's safe loader reads it, plus YAML 1.2
exponent floats (``1e3``), with collections nested at most ``limits.MAX_YAML_DEPTH`` deep.
Structural checks across nodes (references, cycles, port types, shapes) live in
:mod:`streamgraph.compiler.graph`.

Regenerate ``docs/graph.schema.json`` with
``streamgraph schema -o docs/graph.schema.json`` (or ``python -m streamgraph.compiler.spec``).
"""
from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, PrivateAttr, ValidationError,
                      WithJsonSchema, field_validator, model_validator)
from pydantic.json_schema import GenerateJsonSchema

from streamgraph.compiler import limits
import streamgraph.kv  # noqa: F401  (registers the cache-policy ops: one plugin file each)
import streamgraph.reducers  # noqa: F401  (registers the reducer and encoder-reuse ops)
from streamgraph.compiler.ops import OPS, SOURCES, op_names
from streamgraph.errors import SpecError
from streamgraph.runtime.scheduler import OVERLOAD_POLICIES

__all__ = [
    "GraphSpec", "ModelSpec", "StreamSpec", "LiveSpec", "SLOSpec", "BudgetSpec", "NodeSpec",
    "OverloadPolicy", "OVERLOAD_POLICIES", "ModelPreset", "MODEL_PRESETS", "NODE_NAME_PATTERN",
    "GRAPH_NAME_PATTERN", "RESERVED_NODE_NAMES", "load_spec", "parse_spec", "json_schema",
    "format_path", "OPS",
]

#: Overload policies of the scheduler (``slo.overload``): the names registered in
#: :data:`streamgraph.runtime.scheduler.OVERLOAD` (add a policy there).
OverloadPolicy = Literal[OVERLOAD_POLICIES]

#: Random-weight model presets (``model.preset``); extend here.
ModelPreset = Literal["tiny", "small"]
MODEL_PRESETS: tuple[str, ...] = typing.get_args(ModelPreset)

GRAPH_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
NODE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: Node names taken by the built-in sources.
RESERVED_NODE_NAMES: tuple[str, ...] = tuple(sorted(SOURCES))

_PATTERN_HINTS = {
    r"^[A-Za-z0-9_,]{1,64}$": "must be an FFmpeg format name (letters, digits, '_', ',')",
    GRAPH_NAME_PATTERN: "must start with a letter or digit and contain only letters, "
                        "digits, '_', '.' and '-'",
    NODE_NAME_PATTERN: "must start with a letter or '_' and contain only letters, digits "
                       "and '_'",
}

_TOP_LEVEL_KEYS = "version, name, model, stream, nodes, slo, budget"


# --------------------------------------------------------------------------- models

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class ModelSpec(_Section):
    """Which model weights to use: exactly one of `preset` or `hf`."""

    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["preset"]}, {"required": ["hf"]}]})

    preset: ModelPreset | None = None
    """Built-in architecture with random weights (for tests and benchmarks)."""
    hf: str | None = Field(None, min_length=1, max_length=limits.MAX_PATH_CHARS)
    """Local directory of a Hugging Face checkpoint (config.json + safetensors); a
    relative path is relative to the graph file. No control characters."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of the random weights of a preset."""
    dtype: Literal["float32", "float16"] = "float32"
    """Weight and activation dtype of the engines and the KV cache (softmax, norms and
    logits are computed in float32 either way)."""

    @field_validator("hf")
    @classmethod
    def _usable_path(cls, hf: str | None) -> str | None:
        if hf is None:
            return hf
        if not hf.isprintable():
            bad = next(c for c in hf if not c.isprintable())
            raise ValueError(f"a checkpoint path cannot contain the control character {bad!r}")
        for part in hf.split("/"):
            if len(part.encode("utf-8", "surrogatepass")) > limits.MAX_PATH_PART_BYTES:
                raise ValueError(f"path component {part[:20]!r}... is longer than "
                                 f"{limits.MAX_PATH_PART_BYTES} bytes (a file name's limit)")
        return hf

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "ModelSpec":
        if (self.preset is None) == (self.hf is None):
            got = "both" if self.preset is not None else "neither"
            raise ValueError(f"exactly one of 'preset' ({', '.join(map(repr, MODEL_PRESETS))})"
                             f" or 'hf' (checkpoint directory) is required, got {got}")
        return self


_FrameSide = Annotated[int, Field(ge=8, le=limits.MAX_FRAME_SIDE)]


#: Most sources one graph file names (``stream.source`` as a list: one stream each).
MAX_SOURCES = 64
#: URL schemes of live sources (as :data:`streamgraph.runtime.live.LIVE_SCHEMES`).
_LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "tcp", "udp", "rtp", "srt")


def _source_problem(text: str) -> str | None:
    if not text:
        return "must not be empty"
    if len(text) > limits.MAX_PATH_CHARS:
        return f"must be at most {limits.MAX_PATH_CHARS} characters, got {len(text)}"
    if not text.isprintable():
        bad = next(c for c in text if not c.isprintable())
        return f"cannot contain the control character {bad!r}"
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if m and m.group(1).lower() not in _LIVE_SCHEMES:
        return (f"unsupported URL scheme {m.group(1)!r} (live sources: {', '.join(_LIVE_SCHEMES)}; "
                "a file is given by its path)")
    return None


def _check_source(value: Any) -> str | list[str]:
    if isinstance(value, list):
        if not value:
            raise ValueError("expected at least one source, got an empty list")
        if len(value) > MAX_SOURCES:
            raise ValueError(f"expected at most {MAX_SOURCES} sources, got {len(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise ValueError(f"item {i}: expected a URL, device or path, got {_describe(v)}")
            problem = _source_problem(v)
            if problem:
                raise ValueError(f"item {i}: {problem}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a URL, device or path (or a list of them), got {_describe(value)}")
    problem = _source_problem(value)
    if problem:
        raise ValueError(problem)
    return value


_SOURCE_ITEM = {"type": "string", "minLength": 1, "maxLength": limits.MAX_PATH_CHARS}
#: ``stream.source``: one source, or a list of them (one stream each).
SourceField = Annotated[
    str | list[str], PlainValidator(_check_source),
    WithJsonSchema({"anyOf": [_SOURCE_ITEM, {"type": "array", "items": _SOURCE_ITEM, "minItems": 1,
                                             "maxItems": MAX_SOURCES}]})]


def _option_text(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


_OptionValue = Annotated[str, BeforeValidator(_option_text), Field(max_length=limits.MAX_PATH_CHARS),
                         WithJsonSchema({"anyOf": [{"type": "string", "maxLength": limits.MAX_PATH_CHARS},
                                                   {"type": "number", "minimum": -1e308, "maximum": 1e308}]})]
_FORMAT_PATTERN = r"^[A-Za-z0-9_,]{1,64}$"


class LiveSpec(_Section):
    """How live sources (URLs, devices, pipes) are opened and reconnected."""

    attempts: int = Field(5, ge=0, le=1_000_000)
    """Failed tries in a row (a failed open, or a connection that ends before its first
    frame) after which a live source gives up with an error; the first connection has the
    same budget. 0 gives up at the first failure."""
    initial_s: float = Field(0.5, gt=0, le=limits.MAX_SECONDS, allow_inf_nan=False)
    """Wait before the first retry, in seconds; waits double up to `max_s`. The retry right
    after a connection that delivered frames is immediate."""
    max_s: float = Field(5.0, gt=0, le=limits.MAX_SECONDS, allow_inf_nan=False)
    """Longest wait between two tries, in seconds (>= `initial_s`)."""
    open_timeout_s: float = Field(10.0, gt=0, le=limits.MAX_SECONDS, allow_inf_nan=False)
    """Seconds to wait for a connection (or a pipe's writer) before the try fails."""
    read_timeout_s: float = Field(10.0, gt=0, le=limits.MAX_SECONDS, allow_inf_nan=False)
    """Seconds without data after which a connection counts as lost."""
    format: str | None = Field(None, pattern=_FORMAT_PATTERN)
    """FFmpeg input format (`mpegts`, `h264`, `v4l2`, `rawvideo`, ...); by default FFmpeg
    probes it (`v4l2` for devices)."""
    options: dict[Annotated[str, Field(min_length=1, max_length=256)], _OptionValue] = Field(
        default_factory=dict, max_length=64)
    """FFmpeg options (numbers are passed as their text), e.g. `{video_size: 640x480, framerate: "30"}` for a
    camera or `{rtsp_transport: udp}` (RTSP uses TCP by default)."""

    @model_validator(mode="after")
    def _ordered(self) -> "LiveSpec":
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s:g}) must be >= initial_s ({self.initial_s:g})")
        return self


class StreamSpec(_Section):
    """The input frame stream."""

    fps: float = Field(gt=0, le=limits.MAX_FPS, allow_inf_nan=False)
    """Sampling fps: frames per second taken from the source (at most 1000)."""
    frame_size: tuple[_FrameSide, _FrameSide] = Field((64, 64), strict=False)
    """[height, width] in pixels that frames are resized to (each 8 ... 16384, height x width
    <= 2**26)."""

    source: SourceField | None = None
    """Where frames come from when `run` is given no `--source`/`--video`: a video file, a
    URL (`rtsp://`, `rtmp://`, `http(s)://`, `tcp://`, `udp://`, ...), a V4L2 device
    (`/dev/video0`), a named pipe, or `-` (stdin); a list names several streams. A relative
    path is relative to the graph file. Part of the graph (and of its bundle's lock key)."""
    live: LiveSpec | None = None
    """Reconnect and FFmpeg settings of live sources (defaults when absent)."""

    @field_validator("frame_size")
    @classmethod
    def _bounded_area(cls, size: tuple[int, int]) -> tuple[int, int]:
        h, w = size
        if h * w > limits.MAX_FRAME_PIXELS:
            raise ValueError(f"frame area {h} x {w} = {h * w} pixels exceeds "
                             f"{limits.MAX_FRAME_PIXELS} (2**26, e.g. 8192 x 8192)")
        return size


class SLOSpec(_Section):
    """Latency SLO of the pipeline."""

    frame_deadline_ms: float = Field(gt=0, le=limits.MAX_DEADLINE_MS, allow_inf_nan=False)
    """Deadline of each frame: capture timestamp + this many milliseconds (at most one
    day)."""
    ttft_ms: float = Field(gt=0, le=limits.MAX_DEADLINE_MS, allow_inf_nan=False)
    """Time-to-first-token deadline of a question, in milliseconds (at most one day)."""
    overload: OverloadPolicy = "drop_late"
    """What the scheduler does under overload: `drop_late` drops frames that cannot meet
    their deadline; `latest_only` keeps only the newest pending frame; `degrade` runs at the
    largest token budget whose predicted cost fits the slack, else drops; `fifo` (alias
    `none`) runs every frame, late if need be."""


class BudgetSpec(_Section):
    """Resource budget the plan must fit in."""

    memory_mb: float = Field(gt=0, le=limits.MAX_MEMORY_MB, allow_inf_nan=False)
    """Device memory for weights, KV cache and activations, in MiB (at most 1 PiB)."""


#: Discriminated union of every registered op's params model (discriminator: ``op``), in op
#: name order (not registration order, so the schema does not depend on import order).
NodeSpec = Annotated[Union[tuple(OPS[name].params for name in sorted(OPS))],  # type: ignore[misc]
                     Field(discriminator="op")]


class GraphSpec(_Section):
    """A streaming pipeline: model, frame stream, nodes (the graph), SLO and budget."""

    version: Literal[1]
    """Graph file format version."""
    name: str = Field(pattern=GRAPH_NAME_PATTERN, max_length=limits.MAX_NAME_CHARS)
    """Pipeline name; also the build directory name (build/<name>): 1 to 128 characters."""
    model: ModelSpec
    stream: StreamSpec
    nodes: dict[str, NodeSpec] = Field(json_schema_extra={"propertyNames": {
        "pattern": NODE_NAME_PATTERN, "maxLength": limits.MAX_NAME_CHARS,
        "not": {"enum": list(RESERVED_NODE_NAMES)}}})
    """Graph nodes by name; each names an `op`, edges are the `input:` and `cache:`
    fields."""
    slo: SLOSpec
    budget: BudgetSpec

    _source_file: str = PrivateAttr("<graph>")
    _root: Any = PrivateAttr(None)  # composed yaml.Node of the file, for locations

    @field_validator("nodes")
    @classmethod
    def _check_node_names(cls, nodes: dict[str, Any]) -> dict[str, Any]:
        for name in nodes:
            problem = _node_name_problem(name)
            if problem:
                raise ValueError(f"node {name!r}: {problem}")
        return nodes

    def __eq__(self, other: object) -> bool:
        """Specs are equal when their content is; where they were read from is ignored."""
        if not isinstance(other, GraphSpec):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, like every BaseModel

    @property
    def source_file(self) -> str:
        """File the spec was read from (``<string>`` or ``<graph>`` if none)."""
        return self._source_file

    def locate(self, path: tuple[str | int, ...], *, key: bool = False
               ) -> tuple[int, int] | None:
        """1-based ``(line, col)`` of the YAML node at ``path`` (e.g. ``("nodes", "llm",
        "input", 0)``), or of its nearest existing parent; with ``key=True`` and a mapping
        key last, the key's position. ``None`` if the spec was not read from YAML."""
        return _locate(self._root, path, key=key)

    def error_at(self, path: tuple[str | int, ...], message: str, *, key: bool = False,
                 error: type[SpecError] = SpecError) -> SpecError:
        """An ``error`` instance (``SpecError`` or a subclass such as ``GraphError``) for
        ``message`` located at ``path`` of this spec's file; the caller raises it."""
        pos = self.locate(path, key=key)
        line, col = pos if pos else (None, None)
        return error(_one_line(message), file=self._source_file, line=line, col=col,
                     field=format_path(path) or None)

    def resolve_path(self, path: str | os.PathLike) -> Path:
        """``path`` made absolute relative to the graph file's directory (the current
        directory if the spec was not read from a file); ``~`` and ``~user`` are expanded
        when they name a home directory."""
        p = Path(os.path.expanduser(path))  # an unknown ~user stays as written
        if p.is_absolute():
            return p
        src = Path(self._source_file)
        base = src.parent if self._source_file not in ("<string>", "<graph>") else Path.cwd()
        return (base / p).resolve()

    def normalized(self) -> dict:
        """Canonical JSON-able dict of the spec (defaults filled in, keys sorted at every
        level); hashing it gives the graph part of the build lock key."""
        data = self.model_dump(mode="json")
        for key in ("source", "live"):      # absent, not null: graphs without them keep their key
            if data["stream"].get(key) is None:
                data["stream"].pop(key, None)
        return _sorted(data)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _node_name_problem(name: Any) -> str | None:
    # fullmatch, not match: `$` also matches before a trailing newline
    if not isinstance(name, str) or not re.fullmatch(NODE_NAME_PATTERN.strip("^$"), name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 40 else repr(name[:40]) + "..."
        return f"invalid node name {shown}: {_PATTERN_HINTS[NODE_NAME_PATTERN]}"
    if len(name) > limits.MAX_NAME_CHARS:
        return (f"node name {name[:20]!r}... has {len(name)} characters; at most "
                f"{limits.MAX_NAME_CHARS} are allowed")
    if name in SOURCES:
        return (f"node name {name!r} is reserved for the built-in "
                f"{SOURCES[name].value} source; choose another name")
    return None


# --------------------------------------------------------------------------- public API

def load_spec(path: str | os.PathLike) -> GraphSpec:
    """Read and validate the graph file at ``path``.

    Raises :class:`SpecError` naming the file if it is missing, unreadable or not UTF-8,
    and everything :func:`parse_spec` raises.
    """
    filename = os.fspath(path)
    try:
        raw = Path(filename).read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read graph file: {exc.strerror or exc}", file=filename) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError("graph file is not valid UTF-8", file=filename, line=line,
                        col=col) from exc
    return parse_spec(text, filename=filename)


def parse_spec(text: str, filename: str = "<string>") -> GraphSpec:
    """Parse and validate graph YAML ``text``; ``filename`` is used in error messages.

    Raises :class:`SpecError` (``FILE:LINE:COL: FIELD: MESSAGE``) for malformed YAML (a
    value YAML cannot construct, nesting too deep), duplicate keys, an empty file or a top
    level that is not a mapping, unknown ops, unknown fields, wrong types, out-of-range
    values (bounds: :mod:`streamgraph.compiler.limits`) and missing fields. When there are
    several problems the first in file order is reported, with "(and N more errors)".
    """
    root, data = _compose(text, filename)
    issues: list[_Issue] = []
    if data is None:  # no document, only comments, or a lone `---`
        raise SpecError(f"graph file is empty; expected a mapping with {_TOP_LEVEL_KEYS}",
                        file=filename, line=1, col=1)
    if not isinstance(data, dict):
        line, col = _mark(root)
        raise SpecError(f"expected a mapping with {_TOP_LEVEL_KEYS} at the top level, got "
                        f"{_describe(data)}", file=filename, line=line, col=col)

    nodes_raw = data.get("nodes")
    if isinstance(nodes_raw, dict):
        nodes: dict[str, Any] = {}
        for name, body in nodes_raw.items():
            node = _parse_node(name, body, issues)
            if node is not None:
                nodes[name] = node
        data = {**data, "nodes": nodes}
    spec: GraphSpec | None = None
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as exc:
        issues.extend(_convert_errors(exc, GraphSpec, ()))
    if issues or spec is None:
        raise _to_error(issues, root, filename)
    spec._source_file = filename
    spec._root = root
    return spec


class _SchemaGenerator(GenerateJsonSchema):
    # Optional fields (model.preset, model.hf) are shown as their type only: `null` is
    # accepted but never what an author means to write.
    def nullable_schema(self, schema):  # type: ignore[override]
        return self.generate_inner(schema["schema"])


def json_schema() -> dict:
    """JSON Schema (draft 2020-12) of graph files, for editors (``docs/graph.schema.json``).

    Cross-node rules (references, cycles, port types, shapes) are not expressible in the
    schema; :func:`streamgraph.compiler.graph.build_graph` checks them.
    """
    schema = _drop_null_defaults(GraphSpec.model_json_schema(schema_generator=_SchemaGenerator))
    schema["title"] = "streamgraph graph file"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _drop_null_defaults(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _drop_null_defaults(v) for k, v in schema.items()
                if not (k == "default" and v is None)}
    if isinstance(schema, list):
        return [_drop_null_defaults(v) for v in schema]
    return schema


def format_path(path: tuple[str | int, ...]) -> str:
    """Dotted field path: ``("nodes", "llm", "input", 0)`` -> ``nodes.llm.input[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            text = str(part)
            out += ("." if out else "") + (text if text.isprintable() else repr(text))
    return out


def _one_line(text: str) -> str:
    return text if text.isprintable() else "".join(
        c if c.isprintable() else repr(c)[1:-1] for c in text)


# --------------------------------------------------------------------------- YAML

# (path, message, located at the key, a missing field: sorted after its mapping's fields)
_Issue = tuple[tuple[Any, ...], str, bool, bool]
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 exponent floats (``1e3``; YAML 1.1 needs ``1.0e+3`` and
    reads ``1e3`` as a string), a nesting limit (the composer recurses per level) and
    constructor failures (``2020-13-45``, an integer of 5000 digits) as located YAML
    errors."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > limits.MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {limits.MAX_YAML_DEPTH} levels",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):  # type: ignore[override]
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} {node.value!r:.40}: "
                f"{exc}", node.start_mark) from None


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _compose(text: str, filename: str) -> tuple[yaml.Node | None, Any]:
    """Compose (positions) and construct (values) one YAML document."""
    loader = None
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            # before constructing: the constructor flattens `<<` merge keys in place
            issues = _duplicate_keys(root)
            if issues:
                raise _to_error(issues, root, filename)
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        msg = exc.problem or exc.context or "malformed YAML"
        if exc.problem and exc.context and exc.problem.startswith("but "):
            msg = f"{exc.context}, {exc.problem}"  # "expected X, but found Y"
        elif exc.problem and exc.context:
            ctx = exc.context
            if exc.context_mark is not None and exc.context_mark is not mark:
                ctx += f" at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
            msg += f" ({ctx})"
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise SpecError(_one_line(f"invalid YAML: {msg}"), file=filename, line=line,
                        col=col) from None
    except yaml.reader.ReaderError as exc:
        pos = max(0, min(exc.position, len(text)))
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = exc.character
        shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        raise SpecError(f"invalid YAML: unacceptable character {shown}: {exc.reason}",
                        file=filename, line=line, col=col) from None
    except (yaml.YAMLError, RecursionError) as exc:  # no mark: where the reader stopped
        msg = ((str(exc).strip().splitlines() or ["malformed YAML"])[0]
               if isinstance(exc, yaml.YAMLError) else "nesting too deep")
        line, col = ((loader.line + 1, loader.column + 1) if loader is not None else (1, 1))
        raise SpecError(_one_line(f"invalid YAML: {msg}"), file=filename, line=line,
                        col=col) from None
    return root, data


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _duplicate_keys(root: yaml.Node | None) -> list[_Issue]:
    issues: list[_Issue] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in seen:  # aliases share nodes
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Node] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG:
                    ident = (k.tag, k.value)
                    if ident in first:
                        line, col = _mark(first[ident])
                        issues.append((path + (k.value,), f"duplicate key {k.value!r} (first "
                                       f"defined at line {line}, column {col})", True, False))
                    else:
                        first[ident] = k
                    stack.append((v, path + (k.value,)))
                else:
                    stack.append((v, path))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, path + (i,)) for i, v in enumerate(node.value))
    return issues


def _find_key(node: yaml.MappingNode, part: Any) -> tuple[yaml.Node, yaml.Node] | None:
    # After construction, `<<: *anchor` merges are flattened into node.value (merged
    # pairs first), so a merged key is found where the anchored mapping defines it.
    found = None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG and k.value == str(part):
            found = (k, v)  # the last one wins, like the constructor
    return found


def _locate_node(root: yaml.Node | None, path: tuple[Any, ...], *, key: bool = False
                 ) -> yaml.Node | None:
    """The YAML node at ``path`` (its key node with ``key=True``), else its nearest parent."""
    if root is None:
        return None
    node = root
    for i, part in enumerate(path):
        if isinstance(node, yaml.MappingNode):
            found = _find_key(node, part)
            if found is None:
                break
            if key and i == len(path) - 1:
                return found[0]
            node = found[1]
        elif (isinstance(node, yaml.SequenceNode) and isinstance(part, int)
              and not isinstance(part, bool) and 0 <= part < len(node.value)):
            node = node.value[part]
        else:
            break
    return node


def _locate(root: yaml.Node | None, path: tuple[Any, ...], *, key: bool = False
            ) -> tuple[int, int] | None:
    node = _locate_node(root, path, key=key)
    return _mark(node) if node is not None else None


def _to_error(issues: list[_Issue], root: yaml.Node | None, filename: str) -> SpecError:
    located = []
    for order, (path, message, at_key, missing) in enumerate(issues):
        node = _locate_node(root, path, key=at_key)
        pos = _mark(node) if node is not None else (None, None)
        # a missing field is reported at its mapping, but after the mapping's own problems
        # (an unknown field next to a missing one is usually the same typo)
        mark = (node.end_mark if missing else node.start_mark) if node is not None else None
        sort_key = (mark.line, mark.column, order) if mark is not None else (-1, -1, order)
        located.append((sort_key, pos, path, message))
    located.sort(key=lambda item: item[0])
    _, (line, col), path, message = located[0]
    more = len(located) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return SpecError(_one_line(message), file=filename, line=line, col=col,
                     field=format_path(path) or None)


# --------------------------------------------------------------------------- nodes

def _parse_node(name: Any, body: Any, issues: list[_Issue]) -> BaseModel | None:
    """Validate one node; append issues and return None if it is invalid."""
    base = ("nodes", str(name))
    problem = _node_name_problem(name)
    if problem:
        issues.append((base, problem, True, False))
        return None
    if not isinstance(body, dict):
        issues.append((base, f"expected a mapping with an 'op' key, got {_describe(body)}",
                       False, False))
        return None
    if "op" not in body:
        issues.append((base + ("op",), f"field required (allowed ops: "
                       f"{', '.join(op_names())})", False, False))
        return None
    op = body["op"]
    if not isinstance(op, str) or op not in OPS:
        got = _short(op) if isinstance(op, str) else _describe(op)
        message = f"unknown op {got} (allowed: {', '.join(op_names())})"
        if isinstance(op, str):
            message += _did_you_mean(op, op_names())
        issues.append((base + ("op",), message, False, False))
        return None
    model = OPS[op].params
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        issues.extend(_convert_errors(exc, model, base))
        return None


# --------------------------------------------------------------------------- pydantic errors

def _describe(value: Any) -> str:
    """A YAML-flavoured description of a value, for 'got ...'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {_short(value)}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {_short(value)}"


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters with ``...``."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _num(value: Any) -> str:
    """``5.0`` -> ``5``, ``1e39`` -> ``1e+39``, an integer of more than 20 digits in
    scientific notation; other values unchanged."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        try:
            return f"{float(value):.3g}"
        except OverflowError:
            return f"an integer of {len(str(abs(value)))} digits"
    return str(value)


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _type_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The annotation at ``loc`` inside ``model`` (None if it cannot be followed)."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is list and args:
            tp = args[0]
        elif origin is tuple and args and isinstance(part, int):
            if len(args) == 2 and args[1] is Ellipsis:
                tp = args[0]
            elif 0 <= part < len(args):
                tp = args[part]
            else:
                return None
        elif origin is dict and len(args) == 2:
            tp = args[1]
        else:
            return None
    return _unwrap(tp)


def _convert_errors(exc: ValidationError, model: type[BaseModel],
                    base: tuple[Any, ...]) -> list[_Issue]:
    issues: list[_Issue] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        at_key = False
        if loc and loc[-1] == "[key]":
            loc, at_key = loc[:-1], True
        kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
        got = _describe(value)
        if kind == "missing":
            message = "field required"
        elif kind == "extra_forbidden":
            at_key = True
            parent = _type_at(model, loc[:-1])
            allowed = (sorted(parent.model_fields) if isinstance(parent, type)
                       and issubclass(parent, BaseModel) else [])
            message = f"unknown field {str(loc[-1])!r}"
            if allowed:
                message += f" (allowed: {', '.join(allowed)})"
                message += _did_you_mean(str(loc[-1]), allowed)
        elif kind == "literal_error":
            tp = _type_at(model, loc)
            values = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
            shown = _short(value) if isinstance(value, (str, int, float)) else repr(got)
            if len(values) == 1:
                message = f"expected {values[0]!r}, got {shown}"
            elif values:
                message = f"expected one of {', '.join(map(repr, values))}, got {shown}"
            else:
                message = f"expected {ctx.get('expected', '?')}, got {shown}"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            op, bound = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
                         "less_than": ("<", "lt"), "less_than_equal": ("<=", "le")}[kind]
            message = f"must be {op} {_num(ctx.get(bound))}, got {_num(value)}"
        elif kind == "finite_number":
            message = f"must be a finite number, got {_num(value)}"
        elif kind in ("int_type", "int_parsing", "int_from_float"):
            message = f"expected an integer, got {got}"
        elif kind in ("float_type", "float_parsing"):
            message = f"expected a number, got {got}"
        elif kind == "invalid_key":
            message = f"keys must be strings, got {_describe(loc[-1])}"
            loc, at_key = loc[:-1] + (str(loc[-1]),), True
        elif kind == "string_type":
            message = f"expected a string, got {got}"
        elif kind in ("bool_type", "bool_parsing"):
            message = f"expected true or false, got {got}"
        elif kind in ("list_type", "tuple_type"):
            message = f"expected a list, got {got}"
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            message = f"expected a mapping, got {got}"
        elif kind in ("too_short", "too_long"):
            want = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
            tp = _type_at(model, loc)
            exact = (typing.get_origin(tp) is tuple and Ellipsis not in typing.get_args(tp))
            qualifier = "exactly" if exact else ("at least" if kind == "too_short" else "at most")
            message = (f"expected a list of {qualifier} {want} item{'s' if want != 1 else ''}, "
                       f"got {ctx.get('actual_length')}")
        elif kind == "string_too_short":
            message = "must not be empty"
        elif kind == "string_too_long":
            message = (f"must be at most {ctx.get('max_length')} characters, got "
                       f"{len(value) if isinstance(value, str) else '?'}")
        elif kind == "string_pattern_mismatch":
            pattern = ctx.get("pattern", "")
            hint = _PATTERN_HINTS.get(pattern, f"must match {pattern}")
            message = f"{hint}, got {_short(value)}"
        elif kind in ("value_error", "assertion_error"):
            message = re.sub(r"^(Value error|Assertion failed), ", "", err["msg"])
        else:
            msg = err["msg"]
            message = f"{msg[:1].lower()}{msg[1:]}, got {got}"
        issues.append((base + loc, message, at_key, kind == "missing"))
    return issues


if __name__ == "__main__":  # python -m streamgraph.compiler.spec > docs/graph.schema.json
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
