"""Build the torch model a graph's ``model:`` section names: a seeded random preset or a local
Hugging Face checkpoint (:mod:`streamgraph.models.hf`). Which model and its config, torch-free:
:mod:`streamgraph.models.source`."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from streamgraph.contract import DTYPES
from streamgraph.models.config import VLMConfig
from streamgraph.models.source import hf_checkpoint, model_config  # noqa: F401  (re-exported)
from streamgraph.models.vlm import StreamingVLM, init_random_
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
