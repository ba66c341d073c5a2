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

    With ``build_weights=False`` the model is built on the ``meta`` device: exact shapes and
    weight bytes for the plan, no weights read and no memory used (``streamgraph validate``).
    Raises :class:`SpecError`/:class:`GraphError` (located in the file), :class:`PlanError`
    (memory over budget, with the numbers) or a checkpoint error (``model.hf``)."""
    from streamgraph.compiler.graph import build_graph
    from streamgraph.compiler.lower import engine_modules, engine_weight_bytes
    from streamgraph.compiler.ops import budget_values
    from streamgraph.compiler.spec import load_spec
    from streamgraph.models.build import build_model, model_config

    spec = load_spec(path)
    cfg = model_config(spec)
    pipeline = build_graph(spec, encoder_tokens=cfg.encoder_tokens, hidden_size=cfg.text.hidden_size,
                           encoder_grid=cfg.encoder_grid)
    nodes = spec.nodes
    dec = nodes[pipeline.decoder]
    red_node = nodes[pipeline.reducer] if pipeline.reducer else None
    enc_node = nodes[pipeline.encoder]
    encoder = {"op": enc_node.op, "params": _node_params(enc_node)} if enc_node.op != "vision_encoder" else None
    model = build_model(spec, device="cpu" if build_weights else "meta")
    reducer, budgets, reducer_io = None, None, None
    if red_node is not None and red_node.op != "none":
        budget = getattr(red_node, "tokens_per_frame", None)
        budgets = budget_values(budget) if budget is not None else [pipeline.tokens_per_frame]
        reducer = {"op": red_node.op, "params": _node_params(red_node)}
        if red_node.op == "pool":         # the pooling grid is the encoder's token grid
            reducer["params"]["grid"] = list(pipeline.shapes[pipeline.encoder].grid)
    cache_node = nodes[pipeline.cache]
    cache = {"op": cache_node.op, "params": _node_params(cache_node)}
    modules = engine_modules(model, reducer, budgets, encoder)
    if reducer is not None:
        n, c = pipeline.shapes[pipeline.encoder].n, cfg.text.hidden_size
        reducers = {k: modules[f"reducer_k{k}"] for k in budgets}
        reducer_io = {k: m.io(1, n, c) for k, m in reducers.items() if hasattr(m, "io")}
        largest = reducers[budgets[-1]]
        reducer["state"] = [f"state_{s}" for s in getattr(largest, "state", ())]
        reducer["first_frame_full"] = bool(getattr(largest, "first_frame_full", False))
    try:
        plan = make_plan(cfg=cfg, reducer=reducer, tokens_per_frame=pipeline.tokens_per_frame, cache=cache,
                         prefill_chunk_tokens=dec.prefill_chunk_tokens, max_new_tokens=dec.max_new_tokens,
                         budget_mb=spec.budget.memory_mb, dtype=spec.model.dtype,
                         engine_weight_bytes=engine_weight_bytes(model, reducer, budgets, encoder),
                         budgets=budgets, reducer_io=reducer_io, encoder=encoder,
                         max_frame_tokens=pipeline.max_frame_tokens,
                         fps=float(spec.stream.fps))
    except PlanError as e:
        field = getattr(e, "field", None)  # CachePlanError: a parameter of the cache node
        path = ("nodes", pipeline.cache, field) if field else ("budget", "memory_mb")
        raise spec.error_at(path, str(e)) from None
    return CheckedGraph(spec, pipeline, cfg, plan, model, modules)


def _hf_assets(spec, out: Path) -> dict:
    """Bundle files of an ``hf`` model: the checkpoint's ``tokenizer.json``, LLaVA-OneVision's
    ``image_newline`` embedding (``image_newline.npy``, model dtype, shape ``[C]``) and the
    prompt format rendered from its chat template (:func:`streamgraph.models.hf.prompt_format`).
    Returns the manifest's ``prompt`` section. The weights are not copied: the ONNX engines
    carry them, and the torch reference backend reads the (hash-checked) checkpoint."""
    import numpy as np

    from streamgraph.models.build import hf_checkpoint
    from streamgraph.models.build import TORCH_DTYPES
    from streamgraph.models.hf import prompt_format, read_tensor

    ckpt = hf_checkpoint(spec)
    shutil.copyfile(ckpt.tokenizer_file, out / "tokenizer.json")
    fmt = prompt_format(ckpt)
    stop = fmt.pop("stop_token_ids")
    newline = read_tensor(ckpt, "image_newline").to(TORCH_DTYPES[spec.model.dtype]).numpy()
    np.save(out / "image_newline.npy", newline)
    return {"system": None, "tokenizer": "tokenizer.json", "format": fmt, "stop_token_ids": stop,
            "video_end_embedding": "image_newline.npy", "video_token": ckpt.video_token,
            "video_token_id": ckpt.video_token_id, "chat_template_file": ckpt.chat_template_file}


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
    from streamgraph.models.build import save_weights, weights_fingerprint
    from streamgraph.models.tokenizer import save_byte_level_tokenizer

    from streamgraph.models.build import build_model

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r} (allowed: {', '.join(TARGETS)})")
    # plan on the meta device; a checkpoint's weights are read only if the bundle is rebuilt
    # (its lock key hashes the checkpoint files), a preset's random weights are cheap
    checked = check_graph(path, build_weights=False)
    spec, plan = checked.spec, checked.plan
    if spec.model.hf is None:
        checked.model = build_model(spec)
    out = Path(out_dir) if out_dir is not None else Path("build") / spec.name
    tools = _tool_versions()
    wsha, ckpt_files = weights_fingerprint(spec, checked.model)
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
        if spec.model.hf is not None and target == "onnx":
            checked.model = build_model(spec)
        if target == "onnx":
            lower_all(checked.model, plan, tmp, progress=progress)
        model_info = {"config": checked.cfg.to_dict(), "weights_sha256": wsha, "source": spec.model.model_dump()}
        if spec.model.hf is None:
            save_weights(checked.model, tmp / "weights.safetensors")
            save_byte_level_tokenizer(tmp / "tokenizer.json")
            prompt = {"system": SYSTEM_PROMPT, "tokenizer": "tokenizer.json"}
        else:
            prompt = _hf_assets(spec, tmp)
            model_info["checkpoint"] = {"path": str(spec.resolve_path(spec.model.hf)), "files": ckpt_files}
        manifest = {
            "format": FORMAT_VERSION,
            "name": spec.name,
            "lock_key": key,
            "graph": spec.normalized(),
            "source": str(Path(path)),
            "model": model_info,
            "plan": plan.to_dict(),
            "prompt": prompt,
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
