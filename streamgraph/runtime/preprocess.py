"""Frame preprocessing for the vision encoder (numpy + PyAV, torch-free).

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
"""
from __future__ import annotations

import functools

import av
import numpy as np

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
