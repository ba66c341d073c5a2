"""The frame pipeline of a session: preprocess -> encode -> reduce -> prefill (torch-free).

:class:`FramePipeline` is the real sessions' :class:`~streamgraph.runtime.stream.Executor`:
``execute_frame`` runs one frame through the engines (the stage being run in ``stage``, seconds
per stage returned) and the :class:`~streamgraph.runtime.decoder.Decoder` prefills its tokens;
``calibrate_costs`` measures every stage at every budget bucket with the same engine work but
no state touched (the probe); ``answer`` hands questions to the decoder. Every engine output
passes the session's NaN/Inf guard (:class:`~streamgraph.runtime.decoder.GuardedBackend`);
a frame that fails is not committed (KV buffer and cache policy are written only after a
finite decoder step; the reducer state is put back).

Preprocessing (numpy + PyAV)
----------------------------
Two resize families:

* ``ffmpeg_bilinear`` — FFmpeg's swscale bilinear scaler via PyAV (the ``tiny`` preset).
* ``bicubic_aa`` / ``bilinear_aa`` — the antialiased separable resampling of Pillow and of
  PyTorch's ``interpolate(..., antialias=True)`` on uint8 images, which is what Hugging Face's
  video processors run (``LlavaOnevisionVideoProcessor`` -> ``torchvision.transforms.v2.
  functional.resize`` -> ``torch.nn.functional.interpolate(uint8, mode="bicubic",
  antialias=True)`` on CPU). This is a numpy port of that uint8 kernel
  (``aten/src/ATen/native/cpu/UpSampleKernel.cpp``, itself derived from Pillow's
  ``ImagingResample``): horizontal pass then vertical pass, each with int16 fixed-point
  weights (precision chosen per axis from the largest weight) and uint8 rounding/clipping of
  the intermediate image.

Normalisation follows transformers' fused rescale-and-normalise:
``(x - mean / rescale_factor) / (std / rescale_factor)`` in float32, with ``x`` the resized
uint8 pixels.

Encoder reuse and token reduction (the host side)
-------------------------------------------------
:class:`EncoderStage` runs the vision encoder for a frame. With an ``stc_cacher`` encoder it
owns the reference buffers ``encoder_refs [Lv,4,B,N,Cv]`` (allocated once from the plan) and
decides per frame:

* ``skip`` — the frame barely changed: the mean absolute difference of its resized RGB pixels
  (in [0, 1] units, i.e. ``|Δpixel_values| · image_std`` averaged over every pixel and channel)
  to the **last encoded** frame is below ``skip_threshold``; the last encoded frame's visual
  tokens are reused outright and no encoder engine runs. Comparing with the last encoded
  frame (not the previous frame) bounds the drift a run of skips can accumulate;
* ``refresh`` — every ``refresh_every`` encoded frames (and for the first): the full encoder
  (``vision_encoder``), which also returns new reference buffers;
* ``reuse`` — otherwise: ``vision_encoder_reuse`` on the frame and the stored references.

A plain ``vision_encoder`` graph always reports ``full``.

:class:`ReducerStage` runs the reducer engine of the requested budget bucket
(``reducer_k{K}``), owns the reducer's state tensors (zeros at stream start, replaced by the
engine's ``next_state_*`` outputs after every run) and returns the valid prefix of the reduced
tokens. For a reducer that sends the first frame whole (DTD) the first frame's engine run only
initialises the state and all N encoder tokens are returned. With ``positions: keep`` a frame
occupies the positions of all its N encoder tokens whatever it keeps (see :class:`ReducedFrame`).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Iterator

import av
import numpy as np

from streamgraph.contract import (DTYPES, ENCODER_REFS, KEEP_MASK, PIXEL_VALUES, SOURCE_INDEX, TOKENS,
                                  VISION_ENCODER, VISION_ENCODER_REUSE, VISUAL_TOKENS)
from streamgraph.errors import NonFiniteError

RESAMPLE_MODES = ("ffmpeg_bilinear", "bilinear_aa", "bicubic_aa")


def _ffmpeg_resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    return frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BILINEAR")


def _cubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic convolution with a = -0.5, written as PyTorch's aa_filter for bicubic
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


@functools.lru_cache(maxsize=32)
def _aa_weights(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(index [out, taps], int weights [out, taps], precision)`` of one axis.

    Port of ``HelperInterpLinear::_compute_index_ranges_weights`` + ``_compute_weights_aa``
    (align_corners=False, antialias=True) and ``_compute_index_ranges_int16_weights``."""
    interp, fn = (4, _cubic) if mode == "bicubic_aa" else (2, _triangle)
    scale = in_size / out_size
    support = (interp * 0.5) * scale if scale >= 1.0 else interp * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    max_taps = int(np.ceil(support)) * 2 + 1
    index = np.zeros((out_size, max_taps), np.int64)
    weights = np.zeros((out_size, max_taps), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(int(center + support + 0.5), in_size) - xmin
        xsize = min(max(xsize, 0), max_taps)
        j = np.arange(xsize)
        w = fn((j + xmin - center + 0.5) * invscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        index[i, :xsize] = xmin + j
        index[i, xsize:] = xmin          # zero weight, any valid index
        weights[i, :xsize] = w
    wt_max = weights.max()
    precision = 0
    while precision < 22:
        if int(0.5 + wt_max * (1 << (precision + 1))) >= (1 << 15):
            break
        precision += 1
    scaled = weights * (1 << precision)
    ints = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return index, ints, precision


def _aa_pass(image: np.ndarray, out_size: int, axis: int, mode: str) -> np.ndarray:
    """Resample uint8 ``image [H,W,C]`` along ``axis`` (0: rows, 1: columns) to ``out_size``."""
    index, weights, precision = _aa_weights(image.shape[axis], out_size, mode)
    # int32 is exact: |weights| < 2**15 and at most 2*ceil(support)+1 taps of values <= 255
    src = image.astype(np.int32)
    w32 = weights.astype(np.int32)
    acc = None
    for t in range(index.shape[1]):
        if axis == 1:
            term = src[:, index[:, t], :] * w32[None, :, t, None]
        else:
            term = src[index[:, t], :, :] * w32[:, t, None, None]
        acc = term if acc is None else acc + term
    acc = (acc + (1 << (precision - 1))) >> precision
    return np.clip(acc, 0, 255).astype(np.uint8)


def resize_rgb(image: np.ndarray, size: tuple[int, int], resample: str = "ffmpeg_bilinear") -> np.ndarray:
    """Resize ``image [H,W,3] uint8`` to ``size = (height, width)``; returns ``[h,w,3]`` uint8.

    ``resample``: ``ffmpeg_bilinear`` (FFmpeg swscale via PyAV), or ``bicubic_aa`` /
    ``bilinear_aa`` (antialiased, bit-exact with ``torch.nn.functional.interpolate(uint8,
    mode=..., antialias=True, align_corners=False)`` on CPU, which torchvision's and
    transformers' video processors call; within 1 level of Pillow's ``Image.resize``). Returns
    the input unchanged when it already has that size. Raises ValueError for an unknown
    ``resample``."""
    h, w = int(size[0]), int(size[1])
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"unknown resample {resample!r} (allowed: {', '.join(RESAMPLE_MODES)})")
    if image.shape[0] == h and image.shape[1] == w:
        return image
    if resample == "ffmpeg_bilinear":
        return _ffmpeg_resize(image, h, w)
    out = image
    if out.shape[1] != w:                                             # horizontal pass first
        out = _aa_pass(out, w, 1, resample)
    if out.shape[0] != h:
        out = _aa_pass(out, h, 0, resample)
    return out


def preprocess_frame(image: np.ndarray, size, mean, std, resample: str = "ffmpeg_bilinear",
                     rescale_factor: float = 1.0 / 255.0) -> np.ndarray:
    """``image [H,W,3] uint8 RGB`` -> ``pixel_values [1,3,h,w] float32``: resize to ``size``
    (h, w) with ``resample`` (:func:`resize_rgb`), then ``(x - mean/rescale_factor) /
    (std/rescale_factor)`` per channel in float32 (transformers' fused rescale + normalize,
    i.e. ``(x * rescale_factor - mean) / std``).

    Raises ValueError for an image that is not ``[H,W,3]`` uint8 or an unknown ``resample``."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"frame must be an [H,W,3] uint8 RGB array, got shape {shape} dtype {dtype}")
    img = resize_rgb(image, size, resample).astype(np.float32)
    inv = 1.0 / rescale_factor
    m = np.asarray(mean, np.float32) * np.float32(inv)
    s = np.asarray(std, np.float32) * np.float32(inv)
    img = (img - m) / s
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


# ---------------------------------------------------------------------- encoder and reducer
class EncoderStage:
    """Encoder step of a session. :meth:`run` returns ``(visual_tokens [1,N,C], mode)`` with
    mode one of ``full``, ``refresh``, ``reuse``, ``skip``."""

    def __init__(self, plan, backend):
        self.plan = plan
        self.backend = backend
        params = (plan.encoder or {}).get("params", {})
        self.reuse = plan.encoder is not None
        self.refresh_every = int(params.get("refresh_every", 1))
        self.skip_threshold = float(params.get("skip_threshold", 0.0))
        self.refs: np.ndarray | None = None
        if self.reuse:
            spec = next(s for s in plan.engines[VISION_ENCODER_REUSE].inputs if s.name == ENCODER_REFS)
            self.refs = np.zeros(spec.shape, dtype=DTYPES[spec.dtype].numpy)
        self._have_refs = False
        self._since_refresh = 0
        self._last_pixels: np.ndarray | None = None
        self._last_tokens: np.ndarray | None = None
        self._std = np.asarray(plan.image_std, np.float32)[None, :, None, None]
        self.last_change: float | None = None      # pixel change of the latest frame (skip metric)

    def pixel_change(self, pixels: np.ndarray) -> float:
        """Mean absolute difference, in [0, 1] pixel units, between ``pixels [1,3,H,W]``
        (normalised) and the last encoded frame; ``inf`` before any frame was encoded."""
        if self._last_pixels is None:
            return float("inf")
        return float(np.mean(np.abs(pixels - self._last_pixels) * self._std))

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, str]:
        if self.skip_threshold > 0:
            self.last_change = self.pixel_change(pixels)
            if self.last_change < self.skip_threshold:
                return self._last_tokens, "skip"
        if not self.reuse:
            tokens, mode = self.backend.run(VISION_ENCODER, {PIXEL_VALUES: pixels})[VISUAL_TOKENS], "full"
        elif not self._have_refs or self._since_refresh >= self.refresh_every:
            out = self.backend.run(VISION_ENCODER, {PIXEL_VALUES: pixels})
            np.copyto(self.refs, out[ENCODER_REFS])
            self._have_refs, self._since_refresh = True, 1
            tokens, mode = out[VISUAL_TOKENS], "refresh"
        else:
            tokens = self.backend.run(VISION_ENCODER_REUSE, {PIXEL_VALUES: pixels,
                                                             ENCODER_REFS: self.refs})[VISUAL_TOKENS]
            self._since_refresh += 1
            mode = "reuse"
        if self.skip_threshold > 0:
            self._last_pixels, self._last_tokens = pixels.copy(), tokens
        return tokens, mode


@dataclass
class ReducedFrame:
    """A frame's tokens for the decoder: the valid prefix ``tokens [1,n,C]``, position offsets
    of those tokens (``positions: keep``) or None, the budget the frame ran at, and
    ``reserved``: with ``positions: keep``, the positions the frame still occupies after its
    last kept token (its trailing dropped tokens; all N when it keeps none), 0 otherwise.

    With ``positions: keep`` a frame spans its N encoder tokens' positions whatever it keeps
    (the reference's "positional reservation", techniques.md §4.2): token j of the frame sits at
    ``frame start + offsets[j]`` and the next token at ``frame start + N``. The session passes
    ``offsets`` to the cache policy's ``plan_step`` and ``reserved`` to its
    ``reserve_positions``; policies that renumber positions contiguously ignore both."""

    tokens: np.ndarray
    n_valid: int
    offsets: np.ndarray | None
    budget: int
    reserved: int = 0


class ReducerStage:
    """Reducer step of a session over the plan's budget buckets (:attr:`budgets`, ascending)."""

    def __init__(self, plan, backend):
        self.plan = plan
        self.backend = backend
        self.reducer = plan.reducer
        self.budgets: list[int] = list(plan.budgets or [plan.tokens_per_frame])
        self.engine_of = {b: plan.reducer_engine(b) for b in self.budgets}    # bucket -> engine, read per frame
        self.state: dict[str, np.ndarray] = {}
        self.first_frame_full = False
        self.keep_positions = False
        self.frames = 0
        if self.reducer is not None:
            engine = plan.engines[self.engine_of[self.budgets[-1]]]
            for spec in engine.inputs:
                if spec.name in self.reducer.get("state", []):
                    self.state[spec.name] = np.zeros(spec.shape, dtype=DTYPES[spec.dtype].numpy)
            self.first_frame_full = bool(self.reducer.get("first_frame_full", False))
            self.keep_positions = self.reducer["params"].get("positions") == "keep"

    def resolve(self, budget: int | None) -> int:
        """The bucket to run: ``budget`` itself, or the largest for None. ValueError for a
        budget that is not a bucket of the plan."""
        if budget is None:
            return self.budgets[-1]
        if isinstance(budget, bool) or int(budget) != budget or int(budget) not in self.budgets:
            raise ValueError(f"token budget {budget!r} is not a compiled bucket (buckets: "
                             f"{', '.join(map(str, self.budgets))})")
        return int(budget)

    def run(self, tokens: np.ndarray, budget: int) -> ReducedFrame:
        """Reduce ``tokens [1,N,C]`` at bucket ``budget`` (from :meth:`resolve`).

        Raises RuntimeError if the engine breaks the contract (valid tokens not a prefix)."""
        n = tokens.shape[1]
        if self.reducer is None:
            return ReducedFrame(tokens, n, None, n)
        feeds = {VISUAL_TOKENS: tokens, **self.state}
        out = self.backend.run(self.engine_of[budget], feeds)
        for name, buf in self.state.items():
            np.copyto(buf, out[f"next_{name}"])
        self.frames += 1
        if self.first_frame_full and self.frames == 1:
            return ReducedFrame(tokens, n, None, n)
        keep = out[KEEP_MASK][0]
        n_valid = int(keep.sum())
        if not keep[:n_valid].all():
            raise RuntimeError(f"reducer engine {self.engine_of[budget]} returned valid tokens "
                               f"that are not a prefix: keep_mask {keep.astype(int).tolist()}")
        if not self.keep_positions:
            return ReducedFrame(out[TOKENS][:, :n_valid], n_valid, None, budget)
        offsets = out[SOURCE_INDEX][0][:n_valid].astype(np.int64)
        if n_valid and (offsets[0] < 0 or offsets[-1] >= n or (n_valid > 1 and (np.diff(offsets) <= 0).any())):
            raise RuntimeError(f"reducer engine {self.engine_of[budget]} returned source_index "
                               f"{offsets.tolist()}: not ascending within [0, {n})")
        reserved = n - (int(offsets[-1]) + 1 if n_valid else 0)
        return ReducedFrame(out[TOKENS][:, :n_valid], n_valid, offsets, budget, reserved)


# ---------------------------------------------------------------------- the executor
class FramePipeline:
    """The real session's executor (:class:`~streamgraph.runtime.stream.Executor`): one
    frame through preprocess -> encode -> reduce -> prefill, calibration by probing, and
    questions through the decoder.

    ``plan``: the bundle's plan; ``backend``: the session's guarded backend; ``decoder``: its
    :class:`~streamgraph.runtime.decoder.Decoder` (holding the KV buffer and cache policy).
    ``budgets`` lists the token budget buckets a frame can run at (ascending)."""

    def __init__(self, plan, backend, decoder, owner=None):
        self.plan = plan
        self.owner = owner                  # the stream whose clock an answer turn's close spends
        self.backend = backend
        self.decoder = decoder
        self.encoder_stage = EncoderStage(plan, backend)
        self.reducer_stage = ReducerStage(plan, backend)
        self.budgets = self.reducer_stage.budgets          # ascending token-budget buckets
        self.stage: str | None = None
        self._pixel_dtype = DTYPES[plan.engines[VISION_ENCODER].inputs[0].dtype].numpy
        self._resize = (plan.image_size, plan.image_mean, plan.image_std, plan.resample, plan.rescale_factor)

    @property
    def clock(self):
        return self.owner.clock

    @property
    def slots_in_use(self) -> int:
        return self.decoder.policy.slots_in_use

    @property
    def kv_bytes(self) -> int:
        return self.decoder.kv.nbytes

    def begin_frame(self, budget: int | None) -> int | None:
        """Check a forced ``budget`` (ValueError when it is not a bucket) and close an open
        answer turn before the frame is decided (a NaN/Inf while closing is retried by
        :meth:`execute_frame`, which records it)."""
        if budget is not None:
            budget = self.reducer_stage.resolve(budget)
        if self.decoder.answer_open:
            try:
                self.decoder.close_answer(self.clock)
            except NonFiniteError:
                pass
        return budget

    def execute_frame(self, image, budget: int | None = None) -> tuple[dict[str, float], int, dict]:
        """Run one frame (see :class:`~streamgraph.runtime.stream.Executor`). A frame that
        fails is not committed: the KV buffer and the cache policy are written only after a
        finite decoder step, and the reducer state is put back here (the encoder's caches,
        finite functions of the frame's pixels, are kept)."""
        dec = self.decoder
        if dec.answer_open:
            self.stage = "prefill"
            dec.close_answer(self.clock)
        reducer = self.reducer_stage
        saved = ({k: v.copy() for k, v in reducer.state.items()}, reducer.frames)
        try:
            stage_s, n_valid, used, mode = self._run_frame(image, reducer.resolve(budget))
        except BaseException:
            for k, v in saved[0].items():
                np.copyto(reducer.state[k], v)
            reducer.frames = saved[1]
            raise
        return stage_s, n_valid, {"budget": used, "encoder": mode}

    def _run_frame(self, image, budget: int, commit: bool = True) -> tuple[dict[str, float], int, int, str]:
        """preprocess -> encode -> reduce -> prefill; returns seconds per stage, tokens kept,
        the budget used and the encoder path (full/refresh/reuse/skip). Only the valid prefix
        of the reduced tokens is prefilled; a frame with none skips the decoder. With
        ``commit=False`` the decoder step runs but nothing is written to the KV cache."""
        stage_s: dict[str, float] = {}
        t0 = time.perf_counter()
        self.stage = "preprocess"
        pixels = preprocess_frame(image, *self._resize).astype(self._pixel_dtype, copy=False)
        t1 = time.perf_counter()
        stage_s["preprocess"] = t1 - t0
        self.stage = "encode"
        tokens, mode = self.encoder_stage.run(pixels)
        t2 = time.perf_counter()
        stage_s["encode"] = t2 - t1
        self.stage = "reduce"
        reduced = self.reducer_stage.run(tokens, budget)
        if self.plan.reducer is not None:
            t3 = time.perf_counter()
            stage_s["reduce"] = t3 - t2
            t2 = t3
        self.stage = "prefill"
        if reduced.n_valid and commit:
            self.decoder.prefill_frame(reduced.tokens, reduced.n_valid, reduced.offsets)
        elif reduced.n_valid:
            self.decoder.probe(reduced.tokens, reduced.n_valid)
        if commit and reduced.reserved:     # positions: keep: the frame spans all N positions
            self.decoder.policy.reserve_positions(reduced.reserved)
        stage_s["prefill"] = time.perf_counter() - t2
        return stage_s, reduced.n_valid, reduced.budget, mode

    def calibrate_costs(self, costs, repeats: int = 2) -> None:
        """Measure every stage at every budget bucket on a blank frame, without touching the
        KV cache or the encoder/reducer state (scratch stages; the decoder probes), and set
        the median of ``repeats`` runs (seconds) into ``costs``. The first run per bucket is a
        warm-up and is discarded."""
        h, w = self.plan.image_size
        image = np.zeros((h, w, 3), dtype=np.uint8)
        live = self.encoder_stage, self.reducer_stage
        try:
            for budget in self.budgets:
                self.encoder_stage = EncoderStage(self.plan, self.backend)   # scratch state
                self.reducer_stage = ReducerStage(self.plan, self.backend)
                samples: dict[str, list[float]] = {}
                for i in range(repeats + 1):
                    stage_s, *_ = self._run_frame(image, budget, commit=False)
                    for k, v in stage_s.items():
                        if i:
                            samples.setdefault(k, []).append(v)
                for k, v in samples.items():
                    costs.set(k, float(np.median(v)), budget)
        finally:
            self.encoder_stage, self.reducer_stage = live
            self.stage = None

    def answer(self, rec, max_new_tokens: int | None, clock) -> Iterator[str]:
        """The decoder's greedy answer (:meth:`~streamgraph.runtime.decoder.Decoder.answer`)."""
        return self.decoder.answer(rec, max_new_tokens, clock)
