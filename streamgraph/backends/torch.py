"""Eager torch reference backend: the same modules the engines were exported from, run
eagerly from the bundle's ``weights.safetensors``. Used by parity tests."""
from __future__ import annotations

import numpy as np

from streamgraph.backends.base import Backend
from streamgraph.errors import BackendUnavailableError


class TorchBackend(Backend):
    """Runs the bundle's model eagerly in float32 on the CPU."""

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
        cfg = VLMConfig.from_dict(bundle.manifest["model"]["config"])
        model = load_model(cfg, bundle.path / "weights.safetensors")
        self.modules = plan_engine_modules(model, bundle.plan)
        if "reducer" in bundle.plan.engines:  # bundle from before budget buckets
            self.modules["reducer"] = next(m for n, m in self.modules.items() if n.startswith("reducer_k"))
        self.output_names = {n: [o.name for o in e.outputs] for n, e in bundle.plan.engines.items()}
        self.input_names = {n: [i.name for i in e.inputs] for n, e in bundle.plan.engines.items()}

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        module = self.modules[engine]
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names[engine]]
        with torch.inference_mode():
            out = module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: o.numpy() for n, o in zip(self.output_names[engine], out)}
