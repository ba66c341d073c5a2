"""The compile pipeline: YAML -> spec -> graph checks -> plan -> ONNX engines -> bundle."""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import streamgraph
from streamgraph.compiler.bundle import FORMAT_VERSION, Bundle, lock_key, write_manifest
from streamgraph.compiler.plan import Plan, make_plan
from streamgraph.errors import BundleError, PlanError, SpecError

SYSTEM_PROMPT = "You are a helpful assistant watching a live video stream."


@dataclass
class CheckedGraph:
    """A graph that passed every check: spec, pipeline graph, model config and plan."""

    spec: object
    pipeline: object
    cfg: object
    plan: Plan
    model: object = None
    modules: dict | None = None           # engine name -> torch module


def _node_params(node) -> dict:
    d = node.model_dump()
    d.pop("op", None)
    d.pop("input", None)
    return d


def check_graph(path: str | Path, build_weights: bool = True) -> CheckedGraph:
    """Parse, check and plan a graph file (no export).

    Raises :class:`SpecError`/:class:`GraphError` (located in the file) or :class:`PlanError`
    (memory over budget, with the numbers)."""
    from streamgraph.compiler.graph import build_graph
    from streamgraph.compiler.lower import engine_modules, engine_weight_bytes
    from streamgraph.compiler.ops import budget_values
    from streamgraph.compiler.spec import load_spec
    from streamgraph.models.build import build_model, model_config

    spec = load_spec(path)
    cfg = model_config(spec)
    pipeline = build_graph(spec, encoder_tokens=cfg.vision.num_patches, hidden_size=cfg.text.hidden_size)
    nodes = spec.nodes
    dec = nodes[pipeline.decoder]
    red_node = nodes[pipeline.reducer] if pipeline.reducer else None
    enc_node = nodes[pipeline.encoder]
    encoder = {"op": enc_node.op, "params": _node_params(enc_node)} if enc_node.op != "vision_encoder" else None
    model = build_model(spec)
    reducer, budgets, reducer_io = None, None, None
    if red_node is not None and red_node.op != "none":
        budget = getattr(red_node, "tokens_per_frame", None)
        budgets = budget_values(budget) if budget is not None else [pipeline.tokens_per_frame]
        reducer = {"op": red_node.op, "params": _node_params(red_node)}
    cache_node = nodes[pipeline.cache]
    cache = {"op": cache_node.op, "params": _node_params(cache_node)}
    modules = engine_modules(model, reducer, budgets, encoder)
    if reducer is not None:
        n, c = cfg.vision.num_patches, cfg.text.hidden_size
        reducers = {k: modules[f"reducer_k{k}"] for k in budgets}
        reducer_io = {k: m.io(1, n, c) for k, m in reducers.items() if hasattr(m, "io")}
        largest = reducers[budgets[-1]]
        reducer["state"] = [f"state_{s}" for s in getattr(largest, "state", ())]
        reducer["first_frame_full"] = bool(getattr(largest, "first_frame_full", False))
    try:
        plan = make_plan(cfg=cfg, reducer=reducer, tokens_per_frame=pipeline.tokens_per_frame, cache=cache,
                         prefill_chunk_tokens=dec.prefill_chunk_tokens, max_new_tokens=dec.max_new_tokens,
                         budget_mb=spec.budget.memory_mb,
                         engine_weight_bytes=engine_weight_bytes(model, reducer, budgets, encoder),
                         budgets=budgets, reducer_io=reducer_io, encoder=encoder,
                         max_frame_tokens=pipeline.max_frame_tokens,
                         fps=float(spec.stream.fps))
    except PlanError as e:
        line, col = spec.locate(("budget", "memory_mb")) or (None, None)
        raise SpecError(str(e), file=spec.source_file, line=line, col=col, field="budget.memory_mb") from None
    return CheckedGraph(spec, pipeline, cfg, plan, model, modules)


def _tool_versions() -> dict:
    import onnx
    import onnxscript
    import torch

    from streamgraph.compiler.lower import OPSET

    return {"streamgraph": streamgraph.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "opset": OPSET}


@dataclass
class CompileResult:
    bundle: Bundle
    rebuilt: bool
    checked: CheckedGraph


TARGETS = ("onnx", "torch")


def compile_graph(path: str | Path, out_dir: str | Path | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None, target: str = "onnx") -> CompileResult:
    """Compile a graph file into a bundle at ``out_dir`` (default ``build/<name>``).

    ``target="onnx"`` exports every engine; ``target="torch"`` writes only the weights,
    tokenizer and manifest, for the eager torch backend (reference runs, fast tests).

    Skips the export when a bundle with the same lock key and intact files is already there.
    The new bundle is built in a temporary directory beside ``out_dir`` and moved into place
    only when complete, so a failed compile never damages an existing bundle.
    Raises SpecError/GraphError/PlanError for bad graphs."""
    from streamgraph.compiler.lower import lower_all
    from streamgraph.models.build import save_weights, weights_sha256
    from streamgraph.models.tokenizer import save_byte_level_tokenizer

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r} (allowed: {', '.join(TARGETS)})")
    checked = check_graph(path)
    spec, plan = checked.spec, checked.plan
    out = Path(out_dir) if out_dir is not None else Path("build") / spec.name
    tools = _tool_versions()
    wsha = weights_sha256(checked.model)
    key = lock_key({"graph": spec.normalized(), "weights": wsha, "plan": plan.to_dict(),
                    "tools": tools, "target": target})
    if not force and (out / "manifest.json").is_file():
        try:
            existing = Bundle.load(out)
            if existing.lock_key == key:
                return CompileResult(existing, False, checked)
        except BundleError:
            pass  # damaged or stale: rebuild
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if target == "onnx":
            lower_all(checked.model, plan, tmp, progress=progress)
        save_weights(checked.model, tmp / "weights.safetensors")
        save_byte_level_tokenizer(tmp / "tokenizer.json")
        manifest = {
            "format": FORMAT_VERSION,
            "name": spec.name,
            "lock_key": key,
            "graph": spec.normalized(),
            "source": str(Path(path)),
            "model": {"config": checked.cfg.to_dict(), "weights_sha256": wsha,
                      "source": spec.model.model_dump()},
            "plan": plan.to_dict(),
            "prompt": {"system": SYSTEM_PROMPT, "tokenizer": "tokenizer.json"},
            "slo": spec.slo.model_dump(),
            "stream": json.loads(spec.stream.model_dump_json()),
            "tools": tools,
            "target": target,
        }
        write_manifest(tmp, manifest)
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompileResult(Bundle.load(out), True, checked)
