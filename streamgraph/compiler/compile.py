"""The compile driver: :func:`check_graph` (parse, check, plan) and :func:`compile_graph`
(+ export and the bundle, published atomically). The passes and their order are in
:mod:`streamgraph.compiler.passes`."""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import streamgraph
from streamgraph.compiler import passes
from streamgraph.compiler.bundle import MANIFEST, Bundle, DirLock, FileLock, lock_key
from streamgraph.compiler.graph import pipeline_of
from streamgraph.compiler.plan import Plan
from streamgraph.errors import BundleError

SYSTEM_PROMPT = passes.SYSTEM_PROMPT


@dataclass
class CheckedGraph:
    """A graph that passed every check: spec, pipeline graph, model config and plan (views of
    the annotated graph ``graph`` the passes ran over)."""

    spec: object
    pipeline: object
    cfg: object
    plan: Plan
    model: object = None
    modules: dict | None = None           # engine name -> torch module
    graph: object = None                  # the annotated nx.DiGraph (passes.CHECK ran over it)


def _checked(g) -> CheckedGraph:
    return CheckedGraph(g.graph["spec"], pipeline_of(g), g.graph["cfg"], g.graph["plan"], g.graph["model"],
                        g.graph["modules"], g)


def check_graph(path: str | Path, build_weights: bool = True) -> CheckedGraph:
    """Parse, check and plan a graph file (no export): the passes :data:`passes.CHECK
    <streamgraph.compiler.passes.CHECK>`.

    With ``build_weights=False`` the model is built on the ``meta`` device: exact shapes and
    weight bytes for the plan, no weights read and no memory used (``streamgraph validate``).
    Raises :class:`SpecError`/:class:`GraphError` (located in the file), a located
    :class:`SpecError` for a plan over budget (at ``budget.memory_mb``, with the numbers) or a
    cache parameter the plan refuses (at that parameter), or a checkpoint error
    (``model.hf``)."""
    return _checked(passes.run_passes(passes.start(path, build_weights=build_weights), passes.CHECK))


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
    """Compile a graph file into a bundle at ``out_dir`` (default ``build/<name>``): the passes
    :data:`passes.PIPELINE <streamgraph.compiler.passes.PIPELINE>` (check and plan, then export
    and write the bundle into a temporary directory that is published).

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
    from streamgraph.models.build import build_model, weights_fingerprint

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r} (allowed: {', '.join(TARGETS)})")
    # plan on the meta device; a checkpoint's weights are read only if the bundle is rebuilt
    # (its lock key hashes the checkpoint files), a preset's random weights are cheap
    g = passes.run_passes(passes.start(path, target=target, progress=progress, key=key), passes.CHECK)
    spec, plan = g.graph["spec"], g.graph["plan"]
    if spec.model.hf is None:
        g.graph["model"] = build_model(spec)
    out = Path(out_dir) if out_dir is not None else Path("build") / spec.name
    tools = _tool_versions()
    wsha, ckpt_files = weights_fingerprint(spec, g.graph["model"])
    lkey = lock_key({"graph": spec.normalized(), "weights": wsha, "plan": plan.to_dict(),
                     "tools": tools, "target": target})
    g.graph.update(tools=tools, weights_sha256=wsha, checkpoint_files=ckpt_files, lock_key=lkey)
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
                    return CompileResult(existing, False, _checked(g))
            except BundleError:
                pass  # damaged, stale or of an older format: rebuild
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            g.graph["out"] = tmp
            passes.run_passes(g, passes.EMIT)
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CompileResult(Bundle.load(out, key=key), True, _checked(g))


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
