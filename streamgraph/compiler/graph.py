"""The pipeline graph: a networkx DAG built from a :class:`GraphSpec`, its structural
checks and static shape inference, as passes over one annotated graph.

Each pass is a function ``pass_(g)`` over the annotated graph ``g`` (an ``nx.DiGraph``;
torch.fx style: results go into node metadata ``g.nodes[n][...]`` and graph metadata
``g.graph[...]``). They run in this order (:data:`GRAPH_PASSES`; the whole compile pipeline
is listed in :mod:`streamgraph.compiler.passes`):

1. :func:`add_nodes` — the built-in sources (``frames``, ``query``) and one node per spec
   node (``kind``, ``op``, ``type``, ``spec``), an edge per reference (``input:`` entries and
   the decoder's ``cache:``); every reference names a defined node or a built-in source;
2. :func:`check_acyclic` — the graph is acyclic;
3. :func:`check_ports` — exactly one decoder; port types match (each input port gets exactly
   one producer of its type; edge ``port``); every node's output is consumed (no dangling
   nodes, no unused cache policy);
4. :func:`check_chain` — v1 topology: one chain ``frames -> encoder -> (at most one reducer)
   -> decoder`` plus the decoder's cache policy (``g.graph["encoder" | "reducers" | "cache" |
   "decoder"]``);
5. :func:`infer_shapes` — visual tokens per frame along the chain (``g.nodes[n]["shape"]``,
   a :class:`TokenShape`; ``g.graph["tokens_per_frame"]``, ``g.graph["max_frame_tokens"]``);
6. :func:`check_cache` — a KV-cache capacity that fits a frame's tokens and a prefill chunk
   (``g.nodes[cache]["capacity"]``).

They read ``g.graph["spec"]`` (the :class:`GraphSpec`) and ``g.graph["shape_context"]`` (a
:class:`ShapeContext`: N, C and the token grid of the model). Failures raise
:class:`~streamgraph.errors.GraphError` located at the offending node or field of the graph
file. :func:`build_graph` runs them on a fresh graph and returns a :class:`PipelineGraph`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import networkx as nx

from streamgraph.compiler.ops import (OPS, SOURCES, CacheContext, OpInfo, PortType,
                                      ShapeContext, ShapeError, TokenShape, producers)
from streamgraph.compiler.spec import GraphSpec
from streamgraph.errors import GraphError

__all__ = ["TokenShape", "PipelineGraph", "build_graph", "new_graph", "pipeline_of", "V1_TOPOLOGY",
           "GRAPH_PASSES", "add_nodes", "check_acyclic", "check_ports", "check_chain",
           "infer_shapes", "check_cache"]

V1_TOPOLOGY = "frames -> encoder -> (at most one token reducer) -> decoder"


@dataclass
class PipelineGraph:
    """A checked pipeline graph with its static shapes (a view of the annotated graph after
    :data:`GRAPH_PASSES`).

    ``graph`` holds the spec's nodes plus the sources ``frames`` and ``query``; node
    attributes ``kind`` (``source`` or the op kind), ``op``, ``type`` (output
    :class:`PortType`, ``None`` for the decoder), ``spec`` (the node's params model) and the
    passes' results (``shape``, ``capacity``, ...); edge attribute ``port`` (the consuming
    input port: ``input``, ``visual``, ``text``, ``cache``). ``shapes`` maps the encoder and
    the reducer to their output :class:`TokenShape`; ``tokens_per_frame`` is K, the visual
    tokens per frame the decoder receives (the largest budget bucket); ``max_frame_tokens``
    the most visual tokens one frame can put into a prefill chunk (more than K for a reducer
    that sends some frames whole, like DTD's first frame); ``cache_capacity`` the KV-cache
    capacity in slots.
    """

    spec: GraphSpec
    graph: nx.DiGraph
    encoder: str
    reducer: str | None
    cache: str
    decoder: str
    shapes: dict[str, TokenShape]
    tokens_per_frame: int
    cache_capacity: int
    max_frame_tokens: int = 0

    def node(self, name: str) -> Any:
        """Params model of node ``name`` (``KeyError`` if undefined)."""
        return self.spec.nodes[name]

    def op(self, name: str) -> OpInfo:
        """Registry entry of node ``name``'s op."""
        return OPS[self.spec.nodes[name].op]

    @property
    def chain(self) -> list[str]:
        """Nodes along the main chain, encoder first, decoder last."""
        return [self.encoder] + ([self.reducer] if self.reducer else []) + [self.decoder]


def new_graph(spec: GraphSpec | None = None, shape_context: ShapeContext | None = None,
              **meta: Any) -> nx.DiGraph:
    """An empty annotated graph with graph metadata ``spec``, ``shape_context`` and ``meta``."""
    g = nx.DiGraph()
    g.graph.update(spec=spec, shape_context=shape_context, **meta)
    return g


def build_graph(spec: GraphSpec, *, encoder_tokens: int, hidden_size: int,
                encoder_grid: tuple[int, int] | None = None) -> PipelineGraph:
    """Build and check the DAG of ``spec`` and infer its static shapes (:data:`GRAPH_PASSES`).

    ``encoder_tokens`` is N, the visual tokens per frame the encoder emits, and
    ``hidden_size`` is C, the decoder width; the caller derives both from the model.
    ``encoder_grid`` (rows, cols), when given, is the raster grid of those N tokens (needed by
    grid-aware reducers such as ``pool``).

    Raises :class:`GraphError` (located at the offending node or field) for a reference
    to an undefined node, a cycle, not exactly one decoder, a port-type mismatch, a
    dangling node, a topology other than the v1 chain, a token budget above N or a
    KV-cache too small for a frame or a prefill chunk. Raises ``ValueError`` if
    ``encoder_tokens`` or ``hidden_size`` is < 1 (a caller bug, not a graph error).
    """
    g = new_graph(spec, shape_context(encoder_tokens, hidden_size, encoder_grid))
    for run in GRAPH_PASSES:
        run(g)
    return pipeline_of(g)


def shape_context(encoder_tokens: int, hidden_size: int,
                  encoder_grid: tuple[int, int] | None = None) -> ShapeContext:
    """The :class:`ShapeContext` of a model with N = ``encoder_tokens`` tokens of C =
    ``hidden_size`` channels per frame. Raises ValueError if either is < 1."""
    if encoder_tokens < 1 or hidden_size < 1:
        raise ValueError(f"encoder_tokens and hidden_size must be >= 1, got {encoder_tokens}"
                         f" and {hidden_size}")
    return ShapeContext(encoder_tokens=encoder_tokens, hidden_size=hidden_size,
                        encoder_grid=tuple(encoder_grid) if encoder_grid is not None else None)


def pipeline_of(g: nx.DiGraph) -> PipelineGraph:
    """The :class:`PipelineGraph` view of an annotated graph after :data:`GRAPH_PASSES`."""
    reducers = g.graph["reducers"]
    return PipelineGraph(spec=g.graph["spec"], graph=g, encoder=g.graph["encoder"],
                         reducer=reducers[0] if reducers else None, cache=g.graph["cache"],
                         decoder=g.graph["decoder"],
                         shapes={n: g.nodes[n]["shape"] for n in [g.graph["encoder"], *reducers]},
                         tokens_per_frame=g.graph["tokens_per_frame"],
                         cache_capacity=g.nodes[g.graph["cache"]]["capacity"],
                         max_frame_tokens=g.graph["max_frame_tokens"])


# --------------------------------------------------------------------------- passes

def add_nodes(g: nx.DiGraph) -> None:
    """1. Nodes and reference edges (``g.graph["refs"]``: every reference with its spec path)."""
    _Checker(g).build()


def check_acyclic(g: nx.DiGraph) -> None:
    """2. The graph has no cycle (reported at the reference that closes it)."""
    _Checker(g).check_acyclic()


def check_ports(g: nx.DiGraph) -> None:
    """3. Exactly one decoder (``g.graph["decoder"]``), port types (edge ``port``), no
    dangling node."""
    checker = _Checker(g)
    g.graph["decoder"] = checker.check_one_decoder()
    checker.check_ports()
    checker.check_dangling(g.graph["decoder"])


def check_chain(g: nx.DiGraph) -> None:
    """4. The v1 chain: ``g.graph["encoder"]``, ``["reducers"]`` (at most one), ``["cache"]``."""
    encoder, reducers, cache = _Checker(g).check_chain(g.graph["decoder"])
    g.graph.update(encoder=encoder, reducers=reducers, cache=cache)


def infer_shapes(g: nx.DiGraph) -> None:
    """5. ``g.nodes[n]["shape"]`` along the chain (each op's shape rule), the K tokens per
    frame the decoder receives and the most one frame can send (``frame_tokens`` rules)."""
    spec, ctx, checker = g.graph["spec"], g.graph["shape_context"], _Checker(g)
    encoder, reducers = g.graph["encoder"], g.graph["reducers"]
    shape: TokenShape | None = None
    for name in [encoder, *reducers]:
        node = spec.nodes[name]
        infer = OPS[node.op].infer_shape
        assert infer is not None, f"op {node.op!r} has no shape rule"
        try:
            shape = infer(node, shape, ctx)
        except ShapeError as exc:
            raise checker.error(name, exc.field, exc.message) from None
        g.nodes[name]["shape"] = shape
    assert shape is not None
    tokens_per_frame = shape.n
    frame_tokens, upstream = tokens_per_frame, g.nodes[encoder]["shape"]
    for name in reducers:
        rule = OPS[spec.nodes[name].op].frame_tokens
        if rule is not None:
            frame_tokens = max(frame_tokens, rule(spec.nodes[name], upstream))
        upstream = g.nodes[name]["shape"]
    g.graph.update(tokens_per_frame=tokens_per_frame, max_frame_tokens=frame_tokens)


def cache_context(g: nx.DiGraph, tokens_per_frame: int) -> CacheContext:
    """The :class:`CacheContext` of the graph's cache policy for ``tokens_per_frame`` tokens
    per frame (the stream's fps, the decoder's chunk sizes, the graph file's directory)."""
    spec = g.graph["spec"]
    dec = spec.nodes[g.graph["decoder"]]
    return CacheContext(tokens_per_frame, float(spec.stream.fps), dec.prefill_chunk_tokens,
                        dec.max_new_tokens, base_dir=str(spec.resolve_path(".")))


def check_cache(g: nx.DiGraph) -> None:
    """6. ``g.nodes[cache]["capacity"]`` (the policy's regions, or its capacity rule) holds a
    frame's tokens plus one decode token, and the policy's own checks pass."""
    spec, checker = g.graph["spec"], _Checker(g)
    cache, frame_tokens = g.graph["cache"], g.graph["max_frame_tokens"]
    cache_node, dec_node = spec.nodes[cache], spec.nodes[g.graph["decoder"]]
    cache_info = OPS[cache_node.op]
    if cache_info.regions is not None:
        try:
            capacity = sum(cache_info.regions(cache_node, cache_context(g, frame_tokens)).values())
        except ShapeError as exc:
            raise checker.error(cache, exc.field, exc.message) from None
    else:
        assert cache_info.capacity is not None, f"op {cache_node.op!r} has no capacity rule"
        capacity = cache_info.capacity(cache_node)
    if capacity < frame_tokens + 1:
        raise checker.error(cache, None,
                            f"KV-cache capacity of {capacity} slots is less than "
                            f"{frame_tokens + 1} ({frame_tokens} visual tokens per "
                            f"frame + 1 decode token)")
    if cache_info.check_cache is not None:
        try:
            cache_info.check_cache(cache_node, frame_tokens, dec_node)
        except ShapeError as exc:
            raise checker.error(cache, exc.field, exc.message) from None
    g.nodes[cache]["capacity"] = capacity


#: The graph stage of the compile pipeline, in order.
GRAPH_PASSES = (add_nodes, check_acyclic, check_ports, check_chain, infer_shapes, check_cache)


@dataclass(frozen=True)
class _Ref:
    src: str  # referenced node or source
    dst: str  # referencing node
    field: str  # params field holding the reference
    path: tuple[str | int, ...]  # spec path of the reference, for error locations


class _Checker:
    """The structural checks over an annotated graph (state lives in the graph: references in
    ``g.graph["refs"]``)."""

    def __init__(self, g: nx.DiGraph):
        self.spec: GraphSpec = g.graph["spec"]
        self.g = g
        self.refs: list[_Ref] = g.graph.setdefault("refs", [])
        self.order = {name: i for i, name in enumerate(self.spec.nodes)}

    # ------------------------------------------------------------------ helpers
    def error(self, node: str, field: str | int | None, message: str, *,
              path: tuple[str | int, ...] | None = None) -> GraphError:
        if path is None:
            path = ("nodes", node) + ((field,) if field is not None else ())
        # a node-level error points at the node's name
        err = self.spec.error_at(path, message, key=len(path) == 2, error=GraphError)
        assert isinstance(err, GraphError)
        return err

    def describe_source(self, name: str) -> str:
        if name in SOURCES:
            return f"'{name}' (built-in source)"
        return f"'{name}' ({self.spec.nodes[name].op} node)"

    @staticmethod
    def describe_type(t: PortType) -> str:
        parts = [f"the built-in source '{s}'" for s, st in SOURCES.items() if st == t]
        ops = producers(t)
        if ops:
            ops_text = ops[0] if len(ops) == 1 else f"{', '.join(ops[:-1])} or {ops[-1]}"
            parts.append(f"a {ops_text} node")
        return f"{t} ({' or '.join(parts)})" if parts else str(t)

    # ------------------------------------------------------------------ 1. references
    def build(self) -> nx.DiGraph:
        g, spec = self.g, self.spec
        for src, t in SOURCES.items():
            g.add_node(src, kind="source", op=None, type=t, spec=None)
        for name, node in spec.nodes.items():
            info = OPS[node.op]
            g.add_node(name, kind=info.kind, op=node.op, type=info.output, spec=node)
        known = sorted(spec.nodes)
        for name, node in spec.nodes.items():
            for field in OPS[node.op].input_fields():
                value = getattr(node, field)
                items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
                for index, ref in items:
                    path = ("nodes", name, field) + ((index,) if index is not None else ())
                    if ref not in g:
                        hint = difflib.get_close_matches(ref, known + sorted(SOURCES), n=1)
                        msg = (f"unknown node {ref!r} (defined: {', '.join(known) or 'none'};"
                               f" built-in sources: {', '.join(sorted(SOURCES))})")
                        if hint:
                            msg += f"; did you mean {hint[0]!r}?"
                        raise self.error(name, None, msg, path=path)
                    self.refs.append(_Ref(ref, name, field, path))
                    g.add_edge(ref, name, port=None, field=field)
        return g

    # ------------------------------------------------------------------ 2. cycles
    def check_acyclic(self) -> None:
        try:
            cycle = nx.find_cycle(self.g)
        except nx.NetworkXNoCycle:
            return
        # start the cycle at the node defined first in the file
        i = min(range(len(cycle)), key=lambda k: self.order.get(cycle[k][1], 1 << 30))
        edges = cycle[i:] + cycle[:i]
        start = edges[0][1]
        names = [start] + [v for _, v in edges[1:]] + [start]
        closing = edges[0][0]  # `start` references `closing`, closing the cycle
        ref = next(r for r in self.refs if r.dst == start and r.src == closing)
        raise self.error(start, None, f"cycle in the graph: {' -> '.join(names)} (the graph "
                         f"must be acyclic)", path=ref.path)

    # ------------------------------------------------------------------ 3. one decoder
    def check_one_decoder(self) -> str:
        decoders = [n for n, node in self.spec.nodes.items() if OPS[node.op].kind == "decoder"]
        if not decoders:
            raise self.spec.error_at(("nodes",), "the graph has no decoder node (op: decoder);"
                                     " exactly one is required", key=True, error=GraphError)
        if len(decoders) > 1:
            raise self.error(decoders[1], None,
                             f"found {len(decoders)} decoder nodes ({', '.join(decoders)}); "
                             f"exactly one is required")
        return decoders[0]

    # ------------------------------------------------------------------ 4. port types
    def check_ports(self) -> None:
        for name, node in self.spec.nodes.items():
            info = OPS[node.op]
            for field in info.input_fields():
                ports = [p for p in info.inputs if p.field == field]
                refs = [r for r in self.refs if r.dst == name and r.field == field]
                expected = " and ".join(self.describe_type(p.type) for p in ports)
                filled: dict[str, _Ref] = {}
                for ref in refs:
                    t = self.g.nodes[ref.src]["type"]
                    if t is None:
                        raise self.error(name, None, f"{self.describe_source(ref.src)} has no "
                                         f"output port and cannot be an input",
                                         path=ref.path)
                    port = next((p for p in ports if p.type == t), None)
                    if port is None:
                        takes = "needs" if len(ports) == 1 else f"'{field}' takes one"
                        raise self.error(name, None, f"{self.describe_source(ref.src)} "
                                         f"produces {t}, but {node.op} {takes} {expected}",
                                         path=ref.path)
                    if port.name in filled:
                        raise self.error(name, None, f"second {t} input "
                                         f"{self.describe_source(ref.src)}: {node.op} "
                                         f"'{field}' takes exactly one {t} (already got "
                                         f"{filled[port.name].src!r})", path=ref.path)
                    filled[port.name] = ref
                    self.g.edges[ref.src, name]["port"] = port.name
                missing = [p for p in ports if p.name not in filled]
                if missing:
                    got = ", ".join(repr(r.src) for r in refs) or "nothing"
                    raise self.error(name, field, f"missing {missing[0].type} input: "
                                     f"{node.op} '{field}' needs {expected}; got {got}")

    # ------------------------------------------------------------------ 5. dangling
    def check_dangling(self, decoder: str) -> None:
        for name, node in self.spec.nodes.items():
            info = OPS[node.op]
            if info.output is None or self.g.out_degree(name) > 0:
                continue
            if info.kind == "cache":
                used = self.spec.nodes[decoder].cache
                raise self.error(name, None, f"cache policy {name!r} is not used: decoder "
                                 f"{decoder!r} uses cache {used!r}; remove one of them")
            raise self.error(name, None, f"output of {name!r} ({node.op}) is not used by any "
                             f"node; v1 supports a single chain {V1_TOPOLOGY}")

    # ------------------------------------------------------------------ 6. v1 chain
    def input_of(self, name: str, port: str) -> str:
        return next(u for u, _, p in self.g.in_edges(name, data="port") if p == port)

    def check_chain(self, decoder: str) -> tuple[str, list[str], str]:
        cache = self.input_of(decoder, "cache")
        chain: list[str] = []
        current = self.input_of(decoder, "visual")
        while self.g.nodes[current]["kind"] == "reducer":
            chain.append(current)
            current = self.input_of(current, "input")
        reducers = chain[::-1]
        if self.g.nodes[current]["kind"] != "encoder":  # a future op kind
            raise self.error(current, None, f"{current!r} is not an encoder; v1 supports a "
                             f"single chain {V1_TOPOLOGY}")
        encoder = current
        if len(reducers) > 1:
            path_text = " -> ".join(["frames", encoder, *reducers, decoder])
            raise self.error(reducers[1], "input", f"v1 supports at most one token reducer "
                             f"between the encoder and the decoder, got {path_text}")
        on_chain = {encoder, *reducers, cache, decoder}
        for name in self.spec.nodes:
            if name not in on_chain:  # unreachable after the dangling check; kept as a guard
                raise self.error(name, None, f"node {name!r} is not on the main chain; v1 "
                                 f"supports a single chain {V1_TOPOLOGY}")
        return encoder, reducers, cache
