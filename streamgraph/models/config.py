"""Dataclass configs of the model family streamgraph compiles (torch-free).

The architecture is LLaVA-OneVision's: a SigLIP-style ViT (the hidden states
``feature_layers`` selects — by default the last encoder layer — with no post-layernorm, as
``vision_feature_layer`` selects in transformers' LlavaOnevision), a 2-layer GELU MLP
projector, optionally LLaVA-OneVision's 2x2 bilinear video pooling (``video_pooling``), and a
Qwen2-style decoder (RMSNorm, GQA, RoPE, SwiGLU MLP, q/k/v bias). Field names follow the
Hugging Face configs so a checkpoint's ``config.json`` maps one-to-one
(:mod:`streamgraph.models.hf`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP-style ViT. ``image_size`` is (height, width) in pixels."""

    image_size: tuple[int, int] = (64, 64)
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    layer_norm_eps: float = 1e-6
    feature_layers: tuple[int, ...] = (-1,)
    """Indices into the tower's hidden states (0 = patch embeddings, i = output of layer i,
    negative counts from the end, as transformers' ``vision_feature_layer``); several are
    concatenated along channels. Only the layers up to the deepest one are built."""

    @property
    def layers_used(self) -> int:
        """Encoder layers actually computed: the deepest layer :attr:`feature_layers` reads."""
        n = self.num_hidden_layers
        return max(i if i >= 0 else n + 1 + i for i in self.feature_layers)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        """Visual tokens per frame at the encoder output (N)."""
        r, c = self.grid
        return r * c


@dataclass(frozen=True)
class TextConfig:
    """Qwen2-style decoder with grouped-query attention."""

    vocab_size: int = 272
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class VLMConfig:
    """Whole model: vision tower, projector, decoder and image normalisation constants."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_hidden_act: str = "gelu"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    projector_bias: bool = True
    """Whether the projector's two linears have biases (``multimodal_projector_bias``)."""
    video_pooling: str | None = None
    """``"bilinear_2x"``: LLaVA-OneVision's video path, a bilinear resize of each frame's
    projected patch grid to ``ceil(h/2) x ceil(w/2)`` inside the encoder engine; ``None``: the
    encoder emits every patch."""
    image_newline: bool = False
    """Whether the model has LLaVA-OneVision's ``image_newline`` embedding (appended once
    after a video's frames)."""
    resample: str = "ffmpeg_bilinear"
    """Frame resize of the runtime (:func:`streamgraph.runtime.pipeline.resize_rgb`):
    ``ffmpeg_bilinear``, ``bilinear_aa`` or ``bicubic_aa``."""
    rescale_factor: float = 1.0 / 255.0
    """Pixel scale applied before normalisation."""

    @property
    def encoder_grid(self) -> tuple[int, int]:
        """Token grid (rows, cols) of one frame at the encoder engine's output."""
        r, c = self.vision.grid
        if self.video_pooling == "bilinear_2x":
            return -(-r // 2), -(-c // 2)
        return r, c

    @property
    def encoder_tokens(self) -> int:
        """Visual tokens per frame at the encoder engine's output (N)."""
        r, c = self.encoder_grid
        return r * c

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        """Inverse of :meth:`to_dict`; fields missing from older manifests take defaults."""
        v = dict(d["vision"])
        v["image_size"] = tuple(v["image_size"])
        if "feature_layers" in v:
            v["feature_layers"] = tuple(v["feature_layers"])
        extra = {k: d[k] for k in ("projector_bias", "video_pooling", "image_newline", "resample",
                                   "rescale_factor") if k in d}
        return cls(
            vision=VisionConfig(**v),
            text=TextConfig(**d["text"]),
            projector_hidden_act=d["projector_hidden_act"],
            image_mean=tuple(d["image_mean"]),
            image_std=tuple(d["image_std"]),
            **extra,
        )


PRESETS: dict = {}     # preset name -> config factory(frame_size); filled at the end of the module


def tiny_config(frame_size: tuple[int, int] = (64, 64)) -> VLMConfig:
    """The ``tiny`` preset: 2-layer ViT (patch 8) and 2-layer GQA decoder, width 64.

    ``frame_size`` (height, width) must be a multiple of the patch size (8).
    Raises ValueError otherwise.
    """
    h, w = frame_size
    if h % 8 or w % 8:
        raise ValueError(f"frame_size {h}x{w} must be a multiple of the tiny preset's patch size 8")
    return VLMConfig(vision=VisionConfig(image_size=(h, w)), text=TextConfig())


def small_config(frame_size: tuple[int, int] = (224, 224)) -> VLMConfig:
    """The ``small`` preset, sized so that encoder and prefill costs are measurable on a CPU:
    4-layer ViT (width 192, 3 heads, patch 14: 224x224 px -> 16x16 = 256 visual tokens) and a
    4-layer GQA decoder (width 256, 8 query / 2 KV heads of 32).

    ``frame_size`` (height, width) must be a multiple of the patch size (14).
    Raises ValueError otherwise.
    """
    h, w = frame_size
    if h % 14 or w % 14:
        raise ValueError(f"frame_size {h}x{w} must be a multiple of the small preset's patch size 14")
    vision = VisionConfig(image_size=(h, w), patch_size=14, hidden_size=192, intermediate_size=768,
                          num_hidden_layers=4, num_attention_heads=3)
    text = TextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=32)
    return VLMConfig(vision=vision, text=text)


PRESETS.update(tiny=tiny_config, small=small_config)
