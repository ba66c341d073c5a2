"""Load a local Hugging Face checkpoint of LLaVA-OneVision (SigLIP + Qwen2) into streamgraph.

A graph's ``model: {hf: DIR}`` points at a directory as ``save_pretrained`` (or a hub
download such as ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``) leaves it. Nothing is ever
fetched from a hub. What is read:

* ``config.json`` — ``model_type: llava_onevision`` with a ``siglip_vision_model`` vision
  config and a ``qwen2`` text config (the only supported combination; see :data:`SUPPORTED`);
* weights — ``model.safetensors``, or the shards listed in ``model.safetensors.index.json``.
  Pickle weights (``.bin``, ``.pt``, ``.pth``) are refused (:class:`PickleWeightsError`):
  unpickling runs arbitrary code;
* ``tokenizer.json`` (loaded at runtime with the ``tokenizers`` library) and
  ``tokenizer_config.json`` (special tokens);
* the chat template — ``chat_template.jinja``, ``chat_template.json`` or
  ``tokenizer_config.json["chat_template"]`` — rendered once at compile time into the four
  text pieces a streaming session needs (:func:`prompt_format`);
* the video processor's settings — frame size, resample filter, rescale factor, mean and std
  — where transformers' ``LlavaOnevisionVideoProcessor.from_pretrained`` finds them:
  ``processor_config.json``'s nested ``video_processor`` (what ``processor.save_pretrained``
  of transformers 5 writes), else ``video_preprocessor_config.json``, else
  ``preprocessor_config.json``; last, ``processor_config.json``'s nested ``image_processor``
  (a processor saved without a video processor);
* ``generation_config.json`` (optional) — end-of-sequence ids.

Weight names are mapped onto streamgraph's modules for three layouts:

=========================================  ================================================
checkpoint key                              streamgraph key
=========================================  ================================================
``vision_tower.vision_model.X`` (hub,       ``vision_tower.X``
transformers 4), ``vision_tower.X``
(transformers 5 ``save_pretrained``),
``model.vision_tower[.vision_model].X``
(transformers 5 module names)
``language_model.model.X``,                 ``language_model.X``
``model.language_model.X``
``language_model.lm_head.weight``,          ``lm_head.weight``
``lm_head.weight``
``[model.]multi_modal_projector.X``         ``multi_modal_projector.X``
``[model.]image_newline``                   ``image_newline``
=========================================  ================================================

SigLIP's ``post_layernorm`` and attention-pooling ``head`` and the encoder layers deeper than
``vision_feature_layer`` are not used by LLaVA-OneVision and are skipped.

Reference implementation: transformers' ``LlavaOnevisionForConditionalGeneration``
(``transformers/models/llava_onevision/``); paper: Li et al., "LLaVA-OneVision: Easy Visual
Task Transfer", arXiv:2408.03326.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamgraph.contract import DTYPES
from streamgraph.errors import StreamgraphError
from streamgraph.models.config import TextConfig, VisionConfig, VLMConfig

__all__ = [
    "CheckpointError", "PickleWeightsError", "UnsupportedModelError", "SUPPORTED", "Checkpoint",
    "open_checkpoint", "map_weight_name", "load_model", "read_tensor", "checkpoint_sha256", "prompt_format",
    "render_chat_template",
]

#: model_type -> (vision model_type, text model_type) streamgraph can compile.
SUPPORTED: dict[str, tuple[str, str]] = {"llava_onevision": ("siglip_vision_model", "qwen2")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Class defaults of transformers 5.23's configs, used for fields a config.json omits.
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# LlavaOnevisionConfig's vision defaults when config.json has no vision_config at all
_OV_VISION_DEFAULTS = dict(_SIGLIP_DEFAULTS, hidden_size=1152, intermediate_size=4304, patch_size=14,
                           image_size=384, num_hidden_layers=26, num_attention_heads=16)
_QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                       num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                       rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
_OV_DEFAULTS = dict(image_token_index=151646, video_token_index=151647, projector_hidden_act="gelu",
                    vision_feature_select_strategy="full", vision_feature_layer=-1,
                    multimodal_projector_bias=True, tie_word_embeddings=False)
# LlavaOnevisionVideoProcessor class defaults (OPENAI_CLIP mean/std, 384x384, bicubic)
_VIDEO_PROCESSOR_DEFAULTS = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
                                 do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711])
_RESAMPLE = {2: "bilinear_aa", 3: "bicubic_aa"}      # PIL.Image.Resampling values
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")


class CheckpointError(StreamgraphError):
    """A checkpoint directory is missing, incomplete, inconsistent or not supported.

    ``str()`` is one line starting with the directory."""


class PickleWeightsError(CheckpointError):
    """The checkpoint has only pickle weights (``.bin``/``.pt``/``.pth``), which streamgraph
    refuses to load."""


class UnsupportedModelError(CheckpointError):
    """``config.json`` names an architecture streamgraph cannot compile."""


def _supported_text() -> str:
    return "; ".join(f"{m} with vision {v} and text {t}" for m, (v, t) in SUPPORTED.items())


@dataclass
class Checkpoint:
    """Everything read from a checkpoint directory except tensor data.

    ``cfg`` is the streamgraph model config; ``weight_files`` the safetensors files in load
    order; ``files`` the relative names of every file streamgraph read (hashed into the lock
    key by :func:`checkpoint_sha256`); ``preprocessor_file`` names the file the frame
    preprocessing came from, with the nested section for ``processor_config.json`` (e.g.
    ``processor_config.json (video_processor)``)."""

    path: Path
    config: dict
    cfg: VLMConfig
    weight_files: list[Path]
    tokenizer_file: Path
    tokenizer_config: dict
    chat_template: str
    chat_template_file: str
    preprocessor: dict
    preprocessor_file: str
    image_token_id: int
    video_token_id: int
    video_token: str
    generation_config: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def error(self, message: str, cls: type[CheckpointError] | None = None) -> CheckpointError:
        """A ``cls`` (default :class:`CheckpointError`) for ``message``, prefixed with the
        directory; the caller raises it."""
        return (cls or CheckpointError)(f"{self.path}: {message}")


def _read_json(path: Path, root: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{root}: cannot read {path.name}: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{root}: {path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{root}: {path.name} must hold a JSON object")
    return data


def _weight_files(root: Path) -> tuple[list[Path], list[str]]:
    """Safetensors files of ``root`` (and the names read). Raises PickleWeightsError /
    CheckpointError."""
    index = root / INDEX_FILE
    if index.is_file():
        data = _read_json(index, root)
        wmap = data.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{root}: {INDEX_FILE} has no weight_map")
        names = list(dict.fromkeys(wmap.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CheckpointError(f"{root}: {INDEX_FILE} lists {len(missing)} missing shard(s): "
                                  f"{', '.join(missing[:3])}")
        return [root / n for n in names], [INDEX_FILE, *names]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE], [SINGLE_FILE]
    others = sorted(p.name for p in root.glob("*.safetensors"))
    if len(others) == 1:
        return [root / others[0]], others
    if others:
        raise CheckpointError(f"{root}: several .safetensors files ({', '.join(others[:3])}) but no "
                              f"{INDEX_FILE} saying which belong to the model")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleWeightsError(
            f"{root}: only pickle weights found ({', '.join(pickles[:3])}); streamgraph loads "
            f"safetensors only (unpickling can run arbitrary code): convert them with "
            f"transformers, e.g. model.save_pretrained(DIR, safe_serialization=True)")
    raise CheckpointError(f"{root}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


def _get(d: dict, key: str, defaults: dict):
    v = d.get(key)
    return defaults[key] if v is None else v


def _vlm_config(root: Path, config: dict, pre: dict) -> VLMConfig:
    mt = config.get("model_type")
    if mt not in SUPPORTED:
        raise UnsupportedModelError(f"{root}: unsupported model_type {mt!r} in config.json "
                                    f"(supported: {_supported_text()})")
    want_v, want_t = SUPPORTED[mt]
    vc = config.get("vision_config")
    vdef = _SIGLIP_DEFAULTS if vc is not None else _OV_VISION_DEFAULTS
    vc = vc or {"model_type": want_v}
    tc = config.get("text_config") or {"model_type": want_t}
    for part, sub, want in (("vision_config", vc, want_v), ("text_config", tc, want_t)):
        if sub.get("model_type") != want:
            raise UnsupportedModelError(f"{root}: {part}.model_type is {sub.get('model_type')!r}; "
                                        f"supported: {_supported_text()}")
    top = dict(_OV_DEFAULTS, **{k: v for k, v in config.items() if v is not None})

    def bad(msg: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{root}: {msg}")

    if _get(vc, "hidden_act", vdef) not in _GELU_TANH:
        raise bad(f"vision_config.hidden_act {vc.get('hidden_act')!r} is not supported "
                  f"(SigLIP uses gelu_pytorch_tanh)")
    size = _get(vc, "image_size", vdef)
    image_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    n_layers = int(_get(vc, "num_hidden_layers", vdef))
    layer = top["vision_feature_layer"]
    layers = (int(layer),) if isinstance(layer, int) else tuple(int(x) for x in layer)
    if not layers or any(not -(n_layers + 1) <= i <= n_layers for i in layers):
        raise bad(f"vision_feature_layer {layer!r} is out of range for a {n_layers}-layer vision tower")
    if top["vision_feature_select_strategy"] != "full":
        raise bad(f"vision_feature_select_strategy {top['vision_feature_select_strategy']!r} is not "
                  f"supported: LLaVA-OneVision's video pooling needs the full patch grid ('full')")
    if top["projector_hidden_act"] not in ("gelu", *_GELU_TANH):
        raise bad(f"projector_hidden_act {top['projector_hidden_act']!r} is not supported (gelu)")
    vision = VisionConfig(
        image_size=image_size, patch_size=int(_get(vc, "patch_size", vdef)),
        num_channels=int(_get(vc, "num_channels", vdef)), hidden_size=int(_get(vc, "hidden_size", vdef)),
        intermediate_size=int(_get(vc, "intermediate_size", vdef)), num_hidden_layers=n_layers,
        num_attention_heads=int(_get(vc, "num_attention_heads", vdef)),
        layer_norm_eps=float(_get(vc, "layer_norm_eps", vdef)), feature_layers=layers)

    if _get(tc, "hidden_act", _QWEN2_DEFAULTS) != "silu":
        raise bad(f"text_config.hidden_act {tc.get('hidden_act')!r} is not supported (Qwen2 uses silu)")
    if tc.get("use_sliding_window"):
        raise bad("text_config.use_sliding_window is true; sliding-window attention is not supported")
    if any(t != "full_attention" for t in tc.get("layer_types") or []):
        raise bad("text_config.layer_types has non-full attention layers; not supported")
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise bad(f"RoPE type {rope_type!r} is not supported (only the default, unscaled RoPE)")
    theta = rope.get("rope_theta", tc.get("rope_theta", _QWEN2_DEFAULTS["rope_theta"]))
    heads = int(_get(tc, "num_attention_heads", _QWEN2_DEFAULTS))
    hidden = int(_get(tc, "hidden_size", _QWEN2_DEFAULTS))
    kv_heads = int(tc.get("num_key_value_heads") or heads)
    tie = bool(top["tie_word_embeddings"]) or bool(tc.get("tie_word_embeddings", False))
    text = TextConfig(
        vocab_size=int(_get(tc, "vocab_size", _QWEN2_DEFAULTS)), hidden_size=hidden,
        intermediate_size=int(_get(tc, "intermediate_size", _QWEN2_DEFAULTS)),
        num_hidden_layers=int(_get(tc, "num_hidden_layers", _QWEN2_DEFAULTS)),
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=int(tc.get("head_dim") or hidden // heads),
        rms_norm_eps=float(_get(tc, "rms_norm_eps", _QWEN2_DEFAULTS)), rope_theta=float(theta),
        tie_word_embeddings=tie)
    if heads % kv_heads:
        raise bad(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return VLMConfig(
        vision=vision, text=text, projector_hidden_act=top["projector_hidden_act"],
        image_mean=tuple(float(x) for x in pre["image_mean"]),
        image_std=tuple(float(x) for x in pre["image_std"]),
        projector_bias=bool(top["multimodal_projector_bias"]), video_pooling="bilinear_2x",
        image_newline=True, resample=pre["resample"], rescale_factor=float(pre["rescale_factor"]))


def _preprocessor_settings(root: Path) -> tuple[dict, str, str]:
    """The raw video-processor settings, the file they are in, and a label for messages.

    Order: transformers 5.23's ``BaseVideoProcessor.get_video_processor_dict`` (nested
    ``processor_config.json:video_processor``, then ``video_preprocessor_config.json``, then
    ``preprocessor_config.json``), then the nested ``image_processor`` (the image processor's
    own first choice), so both layouts of ``save_pretrained`` load."""
    nested = {}
    if (root / "processor_config.json").is_file():
        nested = _read_json(root / "processor_config.json", root)
    if isinstance(nested.get("video_processor"), dict):
        return nested["video_processor"], "processor_config.json", "processor_config.json (video_processor)"
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (root / name).is_file():
            return _read_json(root / name, root), name, name
    if isinstance(nested.get("image_processor"), dict):
        return nested["image_processor"], "processor_config.json", "processor_config.json (image_processor)"
    raise CheckpointError(f"{root}: no video or image processor settings (looked for processor_config.json's "
                          f"video_processor/image_processor, video_preprocessor_config.json and "
                          f"preprocessor_config.json); streamgraph needs the checkpoint's frame size, mean and std")


def _preprocessor(root: Path) -> tuple[dict, str, str]:
    """LLaVA-OneVision's per-frame video preprocessing: size, resample, rescale, mean, std;
    with the file it came from and a label naming the file (and nested section)."""
    raw, file, name = _preprocessor_settings(root)
    p = dict(_VIDEO_PROCESSOR_DEFAULTS, **{k: v for k, v in raw.items() if v is not None})
    if not p["do_resize"]:
        raise CheckpointError(f"{root}: {name} has do_resize false; streamgraph resizes every frame "
                              f"to the vision tower's input size")
    if p.get("do_center_crop"):
        raise CheckpointError(f"{root}: {name} has do_center_crop; not supported for video frames")
    size = p.get("size") or {}
    if "height" in size and "width" in size:
        hw = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        hw = (int(size["shortest_edge"]),) * 2
    else:
        raise CheckpointError(f"{root}: {name} has no usable size (need height/width)")
    resample = int(p["resample"]) if not isinstance(p["resample"], str) else p["resample"]
    if resample not in _RESAMPLE:
        raise CheckpointError(f"{root}: {name} resample {p['resample']!r} is not supported "
                              f"(2 = bilinear, 3 = bicubic)")
    mean = p["image_mean"] if p["do_normalize"] else [0.0, 0.0, 0.0]
    std = p["image_std"] if p["do_normalize"] else [1.0, 1.0, 1.0]
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(x) for x in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(x) for x in std]
    return {"size": hw, "resample": _RESAMPLE[resample], "image_mean": mean, "image_std": std,
            "rescale_factor": float(p["rescale_factor"]) if p["do_rescale"] else 1.0}, file, name


def _chat_template(root: Path, tok_cfg: dict) -> tuple[str, str]:
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
    for name, data in (("chat_template.json", None), ("processor_config.json", None),
                       ("tokenizer_config.json", tok_cfg)):
        if data is None:
            if not (root / name).is_file():
                continue
            data = _read_json(root / name, root)
        t = data.get("chat_template")
        if isinstance(t, list):                     # [{"name": ..., "template": ...}]
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        if isinstance(t, str) and t.strip():
            return t, name
    raise CheckpointError(f"{root}: no chat template (looked for chat_template.jinja, chat_template.json "
                          f"and tokenizer_config.json's chat_template); streamgraph needs the "
                          f"checkpoint's prompt format")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint directory without loading tensor data.

    Returns a :class:`Checkpoint`. Raises :class:`CheckpointError` (one line naming the
    directory) for a missing directory, ``config.json``, weights, ``tokenizer.json``, chat
    template or preprocessor config, malformed JSON, or inconsistent special tokens;
    :class:`UnsupportedModelError` for an architecture other than :data:`SUPPORTED` (or an
    unsupported option of it: sliding window, scaled RoPE, ``vision_feature_select_strategy:
    default``, ...); :class:`PickleWeightsError` when only pickle weights are present."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist" if not root.exists()
                              else f"{root}: not a directory (model.hf must name a checkpoint directory)")
    root = root.resolve()
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root}: config.json missing; not a Hugging Face checkpoint directory")
    config = _read_json(root / "config.json", root)
    files = ["config.json"]
    pre, pre_path, pre_file = _preprocessor(root)
    cfg = _vlm_config(root, config, pre)
    if tuple(pre["size"]) != cfg.vision.image_size:
        raise CheckpointError(f"{root}: {pre_file} resizes frames to {pre['size'][0]}x{pre['size'][1]} "
                              f"but the vision tower takes {cfg.vision.image_size[0]}x{cfg.vision.image_size[1]}")
    weights, wnames = _weight_files(root)
    if not (root / "tokenizer.json").is_file():
        raise CheckpointError(f"{root}: tokenizer.json missing (streamgraph's runtime loads the fast "
                              f"tokenizer with the `tokenizers` library; save it with "
                              f"AutoTokenizer.save_pretrained)")
    tok_cfg = _read_json(root / "tokenizer_config.json", root) if (root / "tokenizer_config.json").is_file() else {}
    template, template_file = _chat_template(root, tok_cfg)
    gen = _read_json(root / "generation_config.json", root) if (root / "generation_config.json").is_file() else {}
    top = dict(_OV_DEFAULTS, **{k: v for k, v in config.items() if v is not None})
    image_id = int(config.get("image_token_index", config.get("image_token_id", top["image_token_index"])))
    video_id = int(config.get("video_token_index", config.get("video_token_id", top["video_token_index"])))
    extra = tok_cfg.get("extra_special_tokens")
    video_token = (tok_cfg.get("video_token") or (extra.get("video_token") if isinstance(extra, dict) else None)
                   or "<video>")
    files += wnames + [pre_path, "tokenizer.json", template_file]
    files += [n for n in ("tokenizer_config.json", "generation_config.json") if (root / n).is_file()]
    ckpt = Checkpoint(root, config, cfg, weights, root / "tokenizer.json", tok_cfg, template, template_file,
                      pre, pre_file, image_id, video_id, video_token, gen, list(dict.fromkeys(files)))
    _check_tokenizer(ckpt)
    return ckpt


def _check_tokenizer(ckpt: Checkpoint) -> None:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(ckpt.tokenizer_file))
    except Exception as e:  # tokenizers raises a plain Exception
        raise ckpt.error(f"tokenizer.json cannot be loaded: {e}") from None
    vid = tok.token_to_id(ckpt.video_token)
    if vid is None:
        raise ckpt.error(f"tokenizer has no video token {ckpt.video_token!r}")
    if vid != ckpt.video_token_id:
        raise ckpt.error(f"tokenizer maps {ckpt.video_token!r} to id {vid} but config.json's "
                         f"video_token_index is {ckpt.video_token_id}; tokenizer and model do not match")
    top = max(tok.get_vocab(with_added_tokens=True).values())
    if top >= ckpt.cfg.text.vocab_size:
        raise ckpt.error(f"tokenizer has token id {top} but the model's vocab_size is "
                         f"{ckpt.cfg.text.vocab_size}; tokenizer and model do not match")


# ----------------------------------------------------------------------------- weights
def map_weight_name(key: str) -> str | None:
    """streamgraph parameter name of checkpoint tensor ``key`` (any of the three layouts in the
    module docstring), ``None`` for a tensor LLaVA-OneVision never uses (SigLIP
    ``post_layernorm``/``head``, ``position_ids`` buffers). Raises KeyError for a key of
    another architecture."""
    k = key[len("model."):] if key.startswith("model.") else key
    if k.startswith("vision_tower."):
        rest = k[len("vision_tower."):]
        rest = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
        if rest.startswith(("post_layernorm.", "head.")) or rest.endswith("position_ids"):
            return None
        return "vision_tower." + rest
    if k.startswith("language_model."):
        rest = k[len("language_model."):]
        if rest.startswith("lm_head."):
            return rest
        rest = rest[len("model."):] if rest.startswith("model.") else rest
        return "language_model." + rest
    if k.startswith(("multi_modal_projector.", "lm_head.")) or k == "image_newline":
        return k
    raise KeyError(key)


def _unused_vision_layer(name: str, layers_used: int) -> bool:
    prefix = "vision_tower.encoder.layers."
    if not name.startswith(prefix):
        return False
    return int(name[len(prefix):].split(".", 1)[0]) >= layers_used


def load_model(ckpt: Checkpoint, dtype: str = "float32", device: str = "cpu"):
    """Build :class:`~streamgraph.models.vlm.StreamingVLM` from ``ckpt`` in eval mode.

    ``dtype``: ``"float32"`` or ``"float16"`` (checkpoint tensors — bf16, fp16 or fp32 — are
    cast). ``device="meta"`` checks every tensor's name and shape from the safetensors
    headers but reads no data: the model has the exact parameter shapes and dtypes for
    planning, in no memory. Raises :class:`CheckpointError` for missing, unexpected or
    mis-shaped tensors."""
    import torch
    from safetensors import safe_open

    from streamgraph.models.vlm import StreamingVLM

    tdtype = getattr(torch, DTYPES[dtype].torch)
    cfg = ckpt.cfg
    with torch.device("meta"):
        model = StreamingVLM(cfg).to(tdtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = cfg.text.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    layers_used = cfg.vision.layers_used
    state: dict[str, Any] = {}
    seen: dict[str, str] = {}
    unexpected = []
    for file in ckpt.weight_files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:
            raise ckpt.error(f"{file.name} is not a readable safetensors file: {e}") from None
        with handle as f:
            for key in f.keys():
                try:
                    name = map_weight_name(key)
                except KeyError:
                    unexpected.append(key)
                    continue
                if name is None or _unused_vision_layer(name, layers_used) or (tied and name == "lm_head.weight"):
                    continue
                if name in seen:
                    raise ckpt.error(f"tensor {key!r} maps to {name!r}, already given by {seen[name]!r}")
                seen[name] = key
                if name not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[name]:
                    raise ckpt.error(f"tensor {key!r} has shape {list(shape)} but config.json implies "
                                     f"{list(expected[name])}")
                if device != "meta":
                    state[name] = f.get_tensor(key).to(tdtype)
    if unexpected:
        raise ckpt.error(f"{len(unexpected)} tensor(s) do not belong to a LLaVA-OneVision model: "
                         f"{', '.join(unexpected[:4])}")
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise ckpt.error(f"{len(missing)} tensor(s) missing from the weights: {', '.join(missing[:4])}")
    if device == "meta":
        return model.eval()
    missing_keys, unexpected_keys = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected_keys and set(missing_keys) <= {"lm_head.weight"}, (missing_keys, unexpected_keys)
    if tied:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    emb = model.vision_tower.embeddings
    emb.position_ids = torch.arange(cfg.vision.num_patches)[None]
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    return model.eval()


def read_tensor(ckpt: Checkpoint, name: str):
    """The one checkpoint tensor whose streamgraph name (:func:`map_weight_name`) is ``name``,
    as stored (CPU ``torch.Tensor``), without loading anything else. Raises CheckpointError
    if it is absent."""
    from safetensors import safe_open

    for file in ckpt.weight_files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                try:
                    if map_weight_name(key) == name:
                        return f.get_tensor(key)
                except KeyError:
                    continue
    raise ckpt.error(f"tensor {name!r} missing from the weights")


def checkpoint_sha256(ckpt: Checkpoint) -> dict[str, str]:
    """sha256 of every file streamgraph reads from the checkpoint (config, weights, tokenizer,
    chat template, preprocessor and generation configs), keyed by relative name, in order."""
    out = {}
    for name in ckpt.files:
        h = hashlib.sha256()
        with open(ckpt.path / name, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        out[name] = h.hexdigest()
    return out


# ----------------------------------------------------------------------------- prompt format
_QUESTION, _QUESTION2, _ANSWER = "STREAMGRAPH_QUESTION_1", "STREAMGRAPH_QUESTION_2", "STREAMGRAPH_ANSWER"


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **kwargs) -> str:
    """Render a Hugging Face chat template the way transformers' ``apply_chat_template`` does
    (jinja2 sandbox, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the ``{% generation
    %}`` tag, ``raise_exception``/``strftime_now`` globals, a non-escaping ``tojson``).

    Raises CheckpointError when jinja2 is missing or the template fails."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a compile dependency
        raise CheckpointError(f"rendering the chat template needs jinja2 (pip install 'streamgraph[compile]'): {e}") from None

    class _Generation(Extension):          # transformers' AssistantTracker, without tracking
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **kwargs)
    except jinja2.TemplateError as e:
        raise CheckpointError(f"chat template failed to render: {e}") from None


def _special_kwargs(tok_cfg: dict) -> dict:
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = tok_cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def prompt_format(ckpt: Checkpoint) -> dict:
    """The checkpoint's chat template cut into the pieces of a streaming session::

        prefix  [frames...]  before_question QUESTION after_question  [answer]  after_answer  [frames...] ...

    (``prefix`` is prefilled when a session opens, ``after_answer`` after each answer so the
    next frames start a new user turn). Derived by rendering the template for
    ``[user: video + question]`` and ``[user: video + q, assistant: answer, user: video + q2]``
    with sentinel strings, exactly as ``apply_chat_template`` would render them.

    Returns ``{"prefix", "before_question", "after_question", "after_answer",
    "stop_token_ids"}``; stop ids are the tokenizer's eos token, ``generation_config.json``'s
    ``eos_token_id`` and the special token that ends an assistant turn in the template.
    Raises CheckpointError when the template does not render a video followed by the
    question in each user turn."""
    from tokenizers import Tokenizer

    vt = ckpt.video_token
    kw = _special_kwargs(ckpt.tokenizer_config)

    def user(q):
        return {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}

    a = render_chat_template(ckpt.chat_template, [user(_QUESTION)], True, **kw)
    if a.count(vt) != 1 or a.count(_QUESTION) != 1 or a.index(vt) > a.index(_QUESTION):
        raise ckpt.error(f"chat template ({ckpt.chat_template_file}) does not render a user turn as "
                         f"{vt!r} followed by the question; streamgraph streams frames before the question")
    iv, iq = a.index(vt), a.index(_QUESTION)
    fmt = {"prefix": a[:iv], "before_question": a[iv + len(vt):iq], "after_question": a[iq + len(_QUESTION):]}
    b = render_chat_template(ckpt.chat_template, [
        user(_QUESTION), {"role": "assistant", "content": [{"type": "text", "text": _ANSWER}]}, user(_QUESTION2)],
        True, **kw)
    if b.count(_ANSWER) != 1 or b.count(vt) != 2 or b.rindex(vt) < b.index(_ANSWER):
        raise ckpt.error(f"chat template ({ckpt.chat_template_file}) does not render a second user turn "
                         f"with a video after an answer")
    ia = b.index(_ANSWER)
    iv2 = b.index(vt, ia)
    fmt["after_answer"] = b[ia + len(_ANSWER):iv2]
    tail = b[iv2 + len(vt):]
    if tail != fmt["before_question"] + _QUESTION2 + fmt["after_question"]:
        raise ckpt.error(f"chat template ({ckpt.chat_template_file}) renders later user turns differently "
                         f"from the first; not supported for streaming")
    tok = Tokenizer.from_file(str(ckpt.tokenizer_file))
    stop: list[int] = []
    eos = kw.get("eos_token")
    if eos is not None and tok.token_to_id(eos) is not None:
        stop.append(tok.token_to_id(eos))
    gen_eos = ckpt.generation_config.get("eos_token_id")
    stop += [int(x) for x in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if x is not None]
    added = set(tok.get_added_tokens_decoder())
    end_ids = tok.encode(fmt["after_answer"], add_special_tokens=False).ids
    if end_ids and end_ids[0] in added:
        stop.append(end_ids[0])
    fmt["stop_token_ids"] = sorted(set(stop))
    if not fmt["stop_token_ids"]:
        raise ckpt.error("no end-of-turn token: no eos_token in tokenizer_config.json or "
                         "generation_config.json, and the chat template ends an assistant turn with plain text")
    return fmt
