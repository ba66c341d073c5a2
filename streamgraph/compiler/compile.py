"""The compile pipeline: YAML -> spec -> graph checks -> plan -> ONNX engines -> bundle."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import streamgraph
from streamgraph.compiler.bundle import (FORMAT_VERSION, MANIFEST, Bundle, DirLock, FileLock, lock_key,
                                        write_manifest)
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
                  progress: Callable[[str], None] | None = None, target: str = "onnx",
                  key: bytes | str | None = None) -> CompileResult:
    """Compile a graph file into a bundle at ``out_dir`` (default ``build/<name>``).

    ``target="onnx"`` exports every engine; ``target="torch"`` writes only the weights,
    tokenizer and manifest, for the eager torch backend (reference runs, fast tests).
    ``key`` signs the manifest with HMAC-SHA256 (default ``$STREAMGRAPH_BUNDLE_KEY``; none:
    a plain SHA-256 digest), see docs/bundles.md.

    The whole compile holds an exclusive lock on ``.<name>.lock`` beside the bundle, so
    concurrent compiles of one output directory run one after the other (the later ones find
    the bundle up to date and skip the export). The export is skipped when a bundle with the
    same lock key and intact files is already there. The new bundle is built in a temporary
    directory beside ``out_dir`` and published with one atomic directory exchange
    (``renameat2(RENAME_EXCHANGE)``) under an exclusive lock on the old bundle directory, which
    readers (:func:`~streamgraph.compiler.bundle.open_bundle`) hold shared while loading: a
    reader sees the old bundle or the new one, never a mix, and a failed compile never damages
    an existing bundle. Raises SpecError/GraphError/PlanError for bad graphs and BundleError
    when ``out_dir`` exists and is not a bundle directory (it is never replaced)."""
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
    lkey = lock_key({"graph": spec.normalized(), "weights": wsha, "plan": plan.to_dict(),
                     "tools": tools, "target": target})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"{out.parent}: cannot create the output directory: {e.strerror or e}") from None
    with FileLock(out.parent / f".{out.name}.lock"):
        _check_output(out)
        _remove_stale(out)
        if not force and (out / MANIFEST).is_file():
            try:
                existing = Bundle.load(out, key=key)
                if existing.lock_key == lkey:
                    return CompileResult(existing, False, checked)
            except BundleError:
                pass  # damaged, stale or of an older format: rebuild
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
                "lock_key": lkey,
                "graph": spec.normalized(),
                "source": str(Path(path)),
                "model": model_info,
                "plan": plan.to_dict(),
                "prompt": prompt,
                "slo": spec.slo.model_dump(mode="json"),
                "stream": json.loads(spec.stream.model_dump_json()),
                "tools": tools,
                "target": target,
            }
            write_manifest(tmp, manifest, key)
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CompileResult(Bundle.load(out, key=key), True, checked)


def _check_output(out: Path) -> None:
    """Refuse to replace anything but a bundle directory (or an empty directory)."""
    if out.is_symlink():
        raise BundleError(f"{out}: is a symbolic link; compile into a real directory (-o)")
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"{out}: exists and is not a directory; not replacing it")
    if not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not a bundle (no {MANIFEST}); not replacing it — "
                          f"choose another output directory")


def _remove_stale(out: Path) -> None:
    """Remove temporary directories of compiles of ``out`` that were killed (the caller holds
    the compile lock, so no other compile of ``out`` is running)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.tmp-[a-z0-9_]{{8}}$")
    for p in out.parent.iterdir():
        if pattern.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``). False where that is not available (other systems, old kernels or
    filesystems without it); OSError for a real failure."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, out: Path) -> None:
    """Make the complete bundle ``tmp`` the one at ``out`` (the caller holds the compile
    lock). With no bundle there, one rename. Else, under the exclusive lock on the old bundle
    directory (readers hold it shared while loading), one atomic exchange of the two
    directories; the old bundle, now at ``tmp``, is deleted after the lock is released.
    Without ``renameat2`` (not Linux), two renames under the same lock: a reader that arrives
    between them finds no bundle and reports it."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    with DirLock(out, exclusive=True):
        if not _exchange(tmp, out):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            os.rename(out, old)          # onto the empty directory just made
            os.rename(tmp, out)
            tmp = old
    shutil.rmtree(tmp, ignore_errors=True)
