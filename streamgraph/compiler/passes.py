"""The compile pipeline, in order, in one place: passes over one annotated graph.

A pass is a function ``pass_(g) -> None`` over the annotated graph ``g`` (an
``nx.DiGraph``): it reads what earlier passes left in the graph's metadata and adds its own
results there — per node in ``g.nodes[n][...]``, for the whole graph in ``g.graph[...]`` —
as torch.fx passes annotate ``node.meta``. :func:`run_passes` is the one driver;
:func:`~streamgraph.compiler.compile.check_graph` runs :data:`CHECK` (no export: fast, and
``streamgraph validate`` builds the model on the ``meta`` device) and
:func:`~streamgraph.compiler.compile.compile_graph` then runs :data:`EMIT` into a temporary
directory that it publishes as the bundle.

=====================  ====================================================================
pass                    reads -> writes
=====================  ====================================================================
``parse_spec``          ``g.graph["path"]`` -> ``["spec"]`` (:class:`GraphSpec`)
``model_config``        spec -> ``["cfg"]`` (:class:`~streamgraph.models.config.VLMConfig`),
                        ``["shape_context"]`` (N, C, token grid)
``add_nodes``           spec -> nodes (``kind``, ``op``, ``type``, ``spec``), reference edges
``check_acyclic``       edges (a cycle is reported at the reference closing it)
``check_ports``         -> ``["decoder"]``, edge ``port``; no dangling node
``check_chain``         -> ``["encoder"]``, ``["reducers"]``, ``["cache"]``
``infer_shapes``        -> ``g.nodes[n]["shape"]``, ``["tokens_per_frame"]``,
                        ``["max_frame_tokens"]``
``check_cache``         -> ``g.nodes[cache]["capacity"]``
``plan_cache_layout``   -> ``g.nodes[cache]["layout"]`` (slots, regions, bytes, host bytes),
                        ``g.nodes[cache]["entry"]`` (the plan's ``{"op", "params"}``)
``build_modules``       -> ``["model"]`` (torch; ``meta`` device unless ``build_weights``),
                        ``["modules"]`` (engine -> torch module), ``g.nodes[n]["entry"]``
                        (the plan's ``{"op", "params", ...}`` of the encoder and reducer)
``plan_memory``         -> ``["plan"]`` (:class:`~streamgraph.compiler.plan.Plan`: engine
                        I/O, KV buffer, memory by part, checked against ``budget.memory_mb``)
``lower``               ``["out"]`` -> ``engines/*.onnx`` (target ``onnx``; torch export)
``write_bundle``        ``["out"]`` -> weights or checkpoint assets, tokenizer, manifest
=====================  ====================================================================

Every error a pass raises is located in the graph file (``FILE:LINE:COL: FIELD: MESSAGE``):
spec and graph errors by construction, plan errors at the cache parameter at fault or at
``budget.memory_mb``. The passes up to ``plan_cache_layout`` import no torch, so a graph that
fails any of them fails before torch loads (``streamgraph validate`` on a broken graph);
``build_modules`` is the first that needs torch (weight bytes and reducer I/O from the
modules, on the ``meta`` device).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import networkx as nx

from streamgraph.compiler.graph import GRAPH_PASSES, cache_context, new_graph, pipeline_of, shape_context
from streamgraph.compiler.ops import ShapeError, budget_values
from streamgraph.contract import reducer_engine
from streamgraph.errors import PlanError

__all__ = ["Pass", "CHECK", "EMIT", "PIPELINE", "run_passes", "start", "parse_spec", "model_config",
           "build_modules", "plan_cache_layout", "plan_memory", "lower", "write_bundle"]

#: A pass: a function over the annotated graph.
Pass = Callable[[nx.DiGraph], None]

SYSTEM_PROMPT = "You are a helpful assistant watching a live video stream."


def start(path: str | Path, *, build_weights: bool = False, **meta) -> nx.DiGraph:
    """A fresh annotated graph for the graph file at ``path`` (``meta``: more graph metadata,
    e.g. ``out``, ``target``)."""
    return new_graph(path=Path(path), build_weights=build_weights, **meta)


def run_passes(g: nx.DiGraph, passes: tuple[Pass, ...]) -> nx.DiGraph:
    """Run ``passes`` in order over ``g`` (names recorded in ``g.graph["passes"]``); returns
    ``g``. A pass's exception propagates unchanged."""
    done = g.graph.setdefault("passes", [])
    for run in passes:
        run(g)
        done.append(run.__name__)
    return g


# --------------------------------------------------------------------------- front end

def parse_spec(g: nx.DiGraph) -> None:
    """Read and validate the graph file (:func:`~streamgraph.compiler.spec.load_spec`)."""
    from streamgraph.compiler.spec import load_spec

    g.graph["spec"] = load_spec(g.graph["path"])


def model_config(g: nx.DiGraph) -> None:
    """The model's config (a preset's, or a checkpoint's ``config.json``), and the N, C and
    token grid the shape rules need. Torch-free: the graph checks run before torch loads."""
    from streamgraph.models.source import model_config as config_of

    cfg = config_of(g.graph["spec"])
    g.graph["cfg"] = cfg
    g.graph["shape_context"] = shape_context(cfg.encoder_tokens, cfg.text.hidden_size, cfg.encoder_grid)


# --------------------------------------------------------------------------- middle: model and plan

def _params(node) -> dict:
    d = node.model_dump()
    d.pop("op", None)
    d.pop("input", None)
    return d


def build_modules(g: nx.DiGraph) -> None:
    """The torch model (on the ``meta`` device unless ``g.graph["build_weights"]``: exact
    shapes and weight bytes, no weights read) and the module of every engine; the plan
    entries of the encoder (with reuse) and the reducer (budget buckets, state names, whether
    a frame is sent whole). The first pass that imports torch."""
    from streamgraph.compiler.lower import engine_modules
    from streamgraph.models.build import build_model

    spec, pg = g.graph["spec"], pipeline_of(g)
    nodes = spec.nodes
    enc_node = nodes[pg.encoder]
    encoder = {"op": enc_node.op, "params": _params(enc_node)} if enc_node.op != "vision_encoder" else None
    red_node = nodes[pg.reducer] if pg.reducer else None
    reducer, budgets = None, None
    if red_node is not None and red_node.op != "none":
        budget = getattr(red_node, "tokens_per_frame", None)
        budgets = budget_values(budget) if budget is not None else [pg.tokens_per_frame]
        reducer = {"op": red_node.op, "params": _params(red_node)}
        if red_node.op == "pool":         # the pooling grid is the encoder's token grid
            reducer["params"]["grid"] = list(pg.shapes[pg.encoder].grid)
    model = build_model(spec, device="cpu" if g.graph.get("build_weights") else "meta")
    modules = engine_modules(model, reducer, budgets, encoder)
    if reducer is not None:
        largest = modules[reducer_engine(budgets[-1])]
        reducer["state"] = [f"state_{s}" for s in getattr(largest, "state", ())]
        reducer["first_frame_full"] = bool(getattr(largest, "first_frame_full", False))
        g.nodes[pg.reducer]["entry"] = reducer
    if encoder is not None:
        g.nodes[pg.encoder]["entry"] = encoder
    g.graph.update(model=model, modules=modules, budgets=budgets)


def _located_plan_error(g: nx.DiGraph, e: PlanError | ShapeError):
    """A plan error located in the graph file: at the cache parameter it names, else at
    ``budget.memory_mb``."""
    spec = g.graph["spec"]
    field = getattr(e, "field", None)
    path = ("nodes", g.graph["cache"], field) if field else ("budget", "memory_mb")
    return spec.error_at(path, getattr(e, "message", None) or str(e))


def plan_cache_layout(g: nx.DiGraph) -> None:
    """The cache policy's layout in the one KV buffer: slots, regions, bytes, host bytes and
    the policy's facts (:func:`~streamgraph.compiler.plan.cache_layout`, computed by the
    policy's own file in :mod:`streamgraph.kv`); ``g.nodes[cache]["entry"]`` is the plan's
    ``{"op", "params"}`` of the policy. Torch-free."""
    from streamgraph.compiler.plan import cache_layout

    spec, cache = g.graph["spec"], g.graph["cache"]
    entry = {"op": spec.nodes[cache].op, "params": _params(spec.nodes[cache])}
    g.nodes[cache]["entry"] = entry
    ctx = cache_context(g, max(g.graph["tokens_per_frame"], g.graph["max_frame_tokens"]))
    try:
        g.nodes[cache]["layout"] = cache_layout(entry["op"], entry["params"], ctx, g.graph["cfg"],
                                                1, spec.model.dtype)
    except ShapeError as e:
        raise _located_plan_error(g, e) from None


def plan_memory(g: nx.DiGraph) -> None:
    """The :class:`~streamgraph.compiler.plan.Plan`: every engine's I/O, the KV buffer and the
    memory by part, checked against ``budget.memory_mb`` (a located PlanError-derived
    SpecError with every part in MiB when over)."""
    from streamgraph.compiler.lower import engine_weight_bytes
    from streamgraph.compiler.plan import make_plan

    spec, cfg, pg = g.graph["spec"], g.graph["cfg"], pipeline_of(g)
    dec = spec.nodes[pg.decoder]
    reducer = g.nodes[pg.reducer].get("entry") if pg.reducer else None
    encoder = g.nodes[pg.encoder].get("entry")
    budgets, modules = g.graph["budgets"], g.graph["modules"]
    reducer_io = None
    if reducer is not None:
        n, c = pg.shapes[pg.encoder].n, cfg.text.hidden_size
        reducer_io = {k: modules[reducer_engine(k)].io(1, n, c) for k in budgets
                      if hasattr(modules[reducer_engine(k)], "io")}
    try:
        g.graph["plan"] = make_plan(
            cfg=cfg, reducer=reducer, tokens_per_frame=pg.tokens_per_frame, cache=g.nodes[pg.cache]["entry"],
            prefill_chunk_tokens=dec.prefill_chunk_tokens, max_new_tokens=dec.max_new_tokens,
            budget_mb=spec.budget.memory_mb, dtype=spec.model.dtype,
            engine_weight_bytes=engine_weight_bytes(g.graph["model"], reducer, budgets, encoder),
            budgets=budgets, reducer_io=reducer_io, encoder=encoder, max_frame_tokens=pg.max_frame_tokens,
            fps=float(spec.stream.fps), layout=g.nodes[pg.cache].get("layout"))
    except PlanError as e:
        raise _located_plan_error(g, e) from None


# --------------------------------------------------------------------------- back end

def lower(g: nx.DiGraph) -> None:
    """Export every engine of the plan to ONNX under ``g.graph["out"]`` (target ``onnx``;
    nothing for the eager ``torch`` target). Builds the real weights first if the model is
    still on the ``meta`` device."""
    if g.graph.get("target", "onnx") != "onnx":
        return
    from streamgraph.compiler.lower import lower_all

    lower_all(_real_model(g), g.graph["plan"], Path(g.graph["out"]), progress=g.graph.get("progress"))


def _real_model(g: nx.DiGraph):
    model = g.graph["model"]
    if next(iter(model.parameters())).is_meta:
        from streamgraph.models.build import build_model

        model = build_model(g.graph["spec"])
        g.graph["model"] = model
    return model


def write_bundle(g: nx.DiGraph) -> None:
    """The bundle's files under ``g.graph["out"]``: a preset's weights and byte-level
    tokenizer, or a checkpoint's assets; then the manifest (format
    :data:`~streamgraph.compiler.bundle.FORMAT_VERSION`, signed with ``g.graph["key"]``)."""
    from streamgraph.compiler.bundle import FORMAT_VERSION, write_manifest
    from streamgraph.models.build import save_weights
    from streamgraph.models.tokenizer import save_byte_level_tokenizer

    spec, out = g.graph["spec"], Path(g.graph["out"])
    model_info = {"config": g.graph["cfg"].to_dict(), "weights_sha256": g.graph["weights_sha256"],
                  "source": spec.model.model_dump()}
    if spec.model.hf is None:
        save_weights(_real_model(g), out / "weights.safetensors")
        save_byte_level_tokenizer(out / "tokenizer.json")
        prompt = {"system": SYSTEM_PROMPT, "tokenizer": "tokenizer.json"}
    else:
        prompt = _hf_assets(spec, out)
        model_info["checkpoint"] = {"path": str(spec.resolve_path(spec.model.hf)),
                                    "files": g.graph["checkpoint_files"]}
    manifest = {
        "format": FORMAT_VERSION,
        "name": spec.name,
        "lock_key": g.graph["lock_key"],
        "graph": spec.normalized(),
        "source": str(g.graph["path"]),
        "model": model_info,
        "plan": g.graph["plan"].to_dict(),
        "prompt": prompt,
        "slo": spec.slo.model_dump(mode="json"),
        "stream": json.loads(spec.stream.model_dump_json()),
        "tools": g.graph["tools"],
        "target": g.graph.get("target", "onnx"),
    }
    write_manifest(out, manifest, g.graph.get("key"))


def _hf_assets(spec, out: Path) -> dict:
    """Bundle files of an ``hf`` model: the checkpoint's ``tokenizer.json``, LLaVA-OneVision's
    ``image_newline`` embedding (``image_newline.npy``, model dtype, shape ``[C]``) and the
    prompt format rendered from its chat template (:func:`streamgraph.models.hf.prompt_format`).
    Returns the manifest's ``prompt`` section. The weights are not copied: the ONNX engines
    carry them, and the torch reference backend reads the (hash-checked) checkpoint."""
    import shutil

    import numpy as np
    import torch

    from streamgraph.contract import DTYPES
    from streamgraph.models.source import hf_checkpoint
    from streamgraph.models.hf import prompt_format, read_tensor

    ckpt = hf_checkpoint(spec)
    shutil.copyfile(ckpt.tokenizer_file, out / "tokenizer.json")
    fmt = prompt_format(ckpt)
    stop = fmt.pop("stop_token_ids")
    newline = read_tensor(ckpt, "image_newline").to(getattr(torch, DTYPES[spec.model.dtype].torch)).numpy()
    np.save(out / "image_newline.npy", newline)
    return {"system": None, "tokenizer": "tokenizer.json", "format": fmt, "stop_token_ids": stop,
            "video_end_embedding": "image_newline.npy", "video_token": ckpt.video_token,
            "video_token_id": ckpt.video_token_id, "chat_template_file": ckpt.chat_template_file}


# --------------------------------------------------------------------------- the pipeline

#: Parse, check and plan: everything before export (``streamgraph validate``).
CHECK: tuple[Pass, ...] = (parse_spec, model_config,
                           *GRAPH_PASSES,  # add_nodes, check_acyclic, check_ports, check_chain, infer_shapes, check_cache
                           plan_cache_layout, build_modules, plan_memory)
#: Export and write the bundle (into ``g.graph["out"]``, a temporary directory).
EMIT: tuple[Pass, ...] = (lower, write_bundle)
#: The whole compile pipeline, in order.
PIPELINE: tuple[Pass, ...] = CHECK + EMIT
