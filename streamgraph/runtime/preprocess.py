"""Frame preprocessing for the vision encoder (numpy + PyAV, torch-free)."""
from __future__ import annotations

import av
import numpy as np


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``image [H,W,3] uint8`` to ``size = (height, width)`` with FFmpeg's bilinear
    scaler (via PyAV). Returns the input unchanged when it already has that size."""
    h, w = int(size[0]), int(size[1])
    if image.shape[0] == h and image.shape[1] == w:
        return image
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    return frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BILINEAR")


def preprocess_frame(image: np.ndarray, size, mean, std) -> np.ndarray:
    """``image [H,W,3] uint8 RGB`` -> ``pixel_values [1,3,h,w] float32``: resize to ``size``
    (h, w), scale to [0,1], normalise per channel with ``mean``/``std``.

    Raises ValueError for an image that is not ``[H,W,3]`` uint8."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"frame must be an [H,W,3] uint8 RGB array, got shape {shape} dtype {dtype}")
    img = resize_rgb(image, size).astype(np.float32) * (1.0 / 255.0)
    img = (img - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])
