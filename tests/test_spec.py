"""Graph file parsing: typed spec, located errors, normalization, JSON Schema."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamgraph.compiler import ops
from streamgraph.compiler.spec import (OVERLOAD_POLICIES, GraphSpec, json_schema, load_spec,
                                       parse_spec)
from streamgraph.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = """\
version: 1
name: streaming-vlm-tiny
model: {preset: tiny, seed: 0}
stream: {fps: 2, frame_size: [64, 64]}
nodes:
  encoder: {op: vision_encoder}
  pruner:  {op: topk_saliency, input: encoder, tokens_per_frame: 16}
  cache:   {op: sink_window, sink_tokens: 4, window_tokens: 512}
  llm:     {op: decoder, input: [pruner, query], cache: cache, max_new_tokens: 16}
slo: {frame_deadline_ms: 250, ttft_ms: 500, overload: drop_late}
budget: {memory_mb: 512}
"""

# The same graph in block style, defaults written out.
EXAMPLE_BLOCK = """\
version: 1
name: streaming-vlm-tiny
model:
  preset: tiny
  seed: 0
  dtype: float32
stream:
  fps: 2.0
  frame_size:
    - 64
    - 64
nodes:
  encoder:
    op: vision_encoder
    input: frames
  pruner:
    op: topk_saliency
    input: encoder
    tokens_per_frame: 16
    positions: compact
  cache:
    op: sink_window
    sink_tokens: 4
    window_tokens: 512
  llm:
    op: decoder
    input: [pruner, query]
    cache: cache
    max_new_tokens: 16
    prefill_chunk_tokens: 64
slo:
  frame_deadline_ms: 250
  ttft_ms: 500
  overload: drop_late
budget:
  memory_mb: 512
"""


def parse_error(text: str, filename: str = "g.yaml") -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(text, filename)
    err = info.value
    assert "\n" not in str(err)
    return err


def edit(old: str, new: str, text: str = EXAMPLE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def assert_at(err: SpecError, line: int, col: int, field: str | None, *fragments: str):
    assert (err.file, err.line, err.col, err.field) == ("g.yaml", line, col, field), str(err)
    prefix = f"g.yaml:{line}:{col}: " + (f"{field}: " if field else "")
    assert str(err).startswith(prefix), str(err)
    for fragment in fragments:
        assert fragment in err.message, str(err)


# --------------------------------------------------------------------------- valid files

def test_example_parses():
    spec = parse_spec(EXAMPLE, "g.yaml")
    assert isinstance(spec, GraphSpec)
    assert spec.version == 1 and spec.name == "streaming-vlm-tiny"
    assert spec.model.preset == "tiny" and spec.model.hf is None
    assert spec.model.seed == 0 and spec.model.dtype == "float32"
    assert spec.stream.fps == 2.0 and spec.stream.frame_size == (64, 64)
    assert list(spec.nodes) == ["encoder", "pruner", "cache", "llm"]
    enc, pruner, cache, llm = spec.nodes.values()
    assert isinstance(enc, ops.VisionEncoderNode) and enc.input == "frames"
    assert isinstance(pruner, ops.TopkSaliencyNode)
    assert (pruner.input, pruner.tokens_per_frame, pruner.positions) == ("encoder", 16, "compact")
    assert isinstance(cache, ops.SinkWindowNode)
    assert (cache.sink_tokens, cache.window_tokens) == (4, 512)
    assert isinstance(llm, ops.DecoderNode)
    assert (llm.input, llm.cache, llm.max_new_tokens, llm.prefill_chunk_tokens) == (
        ["pruner", "query"], "cache", 16, 64)
    assert spec.slo.frame_deadline_ms == 250 and spec.slo.ttft_ms == 500
    assert spec.slo.overload == "drop_late"
    assert spec.budget.memory_mb == 512
    assert spec.source_file == "g.yaml"


def test_defaults():
    text = edit("{fps: 2, frame_size: [64, 64]}", "{fps: 0.5}")
    text = edit(", overload: drop_late", "", text)
    text = edit("model: {preset: tiny, seed: 0}", "model: {preset: tiny}", text)
    text = edit(", max_new_tokens: 16", "", text)
    spec = parse_spec(text)
    assert spec.stream.frame_size == (64, 64)
    assert spec.slo.overload == "drop_late"
    assert spec.model.seed == 0
    assert spec.nodes["llm"].max_new_tokens == 32
    assert spec.nodes["llm"].prefill_chunk_tokens == 64


def test_hf_model_and_resolve_path(tmp_path):
    text = edit("model: {preset: tiny, seed: 0}", "model: {hf: ckpt/tiny}")
    path = tmp_path / "sub" / "g.yaml"
    path.parent.mkdir()
    path.write_text(text)
    spec = load_spec(path)
    assert spec.model.hf == "ckpt/tiny" and spec.model.preset is None
    assert spec.resolve_path(spec.model.hf) == (tmp_path / "sub" / "ckpt" / "tiny").resolve()
    assert spec.source_file == str(path)


def test_locate():
    spec = parse_spec(EXAMPLE)
    assert spec.locate(()) == (1, 1)
    assert spec.locate(("name",)) == (2, 7)
    assert spec.locate(("nodes", "llm", "input", 1)) == (9, 42)
    assert spec.locate(("nodes", "llm"), key=True) == (9, 3)
    assert spec.locate(("nodes", "llm")) == (9, 12)
    # missing paths fall back to the nearest existing parent
    assert spec.locate(("nodes", "llm", "input", 7)) == (9, 33)
    assert spec.locate(("nodes", "nope", "x")) == (6, 3)
    assert GraphSpec.model_validate(spec.model_dump()).locate(("nodes",)) is None


def test_locate_block_style_and_merge_keys():
    spec = parse_spec(EXAMPLE_BLOCK)
    assert spec.locate(("nodes", "cache", "window_tokens")) == (24, 20)
    assert spec.locate(("stream", "frame_size", 1)) == (11, 7)
    # a key pulled in with `<<: *anchor` is located where the anchored mapping defines it
    text = edit("  cache:   {op: sink_window, sink_tokens: 4, window_tokens: 512}",
                "  cache:   &cw {op: sink_window, sink_tokens: 4, window_tokens: 512}\n"
                "  c2: {<<: *cw, op: full}")
    err = parse_error(text)
    assert_at(err, 8, 34, "nodes.c2.sink_tokens", "unknown field 'sink_tokens' (allowed: "
              "capacity_tokens, op)", "(and 2 more errors)")


@pytest.mark.parametrize("path", sorted((ROOT / "graphs").glob("*.yaml")), ids=lambda p: p.name)
def test_graph_files_parse(path):
    assert load_spec(path).source_file == str(path)


def test_load_spec_reads_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(EXAMPLE)
    assert load_spec(path) == parse_spec(EXAMPLE)
    assert load_spec(str(path)).source_file == str(path)


def test_normalized_is_canonical():
    a, b = parse_spec(EXAMPLE), parse_spec(EXAMPLE_BLOCK)
    assert a.normalized() == b.normalized()
    norm = a.normalized()
    assert json.loads(json.dumps(norm)) == norm
    assert list(norm) == sorted(norm)
    assert list(norm["nodes"]["llm"]) == sorted(norm["nodes"]["llm"])
    assert norm["nodes"]["llm"]["prefill_chunk_tokens"] == 64  # defaults filled in
    assert norm["stream"]["frame_size"] == [64, 64]
    c = parse_spec(edit("tokens_per_frame: 16", "tokens_per_frame: 8"))
    assert c.normalized() != norm


# --------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    assert str(info.value).startswith(f"{missing}: cannot read graph file")
    with pytest.raises(SpecError, match="cannot read graph file"):
        load_spec(tmp_path)  # a directory


def test_not_utf8(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_bytes(b"version: 1\nname: \xff\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert (info.value.line, info.value.col) == (2, 7)
    assert "UTF-8" in str(info.value)


def test_malformed_yaml():
    err = parse_error(edit("name: streaming-vlm-tiny", "name: streaming: vlm"))
    assert_at(err, 2, 16, None, "invalid YAML", "mapping values are not allowed here")
    err = parse_error(edit("frame_size: [64, 64]}", "frame_size: [64, 64]"))
    assert_at(err, 5, 1, None, "invalid YAML", "while parsing a flow mapping at line 4, column 9")


def test_multiple_documents():
    err = parse_error(EXAMPLE + "---\nversion: 1\n")
    assert_at(err, 12, 1, None, "expected a single document")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(text):
    err = parse_error(text)
    assert_at(err, 1, 1, None, "empty")


def test_top_level_not_mapping():
    err = parse_error("- version: 1\n")
    assert_at(err, 1, 1, None, "expected a mapping", "got a list")
    err = parse_error("\n  just text\n")
    assert_at(err, 2, 3, None, "expected a mapping", "got string 'just text'")


def test_unknown_op():
    err = parse_error(edit("op: topk_saliency", "op: topk"))
    assert_at(err, 7, 17, "nodes.pruner.op", f"unknown op 'topk' (allowed: {', '.join(ops.op_names())})")
    assert {"decoder", "full", "none", "sink_window", "topk_saliency", "vision_encoder"} <= set(ops.op_names())
    err = parse_error(edit("op: vision_encoder", "op: [vision_encoder]"))
    assert_at(err, 6, 17, "nodes.encoder.op", "unknown op a list (allowed: carrier, decoder")


def test_unknown_field():
    err = parse_error(edit("sink_tokens: 4", "sink_token: 4"))
    # reported at the key; the resulting "sink_tokens: field required" is counted
    assert_at(err, 8, 30, "nodes.cache.sink_token",
              "unknown field 'sink_token' (allowed: op, sink_tokens, window_tokens)",
              "did you mean 'sink_tokens'?", "(and 1 more error)")
    err = parse_error(edit("slo: {", "slo: {deadline: 1, "))
    assert_at(err, 10, 7, "slo.deadline",
              "unknown field 'deadline' (allowed: frame_deadline_ms, overload, ttft_ms)")
    err = parse_error(EXAMPLE + "extra: 1\n")
    assert_at(err, 12, 1, "extra", "unknown field 'extra' (allowed: budget, model, name, "
              "nodes, slo, stream, version)")


def test_wrong_type():
    err = parse_error(edit("fps: 2", "fps: two"))
    assert_at(err, 4, 15, "stream.fps", "expected a number, got string 'two'")
    err = parse_error(edit("tokens_per_frame: 16", "tokens_per_frame: 16.5"))
    assert_at(err, 7, 66, "nodes.pruner.tokens_per_frame", "expected an integer, got number 16.5")
    err = parse_error(edit("seed: 0", "seed: yes"))
    assert_at(err, 3, 29, "model.seed", "expected an integer, got boolean true")
    err = parse_error(edit("tokens_per_frame: 16", "tokens_per_frame: '16'"))
    assert_at(err, 7, 66, "nodes.pruner.tokens_per_frame", "expected an integer, got string '16'")
    err = parse_error(edit("input: [pruner, query]", "input: pruner"))
    assert_at(err, 9, 33, "nodes.llm.input", "expected a list, got string 'pruner'")
    err = parse_error(edit("budget: {memory_mb: 512}", "budget: 512"))
    assert_at(err, 11, 9, "budget", "expected a mapping, got integer 512")
    err = parse_error(edit("name: streaming-vlm-tiny", "name: 12"))
    assert_at(err, 2, 7, "name", "expected a string, got integer 12")


def test_out_of_range():
    err = parse_error(edit("ttft_ms: 500", "ttft_ms: -5"))
    assert_at(err, 10, 40, "slo.ttft_ms", "must be > 0, got -5")
    err = parse_error(edit("frame_deadline_ms: 250", "frame_deadline_ms: 0"))
    assert_at(err, 10, 26, "slo.frame_deadline_ms", "must be > 0, got 0")
    err = parse_error(edit("window_tokens: 512", "window_tokens: 0"))
    assert_at(err, 8, 61, "nodes.cache.window_tokens", "must be >= 1, got 0")
    err = parse_error(edit("sink_tokens: 4", "sink_tokens: -1"))
    assert_at(err, 8, 43, "nodes.cache.sink_tokens", "must be >= 0, got -1")
    err = parse_error(edit("fps: 2", "fps: .inf"))
    assert_at(err, 4, 15, "stream.fps", "must be a finite number")
    err = parse_error(edit("[64, 64]", "[4, 64]"))
    assert_at(err, 4, 31, "stream.frame_size[0]", "must be >= 8, got 4")
    err = parse_error(edit("[64, 64]", "[64, 64, 3]"))
    assert_at(err, 4, 30, "stream.frame_size", "expected a list of exactly 2 items, got 3")
    err = parse_error(edit("name: streaming-vlm-tiny", "name: my graph"))
    assert_at(err, 2, 7, "name", "must start with a letter or digit", "got 'my graph'")
    err = parse_error(edit("version: 1", "version: 2"))
    assert_at(err, 1, 10, "version", "expected 1, got 2")


def test_literal_choices():
    err = parse_error(edit("overload: drop_late", "overload: fast"))
    assert_at(err, 10, 55, "slo.overload",
              "expected one of 'drop_late', 'latest_only', 'degrade', 'fifo', 'none', got 'fast'")
    from streamgraph.runtime.scheduler import OVERLOAD_POLICIES as RUNTIME_POLICIES

    assert OVERLOAD_POLICIES == RUNTIME_POLICIES == ("drop_late", "latest_only", "degrade", "fifo", "none")
    err = parse_error(edit("tokens_per_frame: 16}", "tokens_per_frame: 16, positions: orig}"))
    assert_at(err, 7, 81, "nodes.pruner.positions", "expected one of 'keep', 'compact'")
    err = parse_error(edit("preset: tiny", "preset: huge"))
    assert_at(err, 3, 17, "model.preset", "expected one of 'tiny', 'small', got 'huge'")


def test_missing_section_and_field():
    err = parse_error(edit("budget: {memory_mb: 512}\n", ""))
    assert_at(err, 1, 1, "budget", "field required")
    err = parse_error(edit(", window_tokens: 512", ""))
    assert_at(err, 8, 12, "nodes.cache.window_tokens", "field required")
    err = parse_error(edit("budget: {memory_mb: 512}", "budget:"))
    assert_at(err, 11, 8, "budget", "expected a mapping, got null")
    block = EXAMPLE_BLOCK.replace("    window_tokens: 512\n", "")
    err = parse_error(block)
    assert_at(err, 22, 5, "nodes.cache.window_tokens", "field required")


def test_model_needs_exactly_one_source():
    err = parse_error(edit("{preset: tiny, seed: 0}", "{seed: 0}"))
    assert_at(err, 3, 8, "model", "exactly one of 'preset'", "got neither")
    err = parse_error(edit("{preset: tiny, seed: 0}", "{preset: tiny, hf: ckpt}"))
    assert_at(err, 3, 8, "model", "got both")


def test_duplicate_keys():
    err = parse_error(EXAMPLE + "budget: {memory_mb: 5}\n")
    assert_at(err, 12, 1, "budget", "duplicate key 'budget' (first defined at line 11, column 1)")
    err = parse_error(edit("tokens_per_frame: 16}", "tokens_per_frame: 16, input: x}"))
    assert_at(err, 7, 70, "nodes.pruner.input", "duplicate key 'input'", "line 7, column 32")
    err = parse_error(edit("  cache:   {", "  pruner: {op: none, input: encoder}\n  cache:   {"))
    assert_at(err, 8, 3, "nodes.pruner", "duplicate key 'pruner' (first defined at line 7")


def test_node_problems():
    err = parse_error(edit("  cache:   {", "  query: {op: none, input: encoder}\n  cache:   {"))
    assert_at(err, 8, 3, "nodes.query", "'query' is reserved")
    err = parse_error(edit("  cache:   {", "  frames: {op: none, input: encoder}\n  cache:   {"))
    assert_at(err, 8, 3, "nodes.frames", "'frames' is reserved")
    err = parse_error(edit("  encoder:", "  2encoder:"))
    assert_at(err, 6, 3, "nodes.2encoder", "invalid node name '2encoder'")
    err = parse_error(edit("{op: vision_encoder}", "vision_encoder"))
    assert_at(err, 6, 12, "nodes.encoder", "expected a mapping with an 'op' key",
              "got string 'vision_encoder'")
    err = parse_error(edit("{op: vision_encoder}", "{input: frames}"))
    assert_at(err, 6, 12, "nodes.encoder.op", "field required (allowed ops: carrier, decoder")
    err = parse_error(edit("nodes:\n", "nodes: 3\nx:\n"))
    assert_at(err, 5, 8, "nodes", "expected a mapping, got integer 3")


def test_first_error_in_file_order_with_count():
    text = edit("fps: 2", "fps: -1")
    text = edit("ttft_ms: 500", "ttft_ms: x", text)
    text = edit("op: topk_saliency", "op: topk", text)
    err = parse_error(text)
    assert_at(err, 4, 15, "stream.fps", "must be > 0, got -1", "(and 2 more errors)")


# --------------------------------------------------------------------------- JSON Schema

def _validate(instance, schema, root=None, path="$"):
    """Minimal JSON Schema (2020-12 subset) validator used when `jsonschema` is missing.
    Returns a list of error strings."""
    root = root if root is not None else schema
    errors = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        errors += _validate(instance, root["$defs"][ref.split("/")[-1]], root, path)
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if "type" in schema:
        t = schema["type"]
        if t == "integer":
            ok = isinstance(instance, int) and not isinstance(instance, bool)
        elif t == "number":
            ok = isinstance(instance, (int, float)) and not isinstance(instance, bool)
        else:
            ok = isinstance(instance, types[t])
        if not ok:
            return errors + [f"{path}: not {t}"]
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{path}: != const")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: not in enum")
    if "not" in schema and not _validate(instance, schema["not"], root, path):
        errors.append(f"{path}: matches 'not'")
    for key in ("oneOf", "anyOf"):
        if key in schema:
            n = sum(not _validate(instance, s, root, path) for s in schema[key])
            if (key == "oneOf" and n != 1) or (key == "anyOf" and n < 1):
                errors.append(f"{path}: {key} matched {n}")
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: < minimum")
        if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: <= exclusiveMinimum")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{path}: > maximum")
    if isinstance(instance, str):
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{path}: pattern")
        if len(instance) < schema.get("minLength", 0):
            errors.append(f"{path}: minLength")
    if isinstance(instance, list):
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(instance):
            sub = prefix[i] if i < len(prefix) else schema.get("items")
            if sub is False:
                errors.append(f"{path}[{i}]: no items allowed")
            elif isinstance(sub, dict):
                errors += _validate(item, sub, root, f"{path}[{i}]")
        if len(instance) < schema.get("minItems", 0) or len(instance) > schema.get("maxItems",
                                                                                   1 << 30):
            errors.append(f"{path}: item count")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing {key}")
        for key, value in instance.items():
            if "propertyNames" in schema:
                errors += _validate(key, schema["propertyNames"], root, f"{path}<{key}>")
            if key in props:
                errors += _validate(value, props[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _validate(value, schema["additionalProperties"], root, f"{path}.{key}")
    return errors


def schema_errors(instance) -> list[str]:
    try:
        import jsonschema  # type: ignore[import-not-found]
    except ImportError:
        return _validate(instance, json_schema())
    validator = jsonschema.Draft202012Validator(json_schema())
    return [e.message for e in validator.iter_errors(instance)]


def test_json_schema_structure():
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"version", "name", "model", "stream", "nodes", "slo",
                                       "budget"}
    nodes = schema["properties"]["nodes"]
    assert nodes["propertyNames"]["not"] == {"enum": ["frames", "query"]}
    refs = {one["$ref"].split("/")[-1] for one in nodes["additionalProperties"]["oneOf"]}
    assert refs == {info.params.__name__ for info in ops.OPS.values()}
    for info in ops.OPS.values():
        node_schema = schema["$defs"][info.params.__name__]
        assert node_schema["properties"]["op"]["const"] == info.name
        assert node_schema["additionalProperties"] is False
    slo = schema["$defs"]["SLOSpec"]["properties"]
    assert slo["overload"]["enum"] == list(OVERLOAD_POLICIES)
    json.dumps(schema)


def test_json_schema_validates_example():
    import yaml
    assert schema_errors(yaml.safe_load(EXAMPLE)) == []
    assert schema_errors(yaml.safe_load(EXAMPLE_BLOCK)) == []
    for bad in [edit("op: topk_saliency", "op: topk"), edit("sink_tokens", "sink_token"),
                edit("fps: 2", "fps: -2"), edit("overload: drop_late", "overload: fast"),
                edit("{preset: tiny, seed: 0}", "{seed: 0}"), edit("  encoder:", "  query:"),
                edit("[64, 64]", "[64, 64, 3]"), edit("budget: {memory_mb: 512}\n", "")]:
        assert schema_errors(yaml.safe_load(bad)), bad


def test_schema_file_is_up_to_date():
    expected = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    actual = (ROOT / "docs" / "graph.schema.json").read_text()
    assert actual == expected, ("docs/graph.schema.json is stale; regenerate with "
                                "`python -m streamgraph.compiler.spec > docs/graph.schema.json`")


def test_yaml_reference_covers_every_field():
    doc = (ROOT / "docs" / "yaml-reference.md").read_text()
    from streamgraph.compiler import spec as spec_mod
    models = [spec_mod.GraphSpec, spec_mod.ModelSpec, spec_mod.StreamSpec, spec_mod.SLOSpec,
              spec_mod.BudgetSpec] + [info.params for info in ops.OPS.values()]
    for model in models:
        for field in model.model_fields:
            assert f"`{field}`" in doc, f"{model.__name__}.{field} is not documented"
    for name in ops.OPS:
        assert f"`{name}`" in doc, f"op {name} is not documented"
    for policy in OVERLOAD_POLICIES:
        assert f"`{policy}`" in doc


# --------------------------------------------------------------------------- properties

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["frames", "query", "encoder", "pruner", "cache", "llm"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers(0, 3)), inner, max_size=4)),
    max_leaves=10)
field_names = st.sampled_from(["op", "input", "tokens_per_frame", "positions", "capacity_tokens",
                               "sink_tokens", "window_tokens", "cache", "max_new_tokens",
                               "prefill_chunk_tokens", "bogus"])
node_bodies = st.dictionaries(field_names, st.one_of(
    st.sampled_from(sorted(ops.OPS) + ["bogus"]), values), max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(
    ["encoder", "pruner", "cache", "llm", "query"])), st.one_of(node_bodies, values), max_size=5),
    section=st.sampled_from(["model", "stream", "slo", "budget", "name", "version"]),
    replacement=values)
def test_random_specs_give_spec_or_spec_error(nodes, section, replacement):
    import yaml
    doc = yaml.safe_load(EXAMPLE)
    doc["nodes"] = nodes
    doc[section] = replacement
    text = yaml.safe_dump(doc)
    try:
        spec = parse_spec(text, "g.yaml")
    except SpecError as err:
        assert "\n" not in str(err)
        assert str(err).startswith("g.yaml:")
        return
    assert isinstance(spec, GraphSpec)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{},'\"#&*!|>\n\t 01.?%@`")), max_size=60))
def test_random_text_gives_spec_or_spec_error(text):
    try:
        parse_spec(text, "g.yaml")
    except SpecError as err:
        assert "\n" not in str(err)


# --------------------------------------------------------------------------- bounds

from streamgraph.compiler import limits  # noqa: E402


def value_at(text: str, anchor: str) -> tuple[int, int]:
    """1-based (line, col) of the text right after ``anchor`` (which occurs once): the
    position a located error about that value must name, found independently of the
    parser."""
    assert text.count(anchor) == 1, anchor
    pos = text.index(anchor) + len(anchor)
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


# (old text in EXAMPLE, template with {v}, anchor before the value, field, largest valid value,
#  smallest invalid value)
BOUNDS = [
    ("fps: 2", "fps: {v}", "fps: ", "stream.fps", limits.MAX_FPS, "1000.001"),
    ("frame_size: [64, 64]", "frame_size: [{v}, 8]", "frame_size: [", "stream.frame_size[0]",
     limits.MAX_FRAME_SIDE, limits.MAX_FRAME_SIDE + 1),
    ("frame_deadline_ms: 250", "frame_deadline_ms: {v}", "frame_deadline_ms: ",
     "slo.frame_deadline_ms", limits.MAX_DEADLINE_MS, "86400000.5"),
    ("ttft_ms: 500", "ttft_ms: {v}", "ttft_ms: ", "slo.ttft_ms", limits.MAX_DEADLINE_MS,
     limits.MAX_DEADLINE_MS + 1),
    ("memory_mb: 512", "memory_mb: {v}", "memory_mb: ", "budget.memory_mb", limits.MAX_MEMORY_MB,
     int(limits.MAX_MEMORY_MB) + 1),
    ("max_new_tokens: 16", "max_new_tokens: {v}", "max_new_tokens: ", "nodes.llm.max_new_tokens",
     limits.MAX_TOKENS, limits.MAX_TOKENS + 1),
    ("max_new_tokens: 16", "max_new_tokens: 16, prefill_chunk_tokens: {v}", "prefill_chunk_tokens: ",
     "nodes.llm.prefill_chunk_tokens", limits.MAX_TOKENS, limits.MAX_TOKENS + 1),
    ("tokens_per_frame: 16", "tokens_per_frame: {v}", "tokens_per_frame: ",
     "nodes.pruner.tokens_per_frame", limits.MAX_TOKENS, limits.MAX_TOKENS + 1),
    ("window_tokens: 512", "window_tokens: {v}", "window_tokens: ", "nodes.cache.window_tokens",
     limits.MAX_CACHE_TOKENS, limits.MAX_CACHE_TOKENS + 1),
    ("sink_tokens: 4", "sink_tokens: {v}", "sink_tokens: ", "nodes.cache.sink_tokens",
     limits.MAX_CACHE_TOKENS, limits.MAX_CACHE_TOKENS + 1),
    ("{op: sink_window, sink_tokens: 4, window_tokens: 512}", "{{op: full, capacity_tokens: {v}}}",
     "capacity_tokens: ", "nodes.cache.capacity_tokens", limits.MAX_CACHE_TOKENS,
     limits.MAX_CACHE_TOKENS + 1),
    ("{op: sink_window, sink_tokens: 4, window_tokens: 512}", "{{op: rekv, topk: {v}}}", "topk: ",
     "nodes.cache.topk", limits.MAX_COUNT, limits.MAX_COUNT + 1),
    ("{op: sink_window, sink_tokens: 4, window_tokens: 512}", "{{op: rekv, store_mb: {v}}}",
     "store_mb: ", "nodes.cache.store_mb", limits.MAX_MEMORY_MB, "1.0e+39"),
    ("{op: sink_window, sink_tokens: 4, window_tokens: 512}",
     "{{op: streaming_vlm, vision_window_seconds: {v}}}", "vision_window_seconds: ",
     "nodes.cache.vision_window_seconds", limits.MAX_SECONDS, "86400.01"),
]


@pytest.mark.parametrize("old,template,anchor,field,largest,too_big", BOUNDS,
                         ids=[b[3] for b in BOUNDS])
def test_numbers_are_bounded(old, template, anchor, field, largest, too_big):
    fmt = lambda v: repr(v) if isinstance(v, float) else str(v)  # noqa: E731
    parse_spec(edit(old, template.format(v=fmt(largest))), "g.yaml")  # the bound is allowed
    text = edit(old, template.format(v=too_big))
    err = parse_error(text)
    bound = int(largest) if float(largest).is_integer() else largest
    assert_at(err, *value_at(text, anchor), field, f"<= {bound}")


@pytest.mark.parametrize("old,new,anchor,field", [
    # the issue's repros: C++ overflow trace, and huge values that passed validate
    ("frame_size: [64, 64]", "frame_size: [9223372036854775808, 64]", "frame_size: [",
     "stream.frame_size[0]"),
    ("fps: 2", "fps: 1.0e+300", "fps: ", "stream.fps"),
    ("fps: 2", "fps: 1e39", "fps: ", "stream.fps"),
    ("frame_deadline_ms: 250", "frame_deadline_ms: 1e39", "frame_deadline_ms: ",
     "slo.frame_deadline_ms"),
    ("memory_mb: 512", "memory_mb: 1e39", "memory_mb: ", "budget.memory_mb"),
    ("max_new_tokens: 16", "max_new_tokens: " + "1" + "0" * 39, "max_new_tokens: ",
     "nodes.llm.max_new_tokens"),
], ids=["frame_size-2**63", "fps-1e300", "fps-1e39", "deadline-1e39", "memory-1e39",
        "max_new_tokens-10**39"])
def test_issue_repros_are_located_bound_errors(old, new, anchor, field):
    text = edit(old, new)
    err = parse_error(text)
    assert_at(err, *value_at(text, anchor), field, "must be <= ")
    assert len(str(err)) < 200, str(err)  # a huge number is shown short


@pytest.mark.parametrize("value", ["1" + "0" * 400, "[16, " + "9" * 400 + "]"])
def test_huge_token_budget_is_a_located_error(value):
    # found by scripts/fuzz_graphs.py: formatting the value raised OverflowError
    text = edit("tokens_per_frame: 16", f"tokens_per_frame: {value}")
    err = parse_error(text)
    assert_at(err, *value_at(text, "tokens_per_frame: "), "nodes.pruner.tokens_per_frame",
              f"<= {limits.MAX_TOKENS}", "digits")


def test_yaml_1_2_exponent_floats():
    # YAML 1.1 (PyYAML) reads `1e3` as a string; a graph file reads it as the number
    assert parse_spec(edit("fps: 2", "fps: 1e3"), "g.yaml").stream.fps == float("1e3")
    assert parse_spec(edit("fps: 2", "fps: 25E-1"), "g.yaml").stream.fps == float("25E-1")
    assert parse_spec(edit("fps: 2", "fps: 1.5e0"), "g.yaml").stream.fps == float("1.5e0")
    err = parse_error(edit("fps: 2", "fps: '1e3'"))
    assert "expected a number, got string '1e3'" in err.message  # quoted: still a string
    assert parse_spec(edit("tokens_per_frame: 16", "tokens_per_frame: 16"), "g.yaml")
    err = parse_error(edit("tokens_per_frame: 16", "tokens_per_frame: 1e1"))
    assert "expected an integer" in err.message  # an exponent makes a float, never an int


def test_frame_area_is_bounded():
    side = limits.MAX_FRAME_SIDE
    assert limits.MAX_FRAME_PIXELS // side >= 8
    ok = parse_spec(edit("[64, 64]", f"[{side}, {limits.MAX_FRAME_PIXELS // side}]"), "g.yaml")
    assert ok.stream.frame_size[0] * ok.stream.frame_size[1] <= limits.MAX_FRAME_PIXELS
    text = edit("[64, 64]", f"[{side}, {limits.MAX_FRAME_PIXELS // side + 1}]")
    err = parse_error(text)
    assert_at(err, *value_at(text, "frame_size: "), "stream.frame_size", "exceeds",
              str(limits.MAX_FRAME_PIXELS))


def test_names_fit_a_file_name():
    long = "a" * limits.MAX_NAME_CHARS
    assert parse_spec(edit("name: streaming-vlm-tiny", f"name: {long}"), "g.yaml").name == long
    text = edit("name: streaming-vlm-tiny", f"name: {long}b")
    assert_at(parse_error(text), *value_at(text, "name: "), "name",
              f"at most {limits.MAX_NAME_CHARS} characters")
    for bad in [".", "..", "'a/b'", "'-x'", "'é'", "'a\\nb'", "'a b'"]:
        text = edit("name: streaming-vlm-tiny", f"name: {bad}")
        assert_at(parse_error(text), *value_at(text, "name: "), "name", "must start with")
    # node names: the same length limit, and no trailing newline
    node = "n" * limits.MAX_NAME_CHARS
    spec = parse_spec(EXAMPLE.replace("llm:", f"{node}:"), "g.yaml")
    assert node in spec.nodes
    text = EXAMPLE.replace("llm:", f"{node}x:")
    line = text[:text.index(f"{node}x:")].count("\n") + 1
    assert_at(parse_error(text), line, 3, f"nodes.{node}x",
              f"at most {limits.MAX_NAME_CHARS}")
    text = EXAMPLE.replace("  llm:", '  "llm\\n":')
    line = text[:text.index('"llm')].count("\n") + 1
    assert_at(parse_error(text), line, 3, "nodes.'llm\\n'", "invalid node name")


def test_hf_path_has_no_control_characters():
    text = edit("{preset: tiny, seed: 0}", '{hf: "ckpt\\0dir"}')
    assert_at(parse_error(text), *value_at(text, "hf: "), "model.hf", "control character")
    text = edit("{preset: tiny, seed: 0}", "{hf: " + "d" * (limits.MAX_PATH_CHARS + 1) + "}")
    assert_at(parse_error(text), *value_at(text, "hf: "), "model.hf",
              f"at most {limits.MAX_PATH_CHARS} characters")


def test_deep_nesting_is_a_located_error():
    depth = limits.MAX_YAML_DEPTH + 50
    text = edit("name: streaming-vlm-tiny", "name: " + "[" * depth + "]" * depth)
    err = parse_error(text)
    line, col = value_at(text, "name: ")
    assert (err.line, err.col - col) == (line, limits.MAX_YAML_DEPTH - 1), str(err)
    assert "nesting deeper than" in err.message
    # as deep as the limit allows is fine for YAML (then a type error at `name`)
    ok_depth = limits.MAX_YAML_DEPTH - 1
    err = parse_error(edit("name: streaming-vlm-tiny", "name: " + "[" * ok_depth + "]" * ok_depth))
    assert err.field == "name" and "expected a string" in err.message


@pytest.mark.parametrize("literal,fragment", [
    ("2020-13-45", "month must be in 1..12"),          # a timestamp that is no date
    ("9" * 5000, "digits"),                             # int() refuses > 4300 digits
    ("!!binary a", "base64"),
])
def test_values_yaml_cannot_construct_are_located(literal, fragment):
    text = edit("fps: 2", f"fps: {literal}")
    err = parse_error(text)
    assert (err.line, err.col) == value_at(text, "fps: "), str(err)
    assert fragment in str(err) and len(str(err)) < 300, str(err)


def test_every_number_in_the_schema_is_bounded():
    """Each integer or number of the JSON Schema has a maximum (and a minimum): a field
    added without bounds fails here."""
    unbounded = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") in ("integer", "number") and "const" not in node:
                if not ({"maximum", "exclusiveMaximum"} & set(node)
                        and {"minimum", "exclusiveMinimum"} & set(node)):
                    unbounded.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(json_schema(), "#")
    assert unbounded == []
