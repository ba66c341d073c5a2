"""The compile pipeline as passes over one annotated graph; reducer plugins (one file each,
registered without torch); no import circles in the compiler and the plugins."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest

import streamgraph
from streamgraph.compiler import passes
from streamgraph.compiler.compile import check_graph

PACKAGE = Path(streamgraph.__file__).parent
PLUGINS = ("topk_saliency", "dtd", "stc_pruner", "tome", "pool", "stc_cacher")

GRAPH = """\
version: 1
name: passes
model: {{preset: tiny}}
stream: {{fps: 2}}
slo: {{frame_deadline_ms: 250, ttft_ms: 500}}
budget: {{memory_mb: 512}}
nodes:
  encoder: {{op: {encoder}}}
  pruner:  {{op: {reducer}, input: encoder{budget}}}
  cache:   {{op: sink_window, sink_tokens: 4, window_tokens: 256}}
  llm:     {{op: decoder, input: [pruner, query], cache: cache, max_new_tokens: 8}}
"""


def graph_text(reducer: str = "topk_saliency", encoder: str = "vision_encoder") -> str:
    budget = "" if reducer in ("pool", "none") else ", tokens_per_frame: [8, 16]"
    return GRAPH.format(encoder=encoder, reducer=reducer, budget=budget)


def test_pipeline_is_listed_in_order_and_run_by_one_driver(tmp_path):
    names = [p.__name__ for p in passes.PIPELINE]
    assert names == ["parse_spec", "model_config", "add_nodes", "check_acyclic", "check_ports", "check_chain",
                     "infer_shapes", "check_cache", "plan_cache_layout", "build_modules", "plan_memory",
                     "lower", "write_bundle"]
    path = tmp_path / "g.yaml"
    path.write_text(graph_text("dtd"))
    checked = check_graph(path, build_weights=False)
    g = checked.graph
    assert g.graph["passes"] == [p.__name__ for p in passes.CHECK]
    # results live in the annotated graph's metadata; the plan is built from them
    plan, pg = checked.plan, checked.pipeline
    assert g.nodes["encoder"]["shape"].n == plan.encoder_tokens == 64
    assert g.nodes["pruner"]["shape"].n == plan.tokens_per_frame == 16
    assert g.graph["max_frame_tokens"] == 64                      # DTD sends its first frame whole
    assert g.nodes["cache"]["capacity"] == pg.cache_capacity == 4 + 256
    assert g.nodes["cache"]["layout"]["capacity"] == plan.cache["capacity"] == plan.kv.shape[4] == 260
    assert g.nodes["pruner"]["entry"] is plan.reducer and plan.reducer["state"] == ["state_prev_tokens"]
    assert sorted(g.graph["modules"]) == sorted(plan.engines)
    assert nx.is_directed_acyclic_graph(g) and pg.graph is g


def test_plan_errors_keep_their_location(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(graph_text().replace("memory_mb: 512", "memory_mb: 1"))
    with pytest.raises(streamgraph.errors.SpecError) as info:
        check_graph(path, build_weights=False)
    err = info.value
    assert (err.line, err.col, err.field) == (6, 21, "budget.memory_mb"), str(err)
    assert str(err).startswith(f"{path}:6:21: budget.memory_mb: plan needs ")
    path.write_text(graph_text().replace("window_tokens: 256", "window_tokens: 20"))
    with pytest.raises(streamgraph.errors.GraphError) as info:
        check_graph(path, build_weights=False)
    assert info.value.field == "nodes.cache.window_tokens" and info.value.line == 10


def test_graph_and_cache_errors_come_before_torch(tmp_path):
    """Every pass before build_modules is torch-free: a broken graph fails before torch loads."""
    cycle = graph_text().replace("input: encoder", "input: pruner")
    bad_cache = graph_text().replace("window_tokens: 256", "window_tokens: 20")
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None
        from streamgraph.compiler.compile import check_graph
        from streamgraph.errors import StreamgraphError
        out = []
        for name, text in [("cycle", {cycle!r}), ("cache", {bad_cache!r})]:
            path = {str(tmp_path)!r} + "/" + name + ".yaml"
            open(path, "w").write(text)
            try:
                check_graph(path, build_weights=False)
                out.append("no error")
            except StreamgraphError as e:
                out.append([type(e).__name__, e.line, e.field, e.message])
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    (cycle_err, cache_err) = json.loads(res.stdout.strip().splitlines()[-1])
    assert cycle_err[:3] == ["GraphError", 9, "nodes.pruner.input"] and "cycle in the graph" in cycle_err[3]
    assert cache_err[:3] == ["GraphError", 10, "nodes.cache.window_tokens"]


@pytest.mark.parametrize("op", PLUGINS)
def test_a_reducer_is_one_plugin_file(op):
    from streamgraph.compiler.spec import OPS

    info = OPS[op]
    module = f"streamgraph.reducers.{op}"
    assert info.params.__module__ == module and info.module.__module__ == module
    assert info.infer_shape.__module__ in (module, "streamgraph.reducers.base", "streamgraph.compiler.ops")
    if op == "stc_cacher":
        import torch

        from streamgraph.models.build import build_model
        from streamgraph.compiler.spec import parse_spec

        spec = parse_spec(graph_text("none", "stc_cacher"))
        with torch.device("meta"):
            plain = build_model(spec, device="meta").vision_encoder()
        mods = info.module({"update_ratio": 0.5}, plain)
        assert sorted(mods) == ["vision_encoder", "vision_encoder_reuse"]
        assert {type(m).__module__ for m in mods.values()} == {module}
    else:
        params = {"grid": [8, 8]} if op == "pool" else {"tokens_per_frame": 8}
        built = info.module(params, 8)
        assert type(built).__module__ == module


def test_registry_and_validation_import_no_torch(tmp_path):
    """The plugins register without torch (the runtime checks bundles with the registry, and
    `validate`'s graph checks read it); their torch parts fail only when used."""
    path = tmp_path / "g.yaml"
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None          # any `import torch` now raises ImportError
        from streamgraph.compiler.spec import OPS, parse_spec
        from streamgraph.compiler.graph import build_graph
        from streamgraph.reducers import REDUCERS, build_reducer
        from streamgraph.reducers.tome import merge_schedule
        from streamgraph.reducers.pool import pooled_grid
        from streamgraph.reducers.stc_cacher import selected_count
        import streamgraph.compiler.passes, streamgraph.compiler.plan, streamgraph.compiler.bundle
        text = {graph_text("tome")!r}
        shapes = {{}}
        for enc, red in [("vision_encoder", r) for r in {list(PLUGINS[:-1])!r}] + [("stc_cacher", "none")]:
            t = text.replace("op: tome", "op: " + red).replace("op: vision_encoder", "op: " + enc)
            if red in ("pool", "none"):
                t = t.replace(", tokens_per_frame: [8, 16]", "")
            pg = build_graph(parse_spec(t), encoder_tokens=64, hidden_size=32, encoder_grid=(8, 8))
            shapes[red] = pg.tokens_per_frame
        try:
            build_reducer("tome", {{"tokens_per_frame": 8}})
            torch_part = "built"
        except ImportError:
            torch_part = "needs torch"
        leaked = [m for m in sys.modules if (m == "torch" or m.startswith("torch.")) and sys.modules[m] is not None]
        print(json.dumps({{"ops": sorted(OPS), "reducers": sorted(REDUCERS), "shapes": shapes,
                           "tome": merge_schedule(64, 8), "pool": pooled_grid((8, 8)), "n": selected_count(64, 0.25),
                           "torch_part": torch_part, "leaked": leaked}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(PLUGINS) <= set(res["ops"]) and res["reducers"] == sorted(set(PLUGINS) - {"stc_cacher"})
    assert res["shapes"] == {"topk_saliency": 16, "dtd": 16, "stc_pruner": 16, "tome": 16, "pool": 16, "none": 64}
    assert res["tome"] == [32, 16, 8] and res["pool"] == [4, 4] and res["n"] == 16
    assert res["torch_part"] == "needs torch" and res["leaked"] == []


# --------------------------------------------------------------------------- import circles

def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """streamgraph modules imported by the file (module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m == "streamgraph" or m.startswith("streamgraph.")}


def _import_graph(top_level_only: bool) -> nx.DiGraph:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    g = nx.DiGraph()
    for name, path in files.items():
        g.add_node(name)
        for target in _imports(path, top_level_only):
            if target in files and target != name:
                g.add_edge(name, target)
            # `import a.b.c` also runs a and a.b: their __init__ are dependencies too
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in files and parent != name and not name.startswith(parent + "."):
                    g.add_edge(name, parent)
    return g


def test_no_import_circles_through_the_compiler_or_the_plugins():
    g = _import_graph(top_level_only=False)        # function-level imports count too
    ours = ("streamgraph.compiler", "streamgraph.reducers", "streamgraph.kv", "streamgraph.contract",
            "streamgraph.models")
    sub = g.subgraph(n for n in g if n.startswith(ours))
    cycles = [c for c in nx.simple_cycles(sub)]
    assert cycles == []
    # the registry core imports no plugin, even lazily; the spec imports both plugin packages
    assert not any(t.startswith(("streamgraph.reducers", "streamgraph.kv")) for t in g.successors("streamgraph.compiler.ops"))
    assert {"streamgraph.reducers", "streamgraph.kv"} <= set(g.successors("streamgraph.compiler.spec"))
    assert not (PACKAGE / "compiler" / "reduction_ops.py").exists()
