"""Device-resident PyTorch backend (``torch-device``): the bundle's torch modules on a CUDA
device (or the CPU), the decoder's KV buffer allocated once on that device and never copied.

The practical GPU path where TensorRT is not installed, designed as gpt-fast does it
(pytorch-labs/gpt-fast: a static KV buffer on the device, index-scatter writes): the cache
policy's index arithmetic stays on the host (:mod:`streamgraph.kv`) and per decoder step only
the chunk's small inputs cross the bus (``inputs_embeds [1,T,C]``, positions, validity masks:
``T*C + O(S)`` elements), never the cache:

* :meth:`TorchDeviceBackend.alloc_kv` allocates ``kv_cache [L,2,B,Hkv,S,Dh]`` once as a device
  tensor (a :class:`DeviceTensorKV`); its address never changes;
* :meth:`TorchDeviceBackend.decoder_step` runs the ``decoder_step`` module with that tensor as
  its ``kv_cache`` argument (passed in place, no copy), keeps the step's ``new_kv`` on the
  device as the buffer's pending KV, checks it for NaN/Inf on the device
  (``new_kv_finite``) and copies back only ``logits [1,V]``, ``last_hidden [1,C]`` and
  ``query_mean [L,1,H,Dh]``;
* :meth:`TorchDeviceBackend.commit_kv` scatters the pending KV into its slots on the device
  (``index_copy_`` along the slot axis, or a slice copy when the slots are consecutive): only
  the slot indices cross the bus.

Stateless engines (vision encoder, reducers, ``embed_tokens``) run through :meth:`run`: inputs
copied to the device, outputs back to host numpy arrays.

``dtype``: ``float32``, ``float16`` or ``bfloat16`` (default: the plan's dtype): the modules'
parameters and the KV buffer are held in it; buffers such as RoPE's ``inv_freq`` stay float32,
and host outputs are returned in the plan's float dtype (float32 for bfloat16: numpy has
none). The half dtypes are meant for CUDA; on the CPU they run (slowly) so the code path is
testable.

Not done (future work, see docs/performance.md): CUDA graphs / ``torch.compile`` of the
decoder step (the chunk length ``T`` varies, so it needs per-``T`` graphs or padding to
buckets), and a fused attention kernel (the modules build the ``[B,H,T,S+T]`` score matrix).
"""
from __future__ import annotations

import numpy as np

from streamgraph.backends.base import Backend
from streamgraph.contract import (DECODER_STEP, DECODER_STEP_INPUTS, DECODER_STEP_OUTPUTS, DTYPES, EMBED_TOKENS,
                                  INPUT_IDS, INPUTS_EMBEDS, KV_CACHE, NEW_KV, PIXEL_VALUES, VISION_ENCODER,
                                  VISUAL_TOKENS)
from streamgraph.errors import BackendUnavailableError
from streamgraph.kv.base import KVBuffer

#: dtype option -> torch attribute name
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
NEW_KV_FINITE = "new_kv_finite"


def _import_torch():
    try:
        import torch
    except Exception as e:   # noqa: BLE001 - a broken install may raise more than ImportError
        raise BackendUnavailableError(f"the torch-device backend needs torch: {type(e).__name__}: {e}") from None
    return torch


def resolve_device(torch, device: "str | None"):
    """``device`` as a ``torch.device``: ``None`` -> ``cuda`` when available, else ``cpu``.
    Raises BackendUnavailableError for a CUDA device that is not there, ValueError for a name
    torch does not know."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"torch-device: bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"torch-device: device {device!r} asked for but CUDA is not available here "
                                      f"(torch {torch.__version__}); use device='cpu'")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"torch-device: device {device!r} is not supported (cuda or cpu)")
    return dev


class TorchDeviceBackend(Backend):
    """The bundle's engines as eager torch modules on ``device`` (default ``"cuda"`` when
    available, else ``"cpu"``) in ``dtype`` (``"float32"``, ``"float16"``, ``"bfloat16"``;
    default: the plan's dtype, float32 for most bundles), with device-resident KV buffers
    (module docstring).

    Weights come from the bundle as for the eager ``torch`` backend (``weights.safetensors``,
    or the hash-checked Hugging Face checkpoint the manifest names); any bundle target works
    (``onnx`` bundles carry the weights too). ``threads`` sets torch's intra-op CPU threads.

    Raises BackendUnavailableError when torch or the CUDA device is missing, ValueError for a
    dtype outside float32/float16/bfloat16 or an unknown device. Not thread-safe
    (``thread_safe = False``: one CUDA stream, the default one); ``Engines`` wraps it in a
    SerializedBackend.
    """

    name = "torch-device"
    thread_safe = False

    def __init__(self, bundle, device: "str | None" = None, dtype: "str | None" = None, threads: int | None = None):
        torch = _import_torch()
        dtype = dtype or bundle.plan.kv.dtype
        if dtype not in _DTYPES:
            raise ValueError(f"torch-device: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        dev = resolve_device(torch, device)
        if threads:
            torch.set_num_threads(int(threads))
        from streamgraph.backends.torch import _load_checkpoint
        from streamgraph.compiler.lower import plan_engine_modules
        from streamgraph.models.build import load_model
        from streamgraph.models.config import VLMConfig

        plan = bundle.plan
        load_dtype = plan.kv.dtype                       # the bundle's weights as compiled
        ckpt_info = bundle.manifest["model"].get("checkpoint")
        if ckpt_info is not None:
            model = _load_checkpoint(ckpt_info, load_dtype)
        else:
            cfg = VLMConfig.from_dict(bundle.manifest["model"]["config"])
            model = load_model(cfg, bundle.file("weights.safetensors"), load_dtype)
        io = {n: ([i.name for i in e.inputs], [o.name for o in e.outputs]) for n, e in plan.engines.items()}
        out_dtypes = {o.name: DTYPES[o.dtype].numpy for e in plan.engines.values() for o in e.outputs}
        self._setup(torch, model, plan_engine_modules(model, plan), io, dev, dtype, out_dtypes)

    @classmethod
    def from_model(cls, model, modules: dict | None = None, io: dict | None = None,
                   device: "str | None" = None, dtype: str = "float32") -> "TorchDeviceBackend":
        """A backend over an already built :class:`~streamgraph.models.vlm.StreamingVLM`
        (benchmarks with random weights built on the device, no bundle): ``modules`` default
        to its plain engines (``vision_encoder``, ``embed_tokens``, ``decoder_step``) and
        ``io`` (engine -> (input names, output names)) to their contract names."""
        torch = _import_torch()
        if dtype not in _DTYPES:
            raise ValueError(f"torch-device: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        self = cls.__new__(cls)
        if modules is None:
            modules = {VISION_ENCODER: model.vision_encoder(), EMBED_TOKENS: model.token_embedding(),
                       DECODER_STEP: model.decoder_step()}
        if io is None:
            io = {VISION_ENCODER: ([PIXEL_VALUES], [VISUAL_TOKENS]), EMBED_TOKENS: ([INPUT_IDS], [INPUTS_EMBEDS]),
                  DECODER_STEP: (list(DECODER_STEP_INPUTS), list(DECODER_STEP_OUTPUTS))}
        self._setup(torch, model, modules, io, resolve_device(torch, device), dtype, {})
        return self

    def _setup(self, torch, model, modules: dict, io: dict, dev, dtype: str, out_dtypes: dict) -> None:
        self.torch = torch
        self.device = dev
        self.dtype_name = dtype
        self.dtype = getattr(torch, _DTYPES[dtype])
        model.to(dev)
        # parameters in the compute dtype; float buffers (RoPE inv_freq) stay as built
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != self.dtype:
                p.data = p.data.to(self.dtype)
        self.modules = {}
        for name, m in modules.items():
            m = m.to(dev).eval()
            for p in m.parameters():
                if p.is_floating_point() and p.dtype != self.dtype:
                    p.data = p.data.to(self.dtype)
            self.modules[name] = m
        self.input_names = {n: list(v[0]) for n, v in io.items()}
        self.output_names = {n: list(v[1]) for n, v in io.items()}
        #: host dtype of each float output (the plan's; float32 when none is planned)
        self._out_np = out_dtypes
        dec = self.input_names.get(DECODER_STEP, [])
        self._step_inputs = frozenset(n for n in dec if n != KV_CACHE)

    # ------------------------------------------------------------------ helpers
    def _to_device(self, a: np.ndarray):
        """A host array on the device; float arrays in the compute dtype."""
        torch = self.torch
        t = torch.from_numpy(np.require(a, requirements=("C", "W")))
        if t.is_floating_point():
            return t.to(self.device, self.dtype, non_blocking=False)
        return t.to(self.device)

    def _to_host(self, name: str, t) -> np.ndarray:
        """A device output as a host numpy array (floats in the plan's dtype, else float32)."""
        if t.is_floating_point():
            want = self._out_np.get(name, np.dtype(np.float32))
            t = t.to(getattr(self.torch, DTYPES[np.dtype(want).name].torch))
        return t.cpu().numpy()

    # ------------------------------------------------------------------ stateless engines
    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a stateless engine on the device: numpy inputs in, host numpy outputs out.
        Raises KeyError for an engine the bundle does not have. (``decoder_step`` through
        ``run`` takes ``kv_cache`` as a host array: the unbound path, kept for callers that
        use only ``run``.)"""
        module = self.modules[engine]
        args = [self._to_device(inputs[n]) for n in self.input_names[engine]]
        with self.torch.no_grad():
            out = module(*args)
        if isinstance(out, self.torch.Tensor):
            out = (out,)
        return {n: self._to_host(n, o) for n, o in zip(self.output_names[engine], out)}

    # ------------------------------------------------------------------ device-resident decoder
    def alloc_kv(self, shape, dtype: str = "float32") -> "DeviceTensorKV":
        """The session's KV buffer ``[L,2,B,Hkv,S,Dh]``, zero-filled, once, on the device in
        the backend's compute dtype (``dtype``, the plan's, is what the host sees through
        ``data``). A :class:`DeviceTensorKV`."""
        return DeviceTensorKV(self, shape, dtype, self.dtype)

    def decoder_step(self, kv: KVBuffer, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoder step over ``kv``'s device tensor (I/O as
        :meth:`Backend.decoder_step <streamgraph.backends.base.Backend.decoder_step>`). The
        small inputs go host -> device, the module runs with the KV tensor itself as
        ``kv_cache``; returns host ``logits``, ``last_hidden``, ``query_mean`` and
        ``new_kv_finite`` (bool, reduced on the device); ``new_kv`` stays on the device as
        ``kv.pending_new_kv``. A KVBuffer not from this backend runs the base-class default.
        Raises ValueError when ``inputs`` is not exactly the engine's inputs but ``kv_cache``."""
        if not isinstance(kv, DeviceTensorKV) or kv.backend is not self:
            return Backend.decoder_step(self, kv, inputs)
        if inputs.keys() != self._step_inputs:
            raise ValueError(f"decoder_step inputs {sorted(inputs)} != the engine's "
                             f"{sorted(self._step_inputs)} (kv_cache is the device buffer)")
        torch = self.torch
        kv.pending_new_kv = None
        args = [kv.tensor if n == KV_CACHE else self._to_device(inputs[n]) for n in self.input_names[DECODER_STEP]]
        with torch.no_grad():
            outs = dict(zip(self.output_names[DECODER_STEP], self.modules[DECODER_STEP](*args)))
            new_kv = outs.pop(NEW_KV)
            finite = torch.isfinite(new_kv).all()
        host = {n: self._to_host(n, t) for n, t in outs.items()}        # the step's one sync
        kv.pending_new_kv = new_kv
        host[NEW_KV_FINITE] = bool(finite.item())
        return host

    def commit_kv(self, kv: KVBuffer, write_slots: np.ndarray) -> None:
        """Scatter the pending device ``new_kv`` of ``kv`` into ``write_slots`` (>= 0) on the
        device: a slice copy when the valid slots are consecutive, else ``index_copy_`` with
        the slot indices (the only data sent). A KVBuffer not from this backend uses the
        base-class default. Raises RuntimeError when no step is pending."""
        if not isinstance(kv, DeviceTensorKV):
            return Backend.commit_kv(self, kv, write_slots)
        kv.commit_pending(write_slots)


class DeviceTensorKV(KVBuffer):
    """A session's KV buffer ``[L, 2, B, Hkv, S, Dh]`` as one torch tensor (``tensor``) on the
    backend's device, allocated once; :attr:`address` is its data pointer and never changes.
    Shared by the device backends (``torch-device``; ``tensorrt`` extends it with its execution
    context).

    ``data``: on the CPU with a numpy dtype (float32/float16) the tensor shares the memory of
    a host array (``torch.from_numpy``) and ``data`` is that live view, as for a host
    KVBuffer; on CUDA (or bfloat16) ``data`` is a *copy* device -> host (float32 for
    bfloat16), for reports and tests — writing to it changes nothing. ReKV's block moves
    (:meth:`read_slots` / :meth:`write_slots`) and :meth:`write` copy only the slots they
    touch. ``pending_new_kv``: the last uncommitted step's ``new_kv`` (a device tensor).

    ``backend`` needs ``torch`` and ``device``; ``torch_dtype`` is the tensor's dtype (default:
    the plan's ``dtype``).
    """

    def __init__(self, backend, shape, dtype: str = "float32", torch_dtype=None):
        torch = backend.torch
        self.backend, self.torch = backend, torch
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        tdt = torch_dtype if torch_dtype is not None else getattr(torch, DTYPES[dtype].torch)
        np_name = {torch.float32: "float32", torch.float16: "float16"}.get(tdt)
        if backend.device.type == "cpu" and np_name is not None:
            self._host = np.zeros(self.shape, dtype=DTYPES[np_name].numpy)
            self.tensor = torch.from_numpy(self._host)
        else:
            self._host = None
            self.tensor = torch.zeros(self.shape, dtype=tdt, device=backend.device)
        self._address = self.tensor.data_ptr()
        self.pending_new_kv = None

    def commit_pending(self, write_slots: np.ndarray) -> None:
        """Scatter ``pending_new_kv`` into ``write_slots`` (>= 0) and clear it (a backend's
        ``commit_kv``). Raises RuntimeError when no step is pending."""
        pending = self.pending_new_kv
        if pending is None:
            raise RuntimeError("commit_kv: no decoder_step is pending on this KV buffer")
        self.pending_new_kv = None
        write_slots = np.asarray(write_slots)
        sel = np.flatnonzero(write_slots >= 0)
        if len(sel):
            self.scatter(pending, sel, write_slots[sel])

    @property
    def data(self) -> np.ndarray:
        if self._host is not None:
            return self._host
        t = self.tensor
        return (t.float() if t.dtype == self.torch.bfloat16 else t).cpu().numpy()

    @property
    def nbytes(self) -> int:
        return int(self.tensor.numel() * self.tensor.element_size())

    @property
    def capacity(self) -> int:
        return int(self.shape[4])

    def _index(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.tensor.device)

    def scatter(self, new_kv, token_index: np.ndarray, slots: np.ndarray) -> None:
        """``tensor[..., slots[i], :] = new_kv[..., token_index[i], :]`` on the device
        (``new_kv [L,2,B,Hkv,T,Dh]`` a device tensor; ``token_index`` sorted and unique)."""
        n = len(token_index)
        if int(token_index[-1]) == n - 1:                       # valid tokens: a prefix of the chunk
            src = new_kv[:, :, :, :, :n]
        else:
            src = new_kv.index_select(4, self._index(token_index))
        first = int(slots[0])
        with self.torch.no_grad():
            if n == 1 or (int(slots[-1]) - first == n - 1 and bool((np.diff(slots) == 1).all())):
                self.tensor[:, :, :, :, first:first + n].copy_(src)       # consecutive: no index upload
            else:
                self.tensor.index_copy_(4, self._index(slots), src.to(self.tensor.dtype))
        assert self.tensor.data_ptr() == self._address, "KV buffer was reallocated"

    def write(self, new_kv: np.ndarray, write_slots: np.ndarray) -> None:
        """Host ``new_kv [L,2,B,Hkv,T,Dh]`` into the slots ``write_slots >= 0`` (only those
        tokens are copied to the device). Raises ValueError on a shape mismatch."""
        if new_kv.shape[:4] != self.shape[:4] or new_kv.shape[5] != self.shape[5]:
            raise ValueError(f"new_kv shape {new_kv.shape} does not fit KV buffer {self.shape}")
        sel = np.flatnonzero(np.asarray(write_slots) >= 0)
        if len(sel):
            src = self.torch.from_numpy(np.ascontiguousarray(new_kv[:, :, :, :, sel, :])).to(
                self.tensor.device, self.tensor.dtype)
            self.scatter(src, np.arange(len(sel)), np.asarray(write_slots)[sel])

    def read_slots(self, slots: np.ndarray, layer: int | None = None) -> np.ndarray:
        """A host copy of ``slots`` (batch 0): ``[L,2,Hkv,n,Dh]``, or ``[2,Hkv,n,Dh]`` for one
        ``layer`` (device -> host of those slots only; float32 for bfloat16)."""
        t = self.tensor[:, :, 0] if layer is None else self.tensor[layer, :, 0]
        out = t.index_select(t.dim() - 2, self._index(np.asarray(slots)))
        if out.dtype == self.torch.bfloat16:
            out = out.float()
        return out.cpu().numpy()

    def write_slots(self, slots: np.ndarray, values: np.ndarray, layer: int | None = None) -> None:
        """Write ``values`` (shaped as :meth:`read_slots` returns) into ``slots`` (batch 0), in
        place on the device (host -> device of those slots only)."""
        t = self.tensor[:, :, 0] if layer is None else self.tensor[layer, :, 0]
        src = self.torch.from_numpy(np.require(values, requirements=("C", "W"))).to(self.tensor.device, self.tensor.dtype)
        with self.torch.no_grad():
            t.index_copy_(t.dim() - 2, self._index(np.asarray(slots)), src)
        assert self.tensor.data_ptr() == self._address, "KV buffer was reallocated"
