"""Bundle: ``build/<name>/manifest.json`` + ``engines/*.onnx`` + tokenizer (+ reference weights).

The manifest holds the normalized graph, the plan, the sha256 of every file, a lock key (hash
of graph, weights, shapes, opset, tool versions, target: a rebuild happens when, and only
when, one of them changed) and a digest of the manifest itself (``integrity``), so that the
manifest and every file it names form one hash chain. Loading re-checks everything before a
single listed file is opened: the digest, the manifest's structure, the spec sections with
the graph's own pydantic models, the plan, the lock key, and that every path is relative and
resolves inside the bundle to a regular file; then the files' hashes. Any failure is a
one-line :class:`~streamgraph.errors.BundleError` naming the file. See docs/bundles.md for
the format and its threat model (a plain digest detects corruption and naive edits; only the
keyed HMAC mode, ``STREAMGRAPH_BUNDLE_KEY``, is tamper-evident).

Concurrency: readers hold a shared ``flock`` on the bundle directory while they load it
(:func:`open_bundle`); ``compile`` publishes a new bundle by atomically exchanging directories
under the exclusive lock (``streamgraph.compiler.compile``). This module is torch-free: the
runtime loads bundles with it.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamgraph.compiler.plan import Plan
from streamgraph.contract import DECODER_STEP, DTYPES, EMBED_TOKENS, VISION_ENCODER
from streamgraph.errors import BundleError

try:  # POSIX advisory locks; without them (Windows) bundles are read and published unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MANIFEST = "manifest.json"
#: 2: the manifest carries ``integrity`` (its own digest) and is re-validated on load.
FORMAT_VERSION = 3
#: Environment variable holding the HMAC key of keyed bundles (compile signs, load verifies).
KEY_ENV = "STREAMGRAPH_BUNDLE_KEY"
#: Directories inside a bundle that are caches of a backend, not part of the hashed bundle.
CACHE_DIRS = ("trt",)
MAX_MANIFEST_BYTES = 64 << 20
_HEX64 = r"^[0-9a-f]{64}$"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def lock_key(parts: dict) -> str:
    """sha256 of the canonical JSON of ``parts`` (graph, weights hash, shapes, opset, tools,
    target)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def bundle_key(key: bytes | str | None = None) -> bytes | None:
    """The HMAC key to sign/verify with: ``key`` if given (an empty key means "unkeyed",
    whatever the environment says), else ``$STREAMGRAPH_BUNDLE_KEY`` (UTF-8), else None."""
    if key is None:
        key = os.environ.get(KEY_ENV) or None
    if isinstance(key, str):
        key = key.encode()
    return key or None


def _canonical(manifest: dict) -> bytes:
    """The bytes the integrity digest covers: every key but ``integrity``, as canonical JSON
    (sorted keys, no whitespace, ASCII, no NaN)."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def seal(manifest: dict, key: bytes | str | None = None) -> dict:
    """Set ``manifest['integrity']``: HMAC-SHA256 of the canonical manifest with the bundle key
    (:func:`bundle_key`), or its plain SHA-256 when there is none. Returns ``manifest``."""
    k, body = bundle_key(key), _canonical(manifest)
    if k is not None:
        manifest["integrity"] = {"algorithm": "hmac-sha256",
                                 "digest": hmac.new(k, body, hashlib.sha256).hexdigest()}
    else:
        manifest["integrity"] = {"algorithm": "sha256", "digest": hashlib.sha256(body).hexdigest()}
    return manifest


# ------------------------------------------------------------------ manifest schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Integrity(_Strict):
    algorithm: Literal["sha256", "hmac-sha256"]
    digest: str = Field(pattern=_HEX64)


class _Checkpoint(_Strict):
    path: str
    files: dict[str, str]


class _Model(_Strict):
    config: dict
    weights_sha256: str = Field(pattern=_HEX64)
    source: dict
    checkpoint: _Checkpoint | None = None


class _Prompt(_Strict):
    system: str | None = None
    tokenizer: str
    format: dict[str, str] | None = None
    stop_token_ids: list[int] | None = None
    video_end_embedding: str | None = None
    video_token: str | None = None
    video_token_id: int | None = None
    chat_template_file: str | None = None


class _Manifest(_Strict):
    format: int
    name: str
    lock_key: str = Field(pattern=_HEX64)
    graph: dict
    source: str
    model: _Model
    plan: dict
    prompt: _Prompt
    slo: dict
    stream: dict
    tools: dict[str, str | int]
    target: Literal["onnx", "torch"]
    files: dict[str, str] = Field(min_length=1)
    integrity: _Integrity


def _first_error(e: ValidationError, prefix: str = "") -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc or prefix or 'manifest'}: {first['msg']}{more}"


# ------------------------------------------------------------------ locking
class DirLock:
    """An advisory ``flock`` on a directory, taken on the directory that ``path`` names when
    the lock is granted (retried if ``path`` was swapped meanwhile). Shared for readers,
    exclusive for the compile that replaces the directory. A no-op where the filesystem or
    the platform has no ``flock``, and when ``path`` is not a directory."""

    def __init__(self, path: str | Path, exclusive: bool = False):
        self.path = Path(path)
        self.exclusive = exclusive
        self.fd: int | None = None

    def __enter__(self) -> "DirLock":
        if fcntl is None:
            return self
        for _ in range(1000):
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                return self          # missing or not a directory: the loader reports it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
            except OSError:          # no flock here (some network filesystems): unlocked
                os.close(fd)
                return self
            held, now = os.fstat(fd), None
            try:
                now = os.stat(self.path)
            except OSError:
                pass
            if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                self.fd = fd
                return self
            os.close(fd)             # replaced while we waited: lock the new one
        raise BundleError(f"{self.path}: the bundle kept being replaced while waiting to read it")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)        # releases the flock
            self.fd = None


class FileLock:
    """An exclusive ``flock`` on a lock file (created if missing, never deleted: deleting a
    lock file races with the next locker)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def __enter__(self) -> "FileLock":
        if fcntl is None:
            return self
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as e:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                return self
            raise BundleError(f"{self.path}: cannot take the compile lock: {e.strerror or e}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------ loading
class Bundle:
    """A compiled, verified bundle on disk. Use :meth:`load` or :func:`open_bundle`.

    ``path`` is the bundle directory as given; ``root`` the same directory with every
    symlink resolved; :meth:`file` is the only way to a file of the bundle."""

    def __init__(self, path: Path, manifest: dict, plan: Plan | None = None, root: Path | None = None,
                 files: dict[str, Path] | None = None):
        self.path = Path(path)
        self.root = root or self.path.resolve()
        self.manifest = manifest
        self.plan = plan if plan is not None else Plan.from_dict(manifest["plan"])
        self._files = files

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def lock_key(self) -> str:
        return self.manifest["lock_key"]

    def file(self, rel: str) -> Path:
        """Absolute path of the bundle file ``rel`` (a key of the manifest's ``files``), as
        verified at load. Raises BundleError for a name the manifest does not list."""
        files = self._files if self._files is not None else {}
        if rel not in files:
            raise BundleError(f"{self.path / str(rel)}: not listed in the manifest's files")
        return files[rel]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, key: bytes | str | None = None) -> "Bundle":
        """Read ``path/manifest.json``, check it and (``verify``) every file's sha256.

        ``key``: HMAC key of a keyed bundle (default ``$STREAMGRAPH_BUNDLE_KEY``; see
        :func:`bundle_key`). Raises :class:`BundleError`, one line naming the file, if the
        directory or manifest is missing or malformed, the manifest digest/HMAC does not match,
        a value fails the spec's validation, a path is absolute, contains ``..`` or resolves
        outside the bundle, a file is missing, not a regular file, not listed, or its hash does
        not match. Holds a shared lock on the directory while reading (see :func:`open_bundle`
        to keep it while opening engines)."""
        with open_bundle(path, verify=verify, key=key) as bundle:
            return bundle


@contextmanager
def open_bundle(path: str | Path, *, verify: bool = True, key: bytes | str | None = None) -> Iterator[Bundle]:
    """Load and verify the bundle at ``path`` (:meth:`Bundle.load`) and keep a shared lock on
    its directory until the block exits, so that a concurrent ``compile`` cannot replace the
    bundle while the caller opens its engines (it waits for the block to end)."""
    with DirLock(path, exclusive=False):
        yield _read(Path(path), verify, bundle_key(key))


def _read(path: Path, verify: bool, key: bytes | None) -> Bundle:
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory (run `streamgraph compile` first)")
    root = path.resolve()
    mpath = path / MANIFEST
    manifest = _read_manifest(root, mpath)
    _check_integrity(manifest, mpath, key)
    plan = _check_values(manifest, path, mpath)
    files = _check_paths(manifest, plan, root, path, mpath)
    if verify:
        for rel, real in files.items():
            try:
                digest = sha256_file(real)
            except OSError as e:
                raise BundleError(f"{path / rel}: unreadable: {e.strerror or e}") from None
            if digest != manifest["files"][rel]:
                raise BundleError(f"{path / rel}: sha256 does not match the manifest; the bundle was "
                                  f"modified or corrupted — recompile it")
    return Bundle(path, manifest, plan, root, files)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _read_manifest(root: Path, mpath: Path) -> dict:
    real = Path(os.path.realpath(mpath))
    if not os.path.lexists(mpath):
        raise BundleError(f"{mpath}: manifest missing; not a compiled bundle")
    if not _inside(real, root):
        raise BundleError(f"{mpath}: resolves to {real}, outside the bundle {root}")
    st = _stat(real, mpath)
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{mpath}: not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: {st.st_size} bytes, larger than any manifest ({MAX_MANIFEST_BYTES})")
    try:
        raw = real.read_bytes()
    except OSError as e:
        raise BundleError(f"{mpath}: unreadable manifest: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{mpath}: not UTF-8 (byte {e.start}); not a manifest") from None
    try:
        manifest = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{mpath}: not valid JSON: {_one_line(str(e))}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt is None:
        raise BundleError(f"{mpath}: no 'format' field; not a streamgraph bundle manifest")
    if type(fmt) is not int:
        raise BundleError(f"{mpath}: format must be an integer, got {fmt!r}")
    if fmt < FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format {fmt} is from an older streamgraph (this one reads "
                          f"format {FORMAT_VERSION}); recompile it")
    if fmt > FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format {fmt} is newer than this streamgraph reads "
                          f"({FORMAT_VERSION}); upgrade streamgraph or recompile the bundle")
    return manifest


def _check_integrity(manifest: dict, mpath: Path, key: bytes | None) -> None:
    integrity = manifest.get("integrity")
    try:
        _Integrity.model_validate(integrity)
    except ValidationError as e:
        raise BundleError(f"{mpath}: {_first_error(e, 'integrity')}; the manifest's own digest is "
                          f"missing or malformed — recompile the bundle") from None
    try:
        body = _canonical(manifest)
    except ValueError as e:
        raise BundleError(f"{mpath}: not canonical JSON: {e}") from None
    algorithm, digest = integrity["algorithm"], integrity["digest"]
    if algorithm == "hmac-sha256":
        if key is None:
            raise BundleError(f"{mpath}: bundle is signed (HMAC-SHA256); set {KEY_ENV} to the key it "
                              f"was compiled with to open it")
        if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).hexdigest(), digest):
            raise BundleError(f"{mpath}: manifest HMAC does not match: the bundle was modified or "
                              f"signed with another key")
        return
    if key is not None:
        raise BundleError(f"{mpath}: bundle is not signed, but a bundle key is set ({KEY_ENV}); "
                          f"recompile it with the key")
    if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), digest):
        raise BundleError(f"{mpath}: manifest digest does not match its contents; the manifest was "
                          f"edited or corrupted — recompile the bundle")


def _check_values(manifest: dict, path: Path, mpath: Path) -> Plan:
    """Structure of the manifest, the spec sections with the graph's models, the plan, the
    lock key. Returns the plan."""
    from pydantic import TypeAdapter

    from streamgraph.compiler.spec import GraphSpec, SLOSpec, StreamSpec

    try:
        _Manifest.model_validate(manifest)
    except ValidationError as e:
        raise BundleError(f"{mpath}: {_first_error(e)}") from None
    graph = _validated(GraphSpec, manifest["graph"], "graph", mpath)
    if graph.name != manifest["name"]:
        raise BundleError(f"{mpath}: name {manifest['name']!r} differs from graph.name {graph.name!r}")
    if graph.normalized() != manifest["graph"]:
        raise BundleError(f"{mpath}: graph: not in normalized form (defaults or key order differ)")
    for section, model in (("slo", SLOSpec), ("stream", StreamSpec)):
        value = _validated(model, manifest[section], section, mpath)
        if value.model_dump(mode="json") != getattr(graph, section).model_dump(mode="json"):
            raise BundleError(f"{mpath}: {section}: differs from graph.{section}")
    try:
        plan = TypeAdapter(Plan).validate_json(json.dumps(manifest["plan"]), strict=True)
    except ValidationError as e:
        raise BundleError(f"{mpath}: {_first_error(e, 'plan')}") from None
    if plan.to_dict() != manifest["plan"]:
        raise BundleError(f"{mpath}: plan: unknown or malformed fields")
    problem = _plan_problem(plan)
    if problem:
        raise BundleError(f"{mpath}: plan{problem}")
    try:
        from streamgraph.models.config import VLMConfig

        VLMConfig.from_dict(manifest["model"]["config"])
    except Exception as e:  # any malformed config (KeyError, TypeError, ...): one line
        raise BundleError(f"{mpath}: model.config: malformed ({type(e).__name__}: {_one_line(str(e))})") from None
    expect = lock_key({"graph": manifest["graph"], "weights": manifest["model"]["weights_sha256"],
                       "plan": manifest["plan"], "tools": manifest["tools"], "target": manifest["target"]})
    if expect != manifest["lock_key"]:
        raise BundleError(f"{mpath}: lock key does not match the graph, weights, plan, tools and target "
                          f"it is the hash of — recompile the bundle")
    return plan


def _validated(model, value, section: str, mpath: Path):
    try:
        return model.model_validate_json(json.dumps(value, allow_nan=False), strict=True)
    except ValidationError as e:
        raise BundleError(f"{mpath}: {_first_error(e, section)}") from None


def _positive_int(x: Any) -> bool:
    return type(x) is int and x > 0


def _plan_problem(plan: Plan) -> str | None:
    """``.field: message`` of the first impossible value of a plan, else None."""
    if not _positive_int(plan.batch):
        return f".batch: must be a positive integer, got {plan.batch!r}"
    kv = plan.kv
    if kv.dtype not in DTYPES or len(kv.shape) != 6 or not all(map(_positive_int, kv.shape)):
        return f".kv: shape must be 6 positive integers and dtype one of {sorted(DTYPES)}"
    if kv.bytes != math.prod(kv.shape) * DTYPES[kv.dtype].bytes:
        return f".kv.bytes: {kv.bytes} is not the size of a {kv.dtype} buffer of shape {kv.shape}"
    for name in (VISION_ENCODER, EMBED_TOKENS, DECODER_STEP):
        if name not in plan.engines:
            return f".engines: no {name!r} engine"
    for name, e in plan.engines.items():
        if e.name != name:
            return f".engines.{name}.name: is {e.name!r}"
        for io in e.inputs + e.outputs:
            if io.dtype not in DTYPES or not all(d == "T" or _positive_int(d) for d in io.shape):
                return (f".engines.{name}: tensor {io.name!r}: dtype must be one of {sorted(DTYPES)} "
                        f"and each dim a positive integer or 'T'")
        for dim, rng in e.dims.items():
            if len(rng) != 2 or not all(map(_positive_int, rng)) or rng[0] > rng[1]:
                return f".engines.{name}.dims.{dim}: must be [min, max] positive integers"
    if not all(map(_positive_int, plan.budgets)):
        return ".budgets: must be positive integers"
    if len(plan.image_size) != 2 or not all(map(_positive_int, plan.image_size)):
        return ".image_size: must be two positive integers"
    return None


def _referenced(manifest: dict, plan: Plan) -> list[tuple[str, str]]:
    """(field, path) of every bundle file the manifest's values point at."""
    refs = []
    if manifest["target"] == "onnx":           # a torch-target bundle has no engine files
        refs += [(f"plan.engines.{n}.file", e.file) for n, e in plan.engines.items()]
    elif manifest["model"].get("checkpoint") is None:
        refs.append(("model (torch target)", "weights.safetensors"))
    refs.append(("prompt.tokenizer", manifest["prompt"]["tokenizer"]))
    if manifest["prompt"].get("video_end_embedding"):
        refs.append(("prompt.video_end_embedding", manifest["prompt"]["video_end_embedding"]))
    return refs


def _path_problem(rel: str) -> str | None:
    if not rel:
        return "an empty path"
    if "\x00" in rel or "\\" in rel:
        return f"path {rel!r} contains a NUL or backslash"
    if rel.startswith("/") or os.path.isabs(rel):
        return f"path {rel!r} is absolute; bundle paths are relative to the bundle"
    parts = rel.split("/")
    if ".." in parts:
        return f"path {rel!r} contains '..'; bundle paths stay inside the bundle"
    if any(p in ("", ".") for p in parts) or PurePosixPath(rel).as_posix() != rel:
        return f"path {rel!r} is not normalized"
    if rel == MANIFEST:
        return "lists manifest.json itself"
    return None


def _check_paths(manifest: dict, plan: Plan, root: Path, path: Path, mpath: Path) -> dict[str, Path]:
    """Every listed and referenced path: relative, normalized, listed, resolving inside the
    bundle to a regular file; no file in the bundle that the manifest does not list. Nothing
    listed is opened here. Returns ``{rel: resolved path}``."""
    listed = manifest["files"]
    for rel, digest in listed.items():
        problem = _path_problem(rel)
        if problem:
            raise BundleError(f"{mpath}: files: {problem}")
        if not re.match(_HEX64, digest):
            raise BundleError(f"{mpath}: files[{rel!r}]: not a sha256 hex digest")
    for field, rel in _referenced(manifest, plan):
        problem = _path_problem(rel) if isinstance(rel, str) else f"not a string: {rel!r}"
        if problem:
            raise BundleError(f"{mpath}: {field}: {problem}")
        if rel not in listed:
            raise BundleError(f"{path / rel}: named by {field} but not listed in the manifest's files")
    resolved = {}
    for rel in listed:
        real = Path(os.path.realpath(root / rel))
        if not _inside(real, root):
            raise BundleError(f"{path / rel}: resolves to {real}, outside the bundle {root}")
        if not os.path.lexists(real):
            raise BundleError(f"{path / rel}: file listed in the manifest is missing")
        if not stat.S_ISREG(_stat(real, path / rel).st_mode):
            raise BundleError(f"{path / rel}: not a regular file")
        resolved[rel] = real
    known = set(listed) | {MANIFEST}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in CACHE_DIRS]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = (rel_dir / name).as_posix()
            if rel not in known and not any(k.startswith(rel + "/") for k in listed):
                raise BundleError(f"{path / rel}: not named in the manifest; a bundle holds only "
                                  f"the files its manifest lists — recompile it")
    return resolved


def _stat(real: Path, shown: Path) -> os.stat_result:
    try:
        return os.stat(real)
    except FileNotFoundError:
        raise BundleError(f"{shown}: file listed in the manifest is missing") from None
    except OSError as e:
        raise BundleError(f"{shown}: cannot stat: {e.strerror or e}") from None


def _inside(real: Path, root: Path) -> bool:
    return real == root or str(real).startswith(str(root).rstrip(os.sep) + os.sep)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------ writing
def write_manifest(path: Path, manifest: dict, key: bytes | str | None = None) -> None:
    """Hash every file under ``path`` (except the manifest) into ``manifest['files']``, seal
    the manifest (:func:`seal`, with ``key`` or ``$STREAMGRAPH_BUNDLE_KEY``) and write
    ``manifest.json``."""
    files = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(path).as_posix()] = sha256_file(f)
    manifest["files"] = files
    seal(manifest, key)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
