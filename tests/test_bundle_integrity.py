"""Bundle integrity: every tampering is refused with a one-line BundleError naming the file,
no file outside the bundle is opened, and concurrent compiles publish whole bundles only.

The tamperings come in two kinds: naive edits (a file or the manifest changed in place), and
consistent forgeries ("resealed": the manifest digest and, where it matters, the lock key
recomputed as anyone who can read docs/bundles.md can), which only the structural checks
(paths confined to the bundle, spec and plan re-validation, engine I/O against the plan) can
refuse. A forgery that changes weights and reseals is undetectable without a key; the keyed
mode (STREAMGRAPH_BUNDLE_KEY) is tested separately.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamgraph.errors import BundleError
from tests.conftest import REPO, write_graph

ENGINES = ("vision_encoder", "reducer_k16", "embed_tokens", "decoder_step")


# ------------------------------------------------------------------ recording every open
_OPENED: list[str] | None = None
_OPENED_LOCK = threading.Lock()


def _audit(event, args):
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.fsdecode(args[0])
        with _OPENED_LOCK:
            _OPENED.append(os.path.realpath(p))      # symlinks resolved now, while they exist


_HOOKED = False


class _Recording:
    """Records the resolved path of every file Python opens inside the block (an audit hook,
    installed on first use: hooks cannot be removed, so other tests never pay for it)."""

    def __enter__(self):
        global _OPENED, _HOOKED
        if not _HOOKED:
            sys.addaudithook(_audit)
            _HOOKED = True
        _OPENED = []
        return _OPENED

    def __exit__(self, *exc):
        global _OPENED
        _OPENED = None


def _within(p: str | Path, root: str | Path) -> bool:
    p, root = os.path.realpath(p), os.path.realpath(root)
    return p == root or p.startswith(root + os.sep)


# ------------------------------------------------------------------ tampering helpers
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _man(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _save(b: Path, m: dict, *, reseal: bool = False, relock: bool = False) -> None:
    """Write the manifest; ``relock`` recomputes the lock key from its parts and ``reseal``
    the manifest digest, both as documented in docs/bundles.md (a consistent forgery)."""
    if relock:
        m["lock_key"] = _sha(_canonical({"graph": m["graph"], "weights": m["model"]["weights_sha256"],
                                         "plan": m["plan"], "tools": m["tools"], "target": m["target"]}))
    if reseal:
        body = {k: v for k, v in m.items() if k != "integrity"}
        m["integrity"] = {"algorithm": "sha256", "digest": _sha(_canonical(body))}
    (b / "manifest.json").write_text(json.dumps(m, indent=2))


def _edit(fn, *, reseal=False, relock=False):
    def apply(b, out):
        m = _man(b)
        fn(m, b, out)
        _save(b, m, reseal=reseal, relock=relock)
    return apply


def _flip(rel):
    def apply(b, out):
        p = b / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    return apply


def _swap(b, out, x="engines/decoder_step.onnx", y="engines/embed_tokens.onnx"):
    dx, dy = (b / x).read_bytes(), (b / y).read_bytes()
    (b / x).write_bytes(dy)
    (b / y).write_bytes(dx)


def _swap_resealed(m, b, out):
    _swap(b, out)
    f = m["files"]
    f["engines/decoder_step.onnx"], f["engines/embed_tokens.onnx"] = (f["engines/embed_tokens.onnx"],
                                                                       f["engines/decoder_step.onnx"])


def _outside_copy(b, out, rel, name=None) -> Path:
    """A valid copy of a bundle file outside the bundle (loading it would succeed)."""
    dst = out / (name or Path(rel).name)
    shutil.copyfile(b / rel, dst)
    return dst


def _engine_path(path_of):
    """Point decoder_step's plan entry (and its files entry) at another path."""
    def fn(m, b, out):
        src = _outside_copy(b, out, "engines/decoder_step.onnx")
        new = path_of(b, src)
        m["plan"]["engines"]["decoder_step"]["file"] = new
        m["files"][new] = m["files"].pop("engines/decoder_step.onnx")
        (b / "engines/decoder_step.onnx").unlink()
    return fn


def _prompt_path(key, rel, path_of):
    def fn(m, b, out):
        src = _outside_copy(b, out, rel)
        new = path_of(b, src)
        m["prompt"][key] = new
        m["files"][new] = m["files"].pop(rel, None) or _sha(src.read_bytes())
    return fn


def _video_end_outside(m, b, out):
    np.save(out / "x.npy", np.zeros(64, np.float32))
    m["prompt"]["video_end_embedding"] = "../outside/x.npy"
    m["files"]["../outside/x.npy"] = _sha((out / "x.npy").read_bytes())


def _symlink(rel, target_rel=None):
    def apply(b, out):
        src = _outside_copy(b, out, rel)
        (b / rel).unlink()
        (b / rel).symlink_to(src)
    return apply


def _symlink_engines_dir(b, out):
    shutil.copytree(b / "engines", out / "engines")
    shutil.rmtree(b / "engines")
    (b / "engines").symlink_to(out / "engines", target_is_directory=True)


def _symlink_manifest(b, out):
    _outside_copy(b, out, "manifest.json")
    (b / "manifest.json").unlink()
    (b / "manifest.json").symlink_to(out / "manifest.json")


def _extra_symlink(b, out):
    (b / "engines" / "extra.onnx").symlink_to(_outside_copy(b, out, "engines/decoder_step.onnx"))


def _fifo(b, out):
    (b / "engines/decoder_step.onnx").unlink()
    os.mkfifo(b / "engines/decoder_step.onnx")


def _dir_instead(b, out):
    (b / "engines/decoder_step.onnx").unlink()
    (b / "engines/decoder_step.onnx").mkdir()


def _write_raw(data: bytes):
    def apply(b, out):
        (b / "manifest.json").write_bytes(data)
    return apply


def _truncate_manifest(b, out):
    p = b / "manifest.json"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage_engine_resealed(m, b, out):
    data = os.urandom(4096)
    (b / "engines/decoder_step.onnx").write_bytes(data)
    m["files"]["engines/decoder_step.onnx"] = _sha(data)


def _external_data_outside(m, b, out):
    """decoder_step's largest weight moved to a file outside the bundle, referenced from the
    ONNX file as external data (the engine's hash updated: a consistent forgery)."""
    import onnx

    eng = b / "engines/decoder_step.onnx"
    model = onnx.load(str(eng), load_external_data=False)
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (out / "w.bin").write_bytes(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", str(out / "w.bin")), ("offset", "0"), ("length", str((out / "w.bin").stat().st_size))):
        e = t.external_data.add()
        e.key, e.value = k, v
    eng.write_bytes(model.SerializeToString())
    m["files"]["engines/decoder_step.onnx"] = _sha(eng.read_bytes())


def _set(path, value):
    def fn(m, b, out):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return fn


def _delete(path):
    def fn(m, b, out):
        d = m
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return fn


def _slo(**kw):
    def fn(m, b, out):
        m["graph"]["slo"].update(kw)
        m["slo"].update(kw)
    return fn


def _shape(m, b, out):
    m["plan"]["engines"]["decoder_step"]["inputs"][0]["shape"][2] += 1


def _hash(m, b, out):
    m["files"]["engines/decoder_step.onnx"] = "0" * 64


def _nan_deadline(b, out):
    m = _man(b)
    m["slo"]["frame_deadline_ms"] = m["graph"]["slo"]["frame_deadline_ms"] = float("nan")
    _save(b, m, reseal=True, relock=True)                # json writes the NaN token


def _abs_path(b, src):
    return str(src)


def _dotdot(b, src):
    return f"../outside/{src.name}"


# (id, tampering, a regex the one-line error must match: the file it names)
CASES = [
    *[(f"flip-{e}", _flip(f"engines/{e}.onnx"), rf"engines/{e}\.onnx") for e in ENGINES],
    ("flip-tokenizer", _flip("tokenizer.json"), r"tokenizer\.json"),
    ("flip-weights", _flip("weights.safetensors"), r"weights\.safetensors"),
    ("truncate-engine", lambda b, o: (b / "engines/decoder_step.onnx").write_bytes(
        (b / "engines/decoder_step.onnx").read_bytes()[:100]), r"decoder_step\.onnx"),
    ("empty-engine", lambda b, o: (b / "engines/vision_encoder.onnx").write_bytes(b""), r"vision_encoder\.onnx"),
    ("delete-engine", lambda b, o: (b / "engines/embed_tokens.onnx").unlink(), r"embed_tokens\.onnx.*missing"),
    ("delete-tokenizer", lambda b, o: (b / "tokenizer.json").unlink(), r"tokenizer\.json.*missing"),
    ("extra-engine", lambda b, o: shutil.copyfile(b / "engines/decoder_step.onnx", b / "engines/extra.onnx"),
     r"engines/extra\.onnx.*not named in the manifest"),
    ("extra-nested", lambda b, o: ((b / "engines/sub").mkdir(), (b / "engines/sub/x.onnx").write_bytes(b"x")),
     r"engines/sub/x\.onnx.*not named in the manifest"),
    ("extra-top-level", lambda b, o: (b / "notes.txt").write_text("hi"), r"notes\.txt.*not named"),
    ("extra-symlink-out", _extra_symlink, r"engines/extra\.onnx"),
    ("swap-engines", _swap, r"engines/(decoder_step|embed_tokens)\.onnx"),
    ("swap-engines-resealed", _edit(_swap_resealed, reseal=True), r"engines/(decoder_step|embed_tokens)\.onnx"),
    ("garbage-engine-resealed", _edit(_garbage_engine_resealed, reseal=True), r"engines/decoder_step\.onnx"),
    ("external-data-outside-resealed", _edit(_external_data_outside, reseal=True), r"engines/decoder_step\.onnx"),
    ("engine-is-fifo", _fifo, r"engines/decoder_step\.onnx.*not a regular file"),
    ("engine-is-dir", _dir_instead, r"engines/decoder_step\.onnx.*not a regular file"),
    # naive manifest edits: the manifest digest no longer matches
    ("edit-shape", _edit(_shape), r"manifest\.json.*digest"),
    ("edit-hash", _edit(_hash), r"manifest\.json.*digest"),
    ("edit-lock-key", _edit(_set(["lock_key"], "0" * 64)), r"manifest\.json.*digest"),
    ("remove-files", _edit(_delete(["files"])), r"manifest\.json.*digest"),
    ("edit-deadline", _edit(_slo(frame_deadline_ms=-5)), r"manifest\.json.*digest"),
    ("remove-integrity", _edit(_delete(["integrity"])), r"manifest\.json.*integrity"),
    ("edit-digest", _edit(_set(["integrity", "digest"], "f" * 64)), r"manifest\.json.*digest"),
    ("integrity-algorithm", _edit(_set(["integrity", "algorithm"], "md5")), r"manifest\.json.*integrity"),
    # consistent forgeries: refused by the structural checks
    ("remove-files-resealed", _edit(_delete(["files"]), reseal=True), r"manifest\.json.*files"),
    ("empty-files-resealed", _edit(_set(["files"], {}), reseal=True), r"manifest\.json.*files"),
    ("files-wrong-type-resealed", _edit(_set(["files"], ["engines/decoder_step.onnx"]), reseal=True),
     r"manifest\.json.*files"),
    ("edit-shape-resealed", _edit(_shape, reseal=True, relock=True), r"engines/decoder_step\.onnx.*plan"),
    ("edit-hash-resealed", _edit(_hash, reseal=True), r"engines/decoder_step\.onnx.*sha256"),
    ("edit-lock-key-resealed", _edit(_set(["lock_key"], "0" * 64), reseal=True), r"manifest\.json.*lock key"),
    ("deadline-negative-resealed", _edit(_slo(frame_deadline_ms=-5), reseal=True, relock=True),
     r"manifest\.json.*slo\.frame_deadline_ms"),
    ("deadline-nan-resealed", _nan_deadline, r"manifest\.json"),
    ("ttft-zero-resealed", _edit(_slo(ttft_ms=0), reseal=True, relock=True), r"manifest\.json.*slo\.ttft_ms"),
    ("overload-unknown-resealed", _edit(_slo(overload="bogus"), reseal=True, relock=True),
     r"manifest\.json.*slo\.overload"),
    ("slo-differs-from-graph-resealed", _edit(_set(["slo", "frame_deadline_ms"], 1e6), reseal=True),
     r"manifest\.json.*slo"),
    ("stream-fps-zero-resealed", _edit(_set(["stream", "fps"], 0), reseal=True), r"manifest\.json.*stream"),
    ("abs-engine-path", _edit(_engine_path(_abs_path), reseal=True, relock=True), r"manifest\.json.*absolute"),
    ("dotdot-engine-path", _edit(_engine_path(_dotdot), reseal=True, relock=True), r"manifest\.json.*'\.\.'"),
    ("abs-tokenizer-path", _edit(_prompt_path("tokenizer", "tokenizer.json", _abs_path), reseal=True),
     r"manifest\.json.*absolute"),
    ("dotdot-tokenizer-path", _edit(_prompt_path("tokenizer", "tokenizer.json", _dotdot), reseal=True),
     r"manifest\.json.*'\.\.'"),
    ("dotdot-video-end", _edit(_video_end_outside, reseal=True), r"manifest\.json.*'\.\.'"),
    ("unlisted-engine-resealed", _edit(_set(["plan", "engines", "decoder_step", "file"], "engines/ghost.onnx"),
                                       reseal=True, relock=True), r"engines/ghost\.onnx.*not listed"),
    ("files-lists-manifest-resealed", _edit(_set(["files", "manifest.json"], "0" * 64), reseal=True),
     r"manifest\.json"),
    ("files-empty-name-resealed", _edit(_set(["files", ""], "0" * 64), reseal=True), r"manifest\.json.*files"),
    ("files-backslash-resealed", _edit(_set(["files", "engines\\x.onnx"], "0" * 64), reseal=True),
     r"manifest\.json.*files"),
    ("symlink-engine-out", _symlink("engines/decoder_step.onnx"), r"engines/decoder_step\.onnx.*outside"),
    ("symlink-tokenizer-out", _symlink("tokenizer.json"), r"tokenizer\.json.*outside"),
    ("symlink-engines-dir-out", _symlink_engines_dir, r"engines.*outside"),
    ("symlink-manifest-out", _symlink_manifest, r"manifest\.json.*outside"),
    ("manifest-missing", lambda b, o: (b / "manifest.json").unlink(), r"manifest\.json.*missing"),
    ("manifest-truncated", _truncate_manifest, r"manifest\.json.*JSON"),
    ("manifest-empty", _write_raw(b""), r"manifest\.json.*JSON"),
    ("manifest-not-json", _write_raw(b"\x00\x01garbage"), r"manifest\.json"),
    ("manifest-not-utf8", _write_raw(b'{"format": "\xff\xfe"}'), r"manifest\.json.*UTF-8"),
    ("manifest-array", _write_raw(b"[1, 2, 3]"), r"manifest\.json.*object"),
    ("plan-wrong-type-resealed", _edit(_set(["plan"], "x"), reseal=True, relock=True), r"manifest\.json.*plan"),
    ("kv-shape-strings-resealed", _edit(_set(["plan", "kv", "shape"], ["a", "b"]), reseal=True, relock=True),
     r"manifest\.json.*plan\.kv"),
    ("kv-bytes-wrong-resealed", _edit(_set(["plan", "kv", "bytes"], 1), reseal=True, relock=True),
     r"manifest\.json.*plan\.kv"),
    ("prompt-missing-resealed", _edit(_delete(["prompt"]), reseal=True), r"manifest\.json.*prompt"),
    ("stop-ids-wrong-type-resealed", _edit(_set(["prompt", "stop_token_ids"], "x"), reseal=True),
     r"manifest\.json.*prompt\.stop_token_ids"),
    ("unknown-key-resealed", _edit(_set(["surprise"], 1), reseal=True), r"manifest\.json.*surprise"),
    ("format-missing", _edit(_delete(["format"]), reseal=True), r"manifest\.json.*format"),
    ("format-old", _edit(_set(["format"], 1), reseal=True), r"manifest\.json.*recompile"),
    ("format-string", _edit(_set(["format"], "2"), reseal=True), r"manifest\.json.*format"),
]


@pytest.fixture
def tampered_env(onnx_bundle, tmp_path):
    """A private copy of the compiled bundle and a sibling directory ``outside``."""
    b = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, b)
    out = tmp_path / "outside"
    out.mkdir()
    return b, out


def test_pristine_copy_opens_and_the_audit_hook_sees_every_file(tampered_env):
    from streamgraph.runtime.session import Session

    b, _ = tampered_env
    with _Recording() as opened:
        Session.open(b, "onnxruntime")
    listed = {os.path.realpath(b / f) for f in _man(b)["files"]}
    assert listed and listed <= set(opened)           # the hook records the opens we check below


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tampering_is_refused_without_opening_outside_files(case, tampered_env, tmp_path):
    from streamgraph.runtime.session import Session

    name, tamper, names_file = case
    b, out = tampered_env
    tamper(b, out)
    with _Recording() as opened:
        with pytest.raises(BundleError) as err:
            Session.open(b, "onnxruntime")
    msg = str(err.value)
    assert "\n" not in msg and str(b) in msg, msg
    assert __import__("re").search(names_file, msg), msg
    # nothing under tmp_path outside the bundle (the ``outside`` copies in particular) was opened
    leaked = [p for p in opened if _within(p, tmp_path) and not _within(p, b)]
    assert not leaked, leaked


def test_bundle_checks_fail_before_any_listed_file_is_opened(tampered_env):
    """Paths are checked before any file is opened: a `..` path late in the manifest stops the
    load before the first engine is hashed."""
    from streamgraph.compiler.bundle import Bundle

    b, out = tampered_env
    _edit(_prompt_path("tokenizer", "tokenizer.json", _dotdot), reseal=True)(b, out)
    with _Recording() as opened:
        with pytest.raises(BundleError):
            Bundle.load(b)
    files_opened = [p for p in opened if _within(p, b) and not os.path.isdir(p)]   # (the dir: its lock)
    assert files_opened == [os.path.realpath(b / "manifest.json")]


# ------------------------------------------------------------------ CLI: rc 1, one line, strace
def _cli(args, strace_log=None):
    cmd = [sys.executable, "-m", "streamgraph.cli", *args]
    if strace_log is not None:
        cmd = ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(strace_log), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    try:
        return subprocess.run(["strace", "-qq", "-e", "trace=openat", "true"], capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.parametrize("command,case", [("run", "symlink-engine-out"), ("inspect", "abs-engine-path"),
                                          ("inspect", "remove-files-resealed"),
                                          ("run", "external-data-outside-resealed")])
def test_cli_refuses_with_rc1_one_line_and_opens_nothing_outside(command, case, tampered_env, tmp_path):
    b, out = tampered_env
    dict((c[0], c[1]) for c in CASES)[case](b, out)
    log = tmp_path / "strace.log" if _strace_works() else None
    r = _cli([command, str(b)], strace_log=log)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(b) in lines[0], r.stderr
    if log is not None:     # every open(2) of the process tree, C++ and Rust included
        import re

        opened = re.findall(r'open(?:at2?)?\((?:AT_FDCWD, |\d+, )?"([^"]*)"', log.read_text())
        assert any(_within(p, b) for p in opened)
        assert not [p for p in opened if _within(p, out)]


# ------------------------------------------------------------------ keyed mode
def test_keyed_bundle_refuses_a_resealed_forgery(tmp_path, monkeypatch):
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.compiler.compile import compile_graph

    g = write_graph(tmp_path, name="keyed")
    monkeypatch.setenv("STREAMGRAPH_BUNDLE_KEY", "s3cret")
    b = compile_graph(g, tmp_path / "b", target="torch").bundle.path
    assert _man(b)["integrity"]["algorithm"] == "hmac-sha256"
    Bundle.load(b)
    # a forger without the key: flip the weights, fix their hash, reseal with a plain digest
    m = _man(b)
    w = bytearray((b / "weights.safetensors").read_bytes())
    w[-1] ^= 1
    (b / "weights.safetensors").write_bytes(bytes(w))
    m["files"]["weights.safetensors"] = _sha(bytes(w))
    body = {k: v for k, v in m.items() if k != "integrity"}
    m["integrity"] = {"algorithm": "hmac-sha256", "digest": _sha(_canonical(body))}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json.*HMAC"):
        Bundle.load(b)
    m["integrity"]["algorithm"] = "sha256"           # downgrade to a plain digest
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json.*not signed"):
        Bundle.load(b)
    Bundle.load(b, key=b"")                          # explicitly unkeyed: the plain digest holds
    monkeypatch.delenv("STREAMGRAPH_BUNDLE_KEY")
    with pytest.raises(BundleError, match="manifest.json.*STREAMGRAPH_BUNDLE_KEY"):
        Bundle.load(compile_graph(g, tmp_path / "c", target="torch", key=b"k").bundle.path)


def test_old_format_bundle_says_recompile_and_compile_rebuilds_it(tmp_path):
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.compiler.compile import compile_graph

    g = write_graph(tmp_path, name="old")
    b = compile_graph(g, tmp_path / "b", target="torch").bundle.path
    m = _man(b)
    m["format"] = 1
    del m["integrity"]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"format 1 .*recompile"):
        Bundle.load(b)
    assert compile_graph(g, b, target="torch").rebuilt
    Bundle.load(b)


def test_compile_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path):
    from streamgraph.compiler.compile import compile_graph

    g = write_graph(tmp_path, name="precious")
    out = tmp_path / "docs"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(BundleError, match=r"docs.*not a bundle"):
        compile_graph(g, out, target="torch")
    assert (out / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------ concurrent compiles and readers
def _compile_rounds(graph, out, rounds, force, ready, go, slow_s):
    """One compiler process: signal ready, wait for the start flag, compile ``rounds`` times,
    each taking at least ``slow_s`` longer (writing the weights sleeps first, as a real
    export takes a while), so that concurrent compiles overlap."""
    import streamgraph.models.build as build
    from streamgraph.compiler.compile import compile_graph

    save = build.save_weights

    def slow_save(*a, **kw):
        time.sleep(slow_s)
        return save(*a, **kw)

    build.save_weights = slow_save

    Path(ready).touch()
    while not os.path.exists(go):
        time.sleep(0.002)
    return sum(compile_graph(graph, out, target="torch", force=force).rebuilt for _ in range(rounds))


def _compilers(tmp_path, graphs, out, rounds, force, slow_s):
    """One compiler process per graph, forked from a forkserver that imported the compiler once (a
    fresh interpreter per process would spend seconds importing torch), started together."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.test_bundle_integrity", "streamgraph.compiler.compile",
                                "streamgraph.compiler.graph", "streamgraph.compiler.lower", "streamgraph.models.build",
                                "streamgraph.models.tokenizer", "streamgraph.reducers", "onnx", "onnxscript", "networkx",
                                "sympy", "torch._dynamo"])
    pool = ProcessPoolExecutor(len(graphs), mp_context=ctx)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(len(graphs))]
    futures = [pool.submit(_compile_rounds, str(g), str(out), rounds, force, str(r), str(go), slow_s)
               for g, r in zip(graphs, ready)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    return pool, futures


def _finish(pool, futures):
    try:
        return [f.result(timeout=300) for f in futures]
    finally:
        pool.shutdown()


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name not in (out.name, f".{out.name}.lock"))


def test_concurrent_compiles_serialize_and_readers_see_whole_bundles(tmp_path, monkeypatch):
    """Two processes rebuild one output directory over and over, each from its own graph
    (different weights, so the two bundles differ in every file), while this process keeps
    opening it: every open after the first publish succeeds and sees one whole bundle (its
    hash verification passes: a manifest of one with a file of the other would not), no
    compile fails, nothing is left beside it. The reader hashes slowly (10 ms per file, as
    on a slow disk), so publishes land in the middle of its loads."""
    import streamgraph.compiler.bundle as bundle_mod
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.runtime.session import Session

    fast_sha = bundle_mod.sha256_file

    def slow_sha(path, *a, **kw):
        time.sleep(0.01)
        return fast_sha(path, *a, **kw)

    monkeypatch.setattr(bundle_mod, "sha256_file", slow_sha)
    import streamgraph.backends.torch  # noqa: F401  (import torch now, not during the race)
    import streamgraph.models.build  # noqa: F401

    graphs = [write_graph(tmp_path / d, name="race", seed=i) for i, d in enumerate(("a", "b"))
              if (tmp_path / d).mkdir() is None]
    out = tmp_path / "build" / "race"
    out.parent.mkdir()
    pool, futures = _compilers(tmp_path, graphs, out, rounds=8, force=True, slow_s=0.05)
    opened, sessions, errors = 0, 0, []
    while not all(f.done() for f in futures):
        if not (out / "manifest.json").exists():
            time.sleep(0.001)
            continue
        try:
            if opened % 8 == 7 and sessions < 2:     # a whole Session.open (slow: builds a model)
                Session.open(out, "torch")
                sessions += 1
            else:
                Bundle.load(out)
            opened += 1
        except BundleError as e:
            errors.append(str(e))
        time.sleep(0.002)
    assert _finish(pool, futures) == [8, 8]
    assert not errors, (len(errors), opened, errors[:2])
    assert opened >= 5
    assert _leftovers(out) == []
    Bundle.load(out)


def test_concurrent_identical_compiles_build_once(tmp_path):
    g = write_graph(tmp_path, name="once")
    out = tmp_path / "build" / "once"
    out.parent.mkdir()
    pool, futures = _compilers(tmp_path, [g] * 3, out, rounds=1, force=False, slow_s=1.0)
    assert sorted(_finish(pool, futures)) == [0, 0, 1]   # the lock serializes; the others reuse it
    assert _leftovers(out) == []
