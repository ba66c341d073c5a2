"""Bundle: ``build/<name>/manifest.json`` + ``engines/*.onnx`` + tokenizer (+ reference weights).

The manifest holds the normalized graph, the plan, the sha256 of every file and a lock key
(hash of graph, weights, shapes, opset, tool versions, target): a rebuild happens when, and
only when, one of them changed. Loading a bundle whose files do not match their hashes is
refused. This module is torch-free: the runtime loads bundles with it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from streamgraph.compiler.plan import Plan
from streamgraph.errors import BundleError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


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


class Bundle:
    """A compiled bundle on disk. Use :meth:`load`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.plan = Plan.from_dict(manifest["plan"])

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def lock_key(self) -> str:
        return self.manifest["lock_key"]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Read ``path/manifest.json`` and (``verify``) check every file's sha256.

        Raises :class:`BundleError` if the directory or manifest is missing or malformed, a
        file is missing, or a file's hash does not match."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"{path}: not a bundle directory (run `streamgraph compile` first)")
        if not mpath.is_file():
            raise BundleError(f"{mpath}: manifest missing; not a compiled bundle")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath}: unreadable manifest: {e}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise BundleError(f"{mpath}: bundle format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
        if verify:
            for rel, digest in manifest.get("files", {}).items():
                f = path / rel
                if not f.is_file():
                    raise BundleError(f"{f}: file listed in the manifest is missing")
                if sha256_file(f) != digest:
                    raise BundleError(f"{f}: sha256 does not match the manifest; the bundle was "
                                      f"modified or corrupted — recompile it")
        try:
            return cls(path, manifest)
        except (KeyError, TypeError) as e:
            raise BundleError(f"{mpath}: malformed plan in manifest: {e}") from None


def write_manifest(path: Path, manifest: dict) -> None:
    """Hash every file under ``path`` (except the manifest) into ``manifest['files']`` and
    write ``manifest.json``."""
    files = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(path).as_posix()] = sha256_file(f)
    manifest["files"] = files
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
