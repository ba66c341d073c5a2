"""Build the torch model a graph's ``model:`` section names: a seeded random preset or a local
Hugging Face checkpoint (:mod:`streamgraph.models.hf`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from streamgraph.contract import DTYPES
from streamgraph.errors import SpecError
from streamgraph.models.config import PRESETS, VLMConfig
from streamgraph.models.vlm import StreamingVLM, init_random_
_CKPT_CACHE: dict = {}


def hf_checkpoint(spec):
    """The :class:`~streamgraph.models.hf.Checkpoint` of a graph with ``model: {hf: DIR}``
    (``DIR`` relative to the graph file), read once per directory state.

    Raises the loader's :class:`~streamgraph.models.hf.CheckpointError` subclass with the
    message prefixed by the graph file's ``FILE:LINE:COL: model.hf:`` (an OSError reading
    the directory becomes a CheckpointError too)."""
    from streamgraph.models.hf import CheckpointError, open_checkpoint

    path = spec.resolve_path(spec.model.hf)
    try:
        stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir()))
    except OSError:
        stamp = None
    key = (str(path), stamp)
    if stamp is not None and key in _CKPT_CACHE:
        return _CKPT_CACHE[key]
    try:
        ckpt = open_checkpoint(path)
    except (CheckpointError, OSError) as e:  # OSError: EACCES, EIO, ... reading the directory
        line, col = spec.locate(("model", "hf")) or (None, None)
        where = spec.source_file + (f":{line}:{col}" if line is not None else "")
        if isinstance(e, CheckpointError):
            raise type(e)(f"{where}: model.hf: {e}") from None
        raise CheckpointError(f"{where}: model.hf: {path}: cannot read the checkpoint: "
                              f"{e.strerror or e}") from None
    _CKPT_CACHE.clear()
    _CKPT_CACHE[key] = ckpt
    return ckpt


def model_config(spec) -> VLMConfig:
    """Model config of a :class:`~streamgraph.compiler.spec.GraphSpec`.

    For ``hf`` models the encoder input size is the checkpoint's (its preprocessor config);
    ``stream.frame_size``, when given, must equal it. Raises SpecError (located at
    ``stream.frame_size``) for a frame size the model cannot take, and the loader's
    CheckpointError (located at ``model.hf``) for a bad checkpoint."""
    m = spec.model
    if m.preset in PRESETS:
        try:
            return PRESETS[m.preset](tuple(spec.stream.frame_size))
        except ValueError as e:
            line, col = spec.locate(("stream", "frame_size")) or (None, None)
            raise SpecError(str(e), file=spec.source_file, line=line, col=col, field="stream.frame_size") from None
    ckpt = hf_checkpoint(spec)
    cfg = ckpt.cfg
    if "frame_size" in spec.stream.model_fields_set and tuple(spec.stream.frame_size) != cfg.vision.image_size:
        h, w = cfg.vision.image_size
        line, col = spec.locate(("stream", "frame_size")) or (None, None)
        raise SpecError(f"the checkpoint's vision tower takes {h}x{w} frames ({ckpt.preprocessor_file}); "
                        f"set frame_size: [{h}, {w}] or leave it out", file=spec.source_file, line=line,
                        col=col, field="stream.frame_size")
    return cfg


def build_model(spec, device: str = "cpu") -> StreamingVLM:
    """Construct the model in eval mode, in ``model.dtype``.

    Presets get seeded random weights (``model.seed``); ``hf`` models the checkpoint's weights.
    ``device="meta"`` builds the exact parameter shapes and dtypes without weights or memory
    (for planning; an ``hf`` checkpoint's tensor names and shapes are still checked from the
    safetensors headers)."""
    cfg = model_config(spec)
    dtype = spec.model.dtype
    if spec.model.hf is not None:
        from streamgraph.models.hf import load_model as load_hf

        return load_hf(hf_checkpoint(spec), dtype=dtype, device=device)
    if device == "meta":
        with torch.device("meta"):
            return StreamingVLM(cfg).to(torch_dtype(dtype)).eval()
    return init_random_(StreamingVLM(cfg), spec.model.seed).to(torch_dtype(dtype)).eval()


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of plan dtype ``name`` (:data:`streamgraph.contract.DTYPES`); KeyError
    for a name the contract does not define."""
    return getattr(torch, DTYPES[name].torch)


def weights_fingerprint(spec, model: torch.nn.Module) -> tuple[str, dict | None]:
    """``(sha256, per-file hashes)`` identifying a graph's weights for the lock key: for a
    preset the hash of its tensors (:func:`weights_sha256`, per-file ``None``); for an ``hf``
    model the hash of every checkpoint file streamgraph reads (weights, config, tokenizer,
    template, preprocessor), without loading any tensor."""
    if spec.model.hf is None:
        return weights_sha256(model), None
    from streamgraph.models.hf import checkpoint_sha256

    files = checkpoint_sha256(hf_checkpoint(spec))
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return digest, files


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the (name, dtype, shape, bytes) of every parameter, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_weights(model: StreamingVLM, path: str | Path) -> None:
    """Save the weights as safetensors (tied tensors stored once)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.text.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(path))


def load_model(cfg: VLMConfig, path: str | Path, dtype: str = "float32") -> StreamingVLM:
    """Rebuild a model from its config and a safetensors file written by :func:`save_weights`,
    in ``dtype``."""
    model = StreamingVLM(cfg).to(torch_dtype(dtype))
    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.text.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
