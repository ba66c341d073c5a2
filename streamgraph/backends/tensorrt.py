"""TensorRT backend: engines built from the bundle's ONNX files with the TensorRT 10 Python API,
the decoder's KV buffer resident on the device.

Status: written against NVIDIA's documented TensorRT 10 API (name-based tensors,
``build_serialized_network``, ``set_tensor_address``, ``execute_async_v3``) and PyTorch's
CUDA tensors, and **never run**: TensorRT and a CUDA device are not available on the
machines this project is developed and tested on. Its absence is detected at construction
and reported as :class:`~streamgraph.errors.BackendUnavailableError`, never a crash
(``import tensorrt`` / ``torch_tensorrt`` may raise a bare ``Exception``, not only
ImportError, when their libraries are missing).

Design: one optimization profile per engine, the chunk axis ``T`` spanning the plan's
``dims.T = [min, max]`` (opt = max); device buffers are torch CUDA tensors. Stateless
engines (``run``) copy their inputs to the device and their outputs back. The decoder does
not: :meth:`TensorRTBackend.alloc_kv` allocates the session's ``kv_cache`` once in device
memory (a :class:`DeviceKV`) with its own execution context, in which the KV buffer's
address is set once and every other input and output has a device buffer preallocated for
``T_max``; per step only the chunk's small inputs go host -> device (embeddings, positions,
validity masks: ``T*C + O(S)`` elements, never the cache), ``logits`` / ``last_hidden`` /
``query_mean`` come back, ``new_kv`` stays on the device (checked for NaN/Inf there:
``new_kv_finite``) and :meth:`TensorRTBackend.commit_kv` scatters it into its slots with
``index_copy_`` on the device — only the slot indices cross the bus. Serialized engines are
cached beside the bundle in ``trt/<engine>.<gpu>.<trt version>.plan`` (not part of the
hashed bundle).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from streamgraph.backends.base import Backend
from streamgraph.backends.torch_device import DeviceTensorKV
from streamgraph.contract import (DECODER_STEP, DTYPES, INPUTS_EMBEDS, KV_CACHE, LAST_HIDDEN, LOGITS, NEW_KV,
                                  QUERY_MEAN)
from streamgraph.errors import BackendUnavailableError
from streamgraph.kv.base import KVBuffer


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
    when TensorRT, torch or a CUDA device is missing, or an engine fails to build.

    Not thread-safe (``thread_safe = False``: the stateless engines share one execution
    context each); ``Engines`` wraps it in a SerializedBackend. Never run (module docstring).
    """

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
        dec = bundle.plan.engines.get(DECODER_STEP)
        self._dec_plan = dec
        self._t_max = int(dec.dims.get("T", [1, 1])[1]) if dec else 1

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

    # ------------------------------------------------------------------ device-resident decoder
    def alloc_kv(self, shape, dtype: str = "float32") -> "DeviceKV":
        """The session's KV buffer in device memory with its own decoder execution context
        (a :class:`DeviceKV`). Raises KeyError when the bundle has no decoder_step engine."""
        return DeviceKV(self, shape, dtype)

    def decoder_step(self, kv: KVBuffer, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoder step on ``kv``'s device buffers (I/O as
        :meth:`Backend.decoder_step <streamgraph.backends.base.Backend.decoder_step>`): the
        small inputs are copied into their preallocated device buffers, the engine runs on
        ``kv``'s context and stream, ``logits`` / ``last_hidden`` / ``query_mean`` are copied
        back; ``new_kv`` stays on the device as the pending KV and is reported as
        ``new_kv_finite`` (bool, reduced on the device) instead of an array. A host
        KVBuffer (not from this backend) runs the base-class default."""
        if not isinstance(kv, DeviceKV) or kv.backend is not self:
            return Backend.decoder_step(self, kv, inputs)
        torch = self.torch
        ctx, t = kv.context, int(inputs[INPUTS_EMBEDS].shape[1])
        kv.pending_new_kv = None
        with torch.cuda.stream(kv.stream):
            for name, value in inputs.items():
                buf = kv.inputs[name]
                n = int(value.size)
                buf[:n].copy_(torch.from_numpy(np.ascontiguousarray(value).reshape(-1)))   # small: T*C, O(S)
                ctx.set_input_shape(name, tuple(value.shape))
                ctx.set_tensor_address(name, buf.data_ptr())
            views = kv.output_views(t)
            for name, view in views.items():
                ctx.set_tensor_address(name, view.data_ptr())
            if not ctx.execute_async_v3(kv.stream.cuda_stream):
                raise RuntimeError("TensorRT execution of decoder_step failed")
            new_kv = views[NEW_KV]
            finite = torch.isfinite(new_kv).all()
            host = {n: views[n].to("cpu", non_blocking=False) for n in (LOGITS, LAST_HIDDEN, QUERY_MEAN)}
        kv.stream.synchronize()
        kv.pending_new_kv = new_kv
        return {**{n: v.numpy() for n, v in host.items()}, "new_kv_finite": bool(finite.item())}

    def commit_kv(self, kv: KVBuffer, write_slots: np.ndarray) -> None:
        """Scatter the pending device ``new_kv`` into ``write_slots`` (>= 0) of ``kv`` with
        ``index_copy_`` on the device (the slot indices are the only data sent). A host
        KVBuffer uses the base-class default. Raises RuntimeError when no step is pending."""
        if not isinstance(kv, DeviceKV):
            return Backend.commit_kv(self, kv, write_slots)
        kv.commit_pending(write_slots)



class DeviceKV(DeviceTensorKV):
    """A session's KV buffer ``[L, 2, B, Hkv, S, Dh]`` in device memory (the ``torch-device``
    backend's :class:`~streamgraph.backends.torch_device.DeviceTensorKV`: one tensor, slot
    scatter, ReKV block moves), plus the decoder execution context, CUDA stream and
    preallocated device I/O buffers of its session (never shared across streams). Its
    ``address`` (the device pointer, set once in the context as ``kv_cache``) never changes.
    Never run (module docstring).
    """

    def __init__(self, backend: "TensorRTBackend", shape, dtype: str = "float32"):
        super().__init__(backend, shape, dtype)
        torch, dev = backend.torch, backend.device
        # (a CPU device has no stream: only the index arithmetic is testable without a GPU)
        self.stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        plan = backend._dec_plan
        self.context = backend.engines[DECODER_STEP].create_execution_context()
        self.context.set_input_shape(KV_CACHE, self.shape)
        self.context.set_tensor_address(KV_CACHE, self._address)      # bound once
        t_max = backend._t_max
        size = lambda spec: int(np.prod([t_max if d == "T" else int(d) for d in spec.shape]))  # noqa: E731
        tdt = lambda spec: getattr(torch, DTYPES[spec.dtype].torch)                             # noqa: E731
        self.inputs = {i.name: torch.empty(size(i), dtype=tdt(i), device=dev)
                       for i in plan.inputs if i.name != KV_CACHE}
        self._outputs = {o.name: (torch.empty(size(o), dtype=tdt(o), device=dev), o.shape) for o in plan.outputs}
        self._views: dict[int, dict] = {}

    def output_views(self, t: int) -> dict:
        """Device views of the preallocated outputs shaped for a chunk of ``t`` tokens."""
        views = self._views.get(t)
        if views is None:
            views = {}
            for name, (flat, shape) in self._outputs.items():
                dims = [t if d == "T" else int(d) for d in shape]
                views[name] = flat[: int(np.prod(dims))].view(dims)
            self._views[t] = views
        return views

    def scatter(self, new_kv, token_index: np.ndarray, slots: np.ndarray) -> None:
        """:meth:`DeviceTensorKV.scatter` on this session's CUDA stream."""
        if self.stream is None:
            return super().scatter(new_kv, token_index, slots)
        with self.torch.cuda.stream(self.stream):
            super().scatter(new_kv, token_index, slots)
        self.stream.synchronize()
