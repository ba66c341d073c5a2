"""Build the torch model a graph's ``model:`` section names, with deterministic weights."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from streamgraph.errors import SpecError
from streamgraph.models.config import VLMConfig, small_config, tiny_config
from streamgraph.models.vlm import StreamingVLM, init_random_


def model_config(spec) -> VLMConfig:
    """Model config of a :class:`~streamgraph.compiler.spec.GraphSpec`.

    Raises SpecError (located at ``model``) for an unsupported source or frame size."""
    m = spec.model
    presets = {"tiny": tiny_config, "small": small_config}
    if m.preset in presets:
        try:
            return presets[m.preset](tuple(spec.stream.frame_size))
        except ValueError as e:
            line, col = spec.locate(("stream", "frame_size")) or (None, None)
            raise SpecError(str(e), file=spec.source_file, line=line, col=col, field="stream.frame_size") from None
    line, col = spec.locate(("model",)) or (None, None)
    raise SpecError("Hugging Face checkpoints (model.hf) are not supported yet; use preset: tiny",
                    file=spec.source_file, line=line, col=col, field="model.hf")


def build_model(spec) -> StreamingVLM:
    """Construct the model in eval mode with seeded random weights (``model.seed``)."""
    cfg = model_config(spec)
    return init_random_(StreamingVLM(cfg), spec.model.seed).eval()


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


def load_model(cfg: VLMConfig, path: str | Path) -> StreamingVLM:
    """Rebuild a model from its config and a safetensors file written by :func:`save_weights`."""
    model = StreamingVLM(cfg)
    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.text.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
