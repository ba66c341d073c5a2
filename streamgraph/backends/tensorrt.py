"""TensorRT backend: engines built from the bundle's ONNX files with the TensorRT 10 Python API.

Status: written against NVIDIA's documented TensorRT 10 API (name-based tensors,
``build_serialized_network``, ``execute_async_v3``) and **never run**: TensorRT cannot be
installed on the machines this project is developed and tested on. Its absence is detected at
construction and reported as :class:`~streamgraph.errors.BackendUnavailableError`, never a
crash (``import tensorrt`` / ``torch_tensorrt`` may raise a bare ``Exception``, not only
ImportError, when their libraries are missing).

Design: one optimization profile per engine, the chunk axis ``T`` spanning the plan's
``dims.T = [min, max]`` (opt = max); device buffers are torch CUDA tensors. The KV buffer
stays host-side (the runtime's contract) and is copied to the device each step — correct,
not fast; a device-resident KV buffer is future work. Serialized engines are cached beside
the bundle in ``trt/<engine>.<gpu>.<trt version>.plan`` (not part of the hashed bundle).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from streamgraph.backends.base import Backend
from streamgraph.errors import BackendUnavailableError


def _import_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as e:  # missing libs raise bare Exception, not only ImportError
        raise BackendUnavailableError(
            f"TensorRT is not available here (import tensorrt failed: {type(e).__name__}: {e}); "
            f"use --backend onnxruntime") from None
    return trt


class TensorRTBackend(Backend):
    """Build (or load cached) TensorRT engines for every ONNX engine of a bundle and run them
    on ``device``. ``fp16`` enables reduced-precision kernels. Raises BackendUnavailableError
    when TensorRT, torch or a CUDA device is missing, or an engine fails to build."""

    name = "tensorrt"

    def __init__(self, bundle, device: str = "cuda:0", fp16: bool = False, workspace_mb: int = 2048):
        trt = _import_tensorrt()
        try:
            import torch
        except Exception as e:
            raise BackendUnavailableError(f"the tensorrt backend needs torch for CUDA buffers: {e}") from None
        if not torch.cuda.is_available():
            raise BackendUnavailableError("the tensorrt backend needs a CUDA device; none is available")
        if bundle.manifest.get("target") != "onnx":
            raise BackendUnavailableError(f"{bundle.path}: bundle has no ONNX engines (target "
                                          f"{bundle.manifest.get('target')!r}); recompile with target onnx")
        self.trt, self.torch = trt, torch
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        gpu = torch.cuda.get_device_name(self.device).replace(" ", "_")
        cache = Path(bundle.path) / "trt"
        cache.mkdir(exist_ok=True)
        for name, plan in bundle.plan.engines.items():
            f = cache / f"{name}.{gpu}.{trt.__version__}{'.fp16' if fp16 else ''}.plan"
            if not f.is_file():
                f.write_bytes(self._build(bundle.file(plan.file), plan, fp16, workspace_mb))
            engine = self.runtime.deserialize_cuda_engine(f.read_bytes())
            if engine is None:
                raise BackendUnavailableError(f"{f}: TensorRT could not deserialize the engine")
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()

    def _build(self, onnx_path: Path, plan, fp16: bool, workspace_mb: int) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)          # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailableError(f"{onnx_path}: TensorRT could not parse the ONNX model: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        t_min, t_max = plan.dims.get("T", [1, 1])
        profile = builder.create_optimization_profile()
        for spec in plan.inputs:
            shape = lambda t: tuple(t if d == "T" else int(d) for d in spec.shape)  # noqa: E731
            profile.set_shape(spec.name, shape(t_min), shape(t_max), shape(t_max))
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BackendUnavailableError(f"{onnx_path}: TensorRT engine build failed")
        return bytes(blob)

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt = self.torch, self.trt
        eng, ctx = self.engines[engine], self.contexts[engine]
        keep = []
        with torch.cuda.stream(self.stream):
            for name, arr in inputs.items():
                t = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, non_blocking=True)
                keep.append(t)
                ctx.set_input_shape(name, tuple(arr.shape))
                ctx.set_tensor_address(name, t.data_ptr())
            outs = {}
            for i in range(eng.num_io_tensors):
                name = eng.get_tensor_name(i)
                if eng.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                    continue
                dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(eng.get_tensor_dtype(name)))).dtype
                out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device=self.device)
                ctx.set_tensor_address(name, out.data_ptr())
                outs[name] = out
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of {engine} failed")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}
