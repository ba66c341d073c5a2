"""LLaVA-OneVision frame preprocessing (runtime, numpy) vs what transformers runs.

transformers' ``LlavaOnevisionVideoProcessor`` needs torchvision, which has no CPU wheel in
this environment, so it cannot run here (its test below is skipped without torchvision).
What it runs is pinned instead: for uint8 frames on CPU, ``torchvision.transforms.v2.
functional.resize(BICUBIC, antialias=True)`` calls ``torch.nn.functional.interpolate(uint8,
mode="bicubic", antialias=True, align_corners=False)`` (torch is here), and transformers'
``TorchvisionBackend.rescale_and_normalize`` computes ``(x - mean/rescale) / (std/rescale)`` in
float32. streamgraph's numpy port is compared with both bit for bit, and with transformers'
``LlavaOnevisionImageProcessorPil`` (which runs here: Pillow's resize) within its rounding.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamgraph.runtime.pipeline import preprocess_frame, resize_rgb
from tests.conftest import VTEST

transformers = pytest.importorskip("transformers")


def _real_frames():
    from streamgraph.runtime.sources import sample_clip, video

    out = [f.image for f in video(sample_clip(), fps=1, max_frames=2)]              # 192x256
    if VTEST.exists():
        out += [f.image for f in video(VTEST, fps=1, max_frames=2)]                 # 576x768
    return out


def _torch_resize(image: np.ndarray, size, mode: str) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, size=tuple(size), mode=mode, antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_is_bit_exact_with_torch_antialiased_uint8_resize(mode):
    rng = np.random.default_rng(0)
    images = _real_frames() + [rng.integers(0, 256, s + (3,), dtype=np.uint8)
                               for s in [(30, 20), (17, 333), (100, 120), (480, 640)]]
    for img in images:
        for size in [(384, 384), (40, 40), (27, 14)]:
            ours = resize_rgb(img, size, f"{mode}_aa")
            assert ours.shape == size + (3,) and ours.dtype == np.uint8
            np.testing.assert_array_equal(ours, _torch_resize(img, size, mode), err_msg=f"{img.shape}->{size}")


def test_pixel_values_are_transformers_video_processing(hf_checkpoint):
    """preprocess_frame with the checkpoint's video_preprocessor_config.json == resize as
    torchvision does + transformers' fused rescale/normalize, exactly."""
    from streamgraph.models.hf import open_checkpoint

    path, _ = hf_checkpoint
    raw = json.loads((path / "video_preprocessor_config.json").read_text())
    ckpt = open_checkpoint(path)
    cfg = ckpt.cfg
    assert cfg.resample == "bicubic_aa" and raw["resample"] == 3            # PIL BICUBIC
    assert list(cfg.image_mean) == raw["image_mean"] and list(cfg.image_std) == raw["image_std"]
    assert cfg.vision.image_size == (raw["size"]["height"], raw["size"]["width"])
    mean = torch.tensor(raw["image_mean"]) * (1.0 / raw["rescale_factor"])   # _fuse_mean_std_and_rescale_factor
    std = torch.tensor(raw["image_std"]) * (1.0 / raw["rescale_factor"])
    for img in _real_frames():
        ours = preprocess_frame(img, cfg.vision.image_size, cfg.image_mean, cfg.image_std, cfg.resample,
                                cfg.rescale_factor)
        x = torch.from_numpy(_torch_resize(img, cfg.vision.image_size, "bicubic")).permute(2, 0, 1)[None]
        ref = (x.to(torch.float32) - mean[:, None, None]) / std[:, None, None]   # tvF.normalize
        np.testing.assert_array_equal(ours, ref.numpy())


def test_defaults_are_the_video_processor_class_defaults(hf_checkpoint, tmp_path):
    """Fields a video_preprocessor_config.json leaves out take LlavaOnevisionVideoProcessor's
    class defaults (OPENAI CLIP mean/std, bicubic, 1/255)."""
    import shutil

    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from streamgraph.models.hf import open_checkpoint

    d = tmp_path / "c"
    shutil.copytree(hf_checkpoint[0], d)
    (d / "video_preprocessor_config.json").write_text(json.dumps({"size": {"height": 40, "width": 40}}))
    cfg = open_checkpoint(d).cfg
    assert list(cfg.image_mean) == list(OPENAI_CLIP_MEAN) and list(cfg.image_std) == list(OPENAI_CLIP_STD)
    assert cfg.resample == "bicubic_aa" and cfg.rescale_factor == pytest.approx(1 / 255)


def test_pixel_values_match_the_pil_image_processor_within_rounding():
    """transformers' LlavaOnevisionImageProcessorPil resizes each frame (its base patch) with
    Pillow; Pillow's and torch's antialiased bicubic differ only in fixed-point rounding."""
    proc = transformers.LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    level = 1.0 / 255 / 0.5
    for img in _real_frames():
        base = proc(images=[img], return_tensors="np")["pixel_values"][0][0]
        ours = preprocess_frame(img, (384, 384), [0.5] * 3, [0.5] * 3, "bicubic_aa")[0]
        diff = np.abs(base - ours)
        assert diff.max() <= 2 * level + 1e-5, diff.max() / level
        assert (diff > 1e-5).mean() < 0.005                         # almost every value is equal


def test_video_processor_itself_when_torchvision_is_installed(hf_checkpoint):
    pytest.importorskip("torchvision")
    from transformers import LlavaOnevisionVideoProcessor

    path, _ = hf_checkpoint
    proc = LlavaOnevisionVideoProcessor.from_pretrained(path)
    imgs = _real_frames()[:1]
    ref = proc(videos=[np.stack(imgs)], return_tensors="np")["pixel_values_videos"][0]
    from streamgraph.models.hf import open_checkpoint

    cfg = open_checkpoint(path).cfg
    ours = np.concatenate([preprocess_frame(i, cfg.vision.image_size, cfg.image_mean, cfg.image_std,
                                            cfg.resample, cfg.rescale_factor) for i in imgs])
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
