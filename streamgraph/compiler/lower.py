"""Lowering: torch modules -> ONNX engines with ``torch.onnx.export(..., dynamo=True)``.

The legacy TorchScript exporter traces Python branches and masks as constants; the dynamo
exporter captures the graph with ``torch.export`` and keeps the chunk axis ``T`` symbolic.
Every engine is checked with ``onnx.checker`` after export.

A protobuf message cannot exceed 2 GiB, so an engine whose weights exceed
:data:`EXTERNAL_DATA_MIN_BYTES` (1 GiB) is written in ONNX's external-data format: the graph
in ``engines/<name>.onnx`` and its weights in ``engines/<name>.onnx.data`` beside it (ONNX
Runtime loads both; the bundle hashes both).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from streamgraph.compiler.plan import EnginePlan, Plan
from streamgraph.contract import (DECODER_STEP, DTYPES, EMBED_TOKENS, INPUT_IDS, VISION_ENCODER,
                                  reducer_engine)

OPSET = 18
#: Engines with more weight bytes than this are exported with external data (see module doc).
EXTERNAL_DATA_MIN_BYTES = 1 << 30


def unique_param_bytes(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the distinct parameters/buffers of ``module`` (tied tensors counted once),
    skipping names starting with any prefix in ``skip``. Works on ``meta`` tensors (planning
    without weights), where tied tensors are recognised by identity."""
    seen, total = set(), 0
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        key = id(t) if t.is_meta else t.data_ptr()
        if any(name.startswith(s) for s in skip) or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def engine_modules(model, reducer: dict | None = None, budgets: list[int] | None = None,
                   encoder: dict | None = None) -> dict[str, torch.nn.Module]:
    """The module behind each engine: the plain engines of ``model``, one reducer module per
    budget bucket (``reducer_k{K}``; ``reducer`` is ``{"op", "params"}`` or None), and, for an
    encoder with reuse (``encoder = {"op": "stc_cacher", "params"}``), the engines its plugin
    builds around the plain encoder (STC-Cacher: the refresh encoder, exported as
    ``vision_encoder`` with the extra ``encoder_refs`` output, and ``vision_encoder_reuse``).
    The modules come from the op registry's plugins (``OpInfo.module``). Raises KeyError for an
    op that is not a registered plugin of that kind."""
    from streamgraph.compiler.spec import OPS  # the full registry (imports the plugin packages)
    from streamgraph.reducers import budgets_of, build_reducer

    mods = {
        VISION_ENCODER: model.vision_encoder(),
        EMBED_TOKENS: model.token_embedding(),
        DECODER_STEP: model.decoder_step(),
    }
    if encoder is not None:
        info = OPS.get(encoder["op"])
        if info is None or info.kind != "encoder" or info.module is None:
            raise KeyError(f"unknown encoder reuse op {encoder['op']!r}")
        mods.update(info.module(encoder["params"], mods[VISION_ENCODER]))
    if reducer is not None:
        for k in budgets or budgets_of(reducer["params"]) or [None]:
            module = build_reducer(reducer["op"], reducer["params"], k)
            mods[reducer_engine(getattr(module, "k", k))] = module
    return mods


def plan_engine_modules(model, plan: Plan) -> dict[str, torch.nn.Module]:
    """:func:`engine_modules` for the engines of ``plan``."""
    return engine_modules(model, plan.reducer, plan.budgets, plan.encoder)


def engine_weight_bytes(model, reducer: dict | None = None, budgets: list[int] | None = None,
                        encoder: dict | None = None) -> dict[str, int]:
    """Bytes of weights each exported engine carries (the decoder step does not use the input
    embedding table unless it is tied to ``lm_head``)."""
    out = {}
    for name, m in engine_modules(model, reducer, budgets, encoder).items():
        skip = ("model.embed_tokens",) if name == DECODER_STEP else ()
        out[name] = unique_param_bytes(m, skip)
    if model.cfg.text.tie_word_embeddings:
        out[DECODER_STEP] += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return out


def _example(spec_shape: list, dtype: str, t: int, name: str) -> torch.Tensor:
    shape = [t if d == "T" else int(d) for d in spec_shape]
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, DTYPES[dtype].torch)
    if dt == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if dt == torch.int64:
        if name == INPUT_IDS:
            return torch.randint(0, 200, shape, generator=g)
        n = shape[-1]
        return torch.arange(n, dtype=torch.int64).expand(*shape).contiguous()
    return torch.randn(shape, generator=g, dtype=dt)


def export_engine(module: torch.nn.Module, engine: EnginePlan, out_dir: Path, opset: int = OPSET,
                  verbose: bool = False, external_data: bool | None = None) -> Path:
    """Export ``module`` to ``out_dir / engine.file`` with the plan's I/O names and shapes.

    The symbolic axis ``T`` becomes a ``torch.export.Dim`` bounded by ``engine.dims['T']``.
    ``external_data`` (default: ``engine.weights_bytes > EXTERNAL_DATA_MIN_BYTES``) stores the
    weights in ``<file>.data``. Raises RuntimeError (with the exporter's message) when export
    fails."""
    import onnx

    t_min, t_max = engine.dims.get("T", [1, 1])
    dynamic = t_max > t_min
    t_example = min(t_max, max(2, t_min + 1)) if dynamic else t_max
    args = tuple(_example(s.shape, s.dtype, t_example, s.name) for s in engine.inputs)
    dyn = None
    if dynamic:
        tdim = torch.export.Dim("T", min=t_min, max=t_max)
        dyn = {s.name: ({i: tdim for i, d in enumerate(s.shape) if d == "T"} or None) for s in engine.inputs}
    path = out_dir / engine.file
    path.parent.mkdir(parents=True, exist_ok=True)
    external = engine.weights_bytes > EXTERNAL_DATA_MIN_BYTES if external_data is None else external_data
    sink = io.StringIO()
    ctx = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    for name in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with ctx, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=True, opset_version=opset,
                          input_names=[s.name for s in engine.inputs],
                          output_names=[s.name for s in engine.outputs],
                          dynamic_shapes=dyn, external_data=external, verbose=False)
    onnx.checker.check_model(str(path))
    return path


def lower_all(model, plan: Plan, out_dir: Path, opset: int = OPSET, progress=None) -> None:
    """Export every engine of ``plan`` into ``out_dir``; ``progress(name)`` is called before each."""
    mods = plan_engine_modules(model, plan)
    for name, engine in plan.engines.items():
        if progress:
            progress(name)
        export_engine(mods[name], engine, out_dir, opset)
