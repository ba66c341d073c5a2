"""Pipeline graph: DAG construction, structural checks, static shapes."""
from __future__ import annotations

import networkx as nx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamgraph.compiler import ops
from streamgraph.compiler.graph import PipelineGraph, TokenShape, build_graph
from streamgraph.compiler.spec import parse_spec
from streamgraph.errors import GraphError, SpecError

N, C = 64, 32  # visual tokens per frame from the encoder, decoder width

HEADER = """\
version: 1
name: g
model: {preset: tiny}
stream: {fps: 2}
slo: {frame_deadline_ms: 250, ttft_ms: 500}
budget: {memory_mb: 512}
nodes:
"""  # nodes start on line 8

EXAMPLE_NODES = """\
  encoder: {op: vision_encoder}
  pruner:  {op: topk_saliency, input: encoder, tokens_per_frame: 16}
  cache:   {op: sink_window, sink_tokens: 4, window_tokens: 512}
  llm:     {op: decoder, input: [pruner, query], cache: cache, max_new_tokens: 16}
"""


def build(nodes: str = EXAMPLE_NODES, n: int = N, c: int = C) -> PipelineGraph:
    return build_graph(parse_spec(HEADER + nodes, "g.yaml"), encoder_tokens=n, hidden_size=c)


def graph_error(nodes: str, n: int = N) -> GraphError:
    with pytest.raises(GraphError) as info:
        build(nodes, n=n)
    assert "\n" not in str(info.value)
    return info.value


def edit(old: str, new: str, text: str = EXAMPLE_NODES) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def assert_at(err: GraphError, line: int, col: int, field: str, *fragments: str):
    assert isinstance(err, SpecError)
    assert (err.file, err.line, err.col, err.field) == ("g.yaml", line, col, field), str(err)
    assert str(err).startswith(f"g.yaml:{line}:{col}: {field}: "), str(err)
    for fragment in fragments:
        assert fragment in err.message, str(err)


# --------------------------------------------------------------------------- valid graphs

def test_example_graph():
    pg = build()
    assert (pg.encoder, pg.reducer, pg.cache, pg.decoder) == ("encoder", "pruner", "cache", "llm")
    assert pg.chain == ["encoder", "pruner", "llm"]
    assert pg.shapes == {"encoder": TokenShape(N, C), "pruner": TokenShape(16, C)}
    assert pg.tokens_per_frame == 16
    assert pg.cache_capacity == 4 + 512
    g = pg.graph
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert set(g.nodes) == {"frames", "query", "encoder", "pruner", "cache", "llm"}
    assert {(u, v, p) for u, v, p in g.edges(data="port")} == {
        ("frames", "encoder", "input"), ("encoder", "pruner", "input"),
        ("pruner", "llm", "visual"), ("query", "llm", "text"), ("cache", "llm", "cache")}
    assert g.nodes["frames"]["type"] is ops.PortType.FRAMES
    assert g.nodes["query"]["kind"] == "source"
    assert g.nodes["pruner"]["kind"] == "reducer" and g.nodes["pruner"]["op"] == "topk_saliency"
    assert g.nodes["cache"]["type"] is ops.PortType.CACHE_POLICY
    assert g.nodes["llm"]["type"] is None
    assert pg.node("pruner").tokens_per_frame == 16
    assert pg.op("cache").kind == "cache"


def test_identity_reducer_keeps_all_tokens():
    pg = build(edit("{op: topk_saliency, input: encoder, tokens_per_frame: 16}",
                    "{op: none, input: encoder}"), n=49, c=8)
    assert pg.shapes == {"encoder": TokenShape(49, 8), "pruner": TokenShape(49, 8)}
    assert pg.tokens_per_frame == 49


def test_no_reducer():
    nodes = edit("  pruner:  {op: topk_saliency, input: encoder, tokens_per_frame: 16}\n", "")
    pg = build(edit("[pruner, query]", "[query, encoder]", nodes))
    assert pg.reducer is None and pg.chain == ["encoder", "llm"]
    assert pg.tokens_per_frame == N
    assert pg.graph.edges["encoder", "llm"]["port"] == "visual"


def test_full_cache_and_budget_equal_to_n():
    nodes = edit("{op: sink_window, sink_tokens: 4, window_tokens: 512}",
                 "{op: full, capacity_tokens: 65}")
    pg = build(edit("tokens_per_frame: 16", "tokens_per_frame: 64", nodes))
    assert pg.tokens_per_frame == N and pg.cache_capacity == 65


def test_bad_sizes_are_caller_errors():
    with pytest.raises(ValueError):
        build(n=0)


# --------------------------------------------------------------------------- errors

def test_unknown_node():
    err = graph_error(edit("[pruner, query]", "[prunr, query]"))
    assert_at(err, 11, 34, "nodes.llm.input[0]", "unknown node 'prunr' (defined: cache, "
              "encoder, llm, pruner; built-in sources: frames, query)", "did you mean 'pruner'?")
    err = graph_error(edit("input: encoder", "input: enc"))
    assert_at(err, 9, 39, "nodes.pruner.input", "unknown node 'enc'")
    err = graph_error(edit("cache: cache", "cache: kv"))
    assert_at(err, 11, 57, "nodes.llm.cache", "unknown node 'kv'")


def test_cycle():
    nodes = edit("input: encoder", "input: p2") + "  p2: {op: none, input: pruner}\n"
    err = graph_error(nodes)
    assert_at(err, 9, 39, "nodes.pruner.input", "cycle in the graph: pruner -> p2 -> pruner")
    err = graph_error(edit("input: encoder", "input: pruner"))
    assert_at(err, 9, 39, "nodes.pruner.input", "cycle in the graph: pruner -> pruner")
    err = graph_error(edit("[pruner, query]", "[llm, query]"))
    assert_at(err, 11, 34, "nodes.llm.input[0]", "llm -> llm")


def test_decoder_count():
    second = "  llm2: {op: decoder, input: [pruner, query], cache: cache}\n"
    err = graph_error(EXAMPLE_NODES + second)
    assert_at(err, 12, 3, "nodes.llm2", "found 2 decoder nodes (llm, llm2)", "exactly one")
    nodes = edit("  llm:     {op: decoder, input: [pruner, query], cache: cache, "
                 "max_new_tokens: 16}\n", "")
    err = graph_error(nodes)
    assert_at(err, 7, 1, "nodes", "no decoder node")


def test_port_type_mismatch():
    err = graph_error(edit("input: encoder", "input: query"))
    assert_at(err, 9, 39, "nodes.pruner.input", "'query' (built-in source) produces Text, but "
              "topk_saliency needs VisualTokens")
    err = graph_error(edit("{op: vision_encoder}", "{op: vision_encoder, input: query}"))
    assert_at(err, 8, 40, "nodes.encoder.input", "produces Text", "needs Frames")
    err = graph_error(edit("cache: cache,", "cache: pruner,"))
    assert_at(err, 11, 57, "nodes.llm.cache", "'pruner' (topk_saliency node) produces "
              "VisualTokens, but decoder needs CachePolicy (a carrier, duo, full, rekv, sink_window or "
              "streaming_vlm node)")
    err = graph_error(edit("[pruner, query]", "[pruner, cache]"))
    assert_at(err, 11, 42, "nodes.llm.input[1]", "'cache' (sink_window node) produces "
              "CachePolicy", "'input' takes one VisualTokens")
    err = graph_error(edit("[pruner, query]", "[pruner, encoder, query]"))
    assert_at(err, 11, 42, "nodes.llm.input[1]", "second VisualTokens input",
              "already got 'pruner'")
    err = graph_error(edit("[pruner, query]", "[pruner]"))
    assert_at(err, 11, 33, "nodes.llm.input", "missing Text input", "got 'pruner'")
    err = graph_error(edit("[pruner, query]", "[]"))
    assert_at(err, 11, 33, "nodes.llm.input", "missing VisualTokens input", "got nothing")


def test_dangling_nodes():
    err = graph_error(EXAMPLE_NODES + "  p2: {op: none, input: encoder}\n")
    assert_at(err, 12, 3, "nodes.p2", "output of 'p2' (none) is not used by any node",
              "single chain")
    err = graph_error(EXAMPLE_NODES + "  kv: {op: full, capacity_tokens: 99}\n")
    assert_at(err, 12, 3, "nodes.kv", "cache policy 'kv' is not used", "uses cache 'cache'")
    err = graph_error(EXAMPLE_NODES + "  enc2: {op: vision_encoder}\n")
    assert_at(err, 12, 3, "nodes.enc2", "output of 'enc2' (vision_encoder) is not used")


def test_more_than_one_reducer():
    nodes = edit("[pruner, query]", "[p2, query]") + "  p2: {op: none, input: pruner}\n"
    err = graph_error(nodes)
    assert_at(err, 12, 25, "nodes.p2.input", "at most one token reducer",
              "frames -> encoder -> pruner -> p2 -> llm")


def test_token_budget_too_big():
    err = graph_error(edit("tokens_per_frame: 16", "tokens_per_frame: 100"))
    assert_at(err, 9, 66, "nodes.pruner.tokens_per_frame", "token budget 100 exceeds the 64 "
              "visual tokens per frame the encoder emits")
    err = graph_error(EXAMPLE_NODES, n=8)
    assert_at(err, 9, 66, "nodes.pruner.tokens_per_frame", "token budget 16 exceeds the 8")


def test_cache_capacity_rules():
    # capacity must hold a frame's tokens + 1 decode token
    nodes = edit("sink_tokens: 4, window_tokens: 512", "sink_tokens: 0, window_tokens: 16")
    err = graph_error(edit("max_new_tokens: 16}", "prefill_chunk_tokens: 8}", nodes))
    assert_at(err, 10, 3, "nodes.cache", "KV-cache capacity of 16 slots is less than 17 "
              "(16 visual tokens per frame + 1 decode token)")
    err = graph_error(edit("{op: sink_window, sink_tokens: 4, window_tokens: 512}",
                           "{op: full, capacity_tokens: 16}"))
    assert_at(err, 10, 3, "nodes.cache", "capacity of 16 slots is less than 17")
    # the window must hold a prefill chunk (default 64 text tokens)
    err = graph_error(edit("window_tokens: 512", "window_tokens: 32"))
    assert_at(err, 10, 61, "nodes.cache.window_tokens", "window_tokens 32 must be >= 64",
              "prefill_chunk_tokens 64")
    # ... and a frame's visual tokens
    nodes = edit("sink_tokens: 4, window_tokens: 512", "sink_tokens: 8, window_tokens: 20")
    nodes = edit("tokens_per_frame: 16", "tokens_per_frame: 24", nodes)
    err = graph_error(nodes.replace("max_new_tokens: 16}", "prefill_chunk_tokens: 8}"))
    assert_at(err, 10, 61, "nodes.cache.window_tokens", "must be >= 24",
              "visual tokens per frame 24")
    ok = edit("window_tokens: 512", "window_tokens: 64")
    assert build(ok).cache_capacity == 68


# --------------------------------------------------------------------------- properties

NAMES = ["a", "b", "c", "d", "e"]
REFS = NAMES + ["frames", "query", "zz"]


def budgets():
    """A token budget: an int or a list of distinct budget buckets."""
    return st.one_of(st.integers(1, 80), st.lists(st.integers(1, 80), min_size=1, max_size=3, unique=True))


@st.composite
def new_cache_nodes(draw, op):
    """streaming_vlm / rekv / carrier nodes with small, sometimes impossible, sizes."""
    small = st.integers(1, 120)
    if op == "streaming_vlm":
        body = {"op": op, "sink_tokens": draw(st.integers(0, 8)), "text_window_tokens": draw(small)}
        if draw(st.booleans()):
            body["vision_window_frames"] = draw(st.integers(1, 4))
        else:
            body["vision_window_seconds"] = draw(st.sampled_from([0.5, 1.0, 2.5]))
        return body
    if op == "rekv":
        return {"op": op, "init_tokens": draw(st.integers(0, 8)), "local_tokens": draw(st.integers(1, 300)),
                "topk": draw(st.integers(1, 4)), "question_tokens": draw(st.integers(1, 64))}
    return {"op": op, "sink_tokens": draw(st.integers(1, 8)), "carriers": draw(st.integers(2, 8)),
            "question_tokens": draw(st.integers(1, 64))}


@st.composite
def node_dicts(draw):
    nodes = {}
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=5)):
        op = draw(st.sampled_from(sorted(ops.OPS)))
        ref = st.sampled_from(REFS)
        if ops.OPS[op].kind == "encoder":
            body = {"op": op, "input": draw(ref)} if draw(st.booleans()) else {"op": op}
        elif "tokens_per_frame" in ops.OPS[op].params.model_fields:
            body = {"op": op, "input": draw(ref), "tokens_per_frame": draw(budgets())}
        elif op in ("none", "pool"):
            body = {"op": op, "input": draw(ref)}
        elif op == "full":
            body = {"op": op, "capacity_tokens": draw(st.integers(1, 200))}
        elif op == "sink_window":
            body = {"op": op, "sink_tokens": draw(st.integers(0, 8)),
                    "window_tokens": draw(st.integers(1, 200))}
        elif op == "duo":
            body = {"op": op, "capacity_tokens": draw(st.integers(1, 200)), "sparsity": 0.5}
        elif op in ("streaming_vlm", "rekv", "carrier"):
            body = draw(new_cache_nodes(op))
        else:
            body = {"op": op, "input": draw(st.lists(ref, max_size=3)), "cache": draw(ref),
                    "prefill_chunk_tokens": draw(st.integers(1, 100))}
        nodes[name] = body
    return nodes


@st.composite
def near_valid_node_dicts(draw):
    """A valid v1 chain (0-2 reducers) with 0-2 random mutations."""
    names = draw(st.permutations(NAMES))
    n_reducers = draw(st.integers(0, 2))
    enc, reducers, cache, dec = names[0], names[1:1 + n_reducers], names[3], names[4]
    nodes = {enc: {"op": draw(st.sampled_from(["vision_encoder", "stc_cacher"]))}}
    prev = enc
    for r in reducers:
        nodes[r] = draw(st.sampled_from([
            {"op": "none", "input": prev},
            *({"op": op, "input": prev, "tokens_per_frame": draw(budgets())}
              for op in ("topk_saliency", "dtd", "stc_pruner", "tome"))]))
        prev = r
    nodes[cache] = draw(st.sampled_from([
        {"op": "full", "capacity_tokens": draw(st.integers(1, 200))},
        {"op": "sink_window", "sink_tokens": draw(st.integers(0, 8)),
         "window_tokens": draw(st.integers(1, 200))},
        draw(new_cache_nodes(draw(st.sampled_from(["streaming_vlm", "rekv", "carrier"]))))]))
    nodes[dec] = {"op": "decoder", "input": draw(st.permutations([prev, "query"])),
                  "cache": cache, "prefill_chunk_tokens": draw(st.integers(1, 100))}
    for _ in range(draw(st.integers(0, 2))):
        victim = draw(st.sampled_from(sorted(nodes)))
        action = draw(st.sampled_from(["rewire", "delete", "add"]))
        body = nodes[victim]
        if action == "delete" and len(nodes) > 1:
            del nodes[victim]
        elif action == "add":
            extra = draw(node_dicts())
            nodes.update({k: v for k, v in extra.items() if k not in nodes})
        elif "input" in body and isinstance(body["input"], list):
            ref = draw(st.sampled_from(REFS))
            if body["input"]:
                body["input"][draw(st.integers(0, len(body["input"]) - 1))] = ref
            else:
                body["input"].append(ref)
        elif "input" in body:
            body["input"] = draw(st.sampled_from(REFS))
    # keep the file order random too
    order = draw(st.permutations(sorted(nodes)))
    return {k: nodes[k] for k in order}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=st.one_of(node_dicts(), near_valid_node_dicts()), n=st.integers(1, 80))
def test_random_graphs_build_or_raise_graph_error(nodes, n):
    doc = yaml.safe_load(HEADER + "  {}\n")
    doc["nodes"] = nodes
    spec = parse_spec(yaml.safe_dump(doc, sort_keys=False), "g.yaml")
    try:
        pg = build_graph(spec, encoder_tokens=n, hidden_size=C)
    except GraphError as err:
        assert "\n" not in str(err) and err.line is not None and err.field
        return
    # a graph that passes is the v1 chain with consistent shapes
    g = pg.graph
    assert nx.is_directed_acyclic_graph(g)
    assert set(spec.nodes) == set(pg.chain) | {pg.cache}
    assert g.nodes[pg.encoder]["kind"] == "encoder"
    assert pg.shapes[pg.encoder] == TokenShape(n, C)
    assert 1 <= pg.tokens_per_frame <= n
    assert pg.tokens_per_frame <= pg.max_frame_tokens <= n
    assert pg.cache_capacity >= pg.max_frame_tokens + 1
    assert g.edges[pg.cache, pg.decoder]["port"] == "cache"
    assert all(p is not None for _, _, p in g.edges(data="port"))
