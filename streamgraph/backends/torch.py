"""Eager torch reference backend: the same modules the engines were exported from, run
eagerly from the bundle's ``weights.safetensors``. Used by parity tests."""
from __future__ import annotations

import numpy as np

from streamgraph.backends.base import Backend
from streamgraph.errors import BackendUnavailableError


class TorchBackend(Backend):
    """Runs the bundle's model eagerly on the CPU, in the plan's dtype.

    Weights come from the bundle's ``weights.safetensors`` (presets) or, for a Hugging Face
    checkpoint (whose weights the bundle does not copy), from the checkpoint directory recorded
    in the manifest, after checking every file against the sha256 recorded at compile time
    (:class:`~streamgraph.errors.BundleError` if the checkpoint moved or changed)."""

    name = "torch"

    def __init__(self, bundle, threads: int | None = None):
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailableError(f"the torch backend needs torch: {e}") from None
        from streamgraph.compiler.lower import plan_engine_modules
        from streamgraph.models.build import load_model
        from streamgraph.models.config import VLMConfig

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        dtype = bundle.plan.kv.dtype
        cfg = VLMConfig.from_dict(bundle.manifest["model"]["config"])
        ckpt_info = bundle.manifest["model"].get("checkpoint")
        if ckpt_info is not None:
            model = _load_checkpoint(ckpt_info, dtype)
        else:
            model = load_model(cfg, bundle.file("weights.safetensors"), dtype)   # verified at load
        self.modules = plan_engine_modules(model, bundle.plan)
        self.output_names = {n: [o.name for o in e.outputs] for n, e in bundle.plan.engines.items()}
        self.input_names = {n: [i.name for i in e.inputs] for n, e in bundle.plan.engines.items()}

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        module = self.modules[engine]
        # C-contiguous and writable (a read-only input, e.g. a shared buffer, is copied: torch needs writable memory)
        args = [torch.from_numpy(np.require(inputs[n], requirements=("C", "W"))) for n in self.input_names[engine]]
        with torch.inference_mode():
            out = module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: o.numpy() for n, o in zip(self.output_names[engine], out)}


def _load_checkpoint(info: dict, dtype: str):
    """The model of a checkpoint directory whose files still match ``info["files"]``."""
    from streamgraph.errors import BundleError
    from streamgraph.models.hf import CheckpointError, checkpoint_sha256, load_model, open_checkpoint

    try:
        ckpt = open_checkpoint(info["path"])
        if checkpoint_sha256(ckpt) != info["files"]:
            raise BundleError(f"{info['path']}: the checkpoint's files changed since the bundle was "
                              f"compiled; recompile it")
        return load_model(ckpt, dtype=dtype)
    except CheckpointError as e:
        raise BundleError(f"the torch backend reads the bundle's checkpoint, which is unusable: {e}") from None
