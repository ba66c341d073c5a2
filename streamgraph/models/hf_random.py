"""Random-weight LLaVA-OneVision checkpoints written by transformers itself, for tests and
benchmarks (needs ``transformers``; nothing is downloaded).

:func:`write_random_checkpoint` builds ``transformers.LlavaOnevisionForConditionalGeneration``
from a config, saves it with its own ``save_pretrained`` (optionally sharded), and writes the
files a hub download has beside the weights: ``tokenizer.json`` + ``tokenizer_config.json``
(a byte-level tokenizer with the ChatML / ``<image>`` / ``<video>`` special tokens at the
config's ids), the chat template, ``preprocessor_config.json`` (written by transformers'
``LlavaOnevisionImageProcessorPil``) and ``video_preprocessor_config.json`` (the fields of
``LlavaOnevisionVideoProcessor``, written as JSON because that class needs torchvision).
"""
from __future__ import annotations

import json
from pathlib import Path

from streamgraph.contract import DTYPES

#: LLaVA-OneVision's chat template as transformers' LLaVA-OneVision processor tests define it.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Qwen2's ids of the special tokens (and llava-hf's <image>/<video>).
QWEN2_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                     "<image>": 151646, "<video>": 151647}


def tiny_special_ids(start: int = 256) -> dict[str, int]:
    """Special tokens at ``start..`` for tiny vocabularies."""
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    return {n: start + i for i, n in enumerate(names)}


def write_random_checkpoint(path: str | Path, *, vision: dict, text: dict, special_ids: dict[str, int],
                            vision_feature_layer: int | list[int] = -1, image_mean=(0.5, 0.5, 0.5),
                            image_std=(0.5, 0.5, 0.5), resample: int = 3, seed: int = 0,
                            perturb: float = 0.1, dtype: str = "float32", max_shard_size: str | None = None,
                            template_file: str = "chat_template.jinja", return_model: bool = True):
    """Write a random LLaVA-OneVision checkpoint to ``path`` and return the transformers model
    (eval mode, float32) it was saved from (``None`` with ``return_model=False``).

    ``vision``/``text``: ``SiglipVisionConfig``/``Qwen2Config`` kwargs. ``perturb`` adds
    ``perturb * N(0,1)`` to every norm weight, bias and ``image_newline`` (transformers
    initialises biases to zero, which would hide a missing bias). ``dtype``: dtype of the saved
    tensors (``float32``, ``float16`` or ``bfloat16``). ``template_file``:
    ``chat_template.jinja`` (transformers 5), ``chat_template.json`` (processor style) or
    ``tokenizer_config.json`` (embedded). Raises ImportError without transformers."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    v = SiglipVisionConfig(**vision)
    t = Qwen2Config(**text)
    cfg = LlavaOnevisionConfig(vision_config=v, text_config=t, image_token_index=special_ids["<image>"],
                               video_token_index=special_ids["<video>"],
                               vision_feature_layer=vision_feature_layer,
                               vision_feature_select_strategy="full",
                               tie_word_embeddings=t.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias") or name.endswith("image_newline"):
                    p.add_(perturb * torch.randn(p.shape, generator=g))
    # bfloat16 is a checkpoint storage dtype (what released checkpoints ship), not an engine
    # dtype, so it is not in the contract's table
    save_dtype = torch.bfloat16 if dtype == "bfloat16" else getattr(torch, DTYPES[dtype].torch)
    to_save = model if save_dtype == torch.float32 else model.to(save_dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    to_save.save_pretrained(path, **kwargs)
    if return_model and save_dtype != torch.float32:
        model = model.float()

    write_aux_files(path, image_size=v.image_size, special_ids=special_ids, image_mean=image_mean,
                    image_std=image_std, resample=resample, template_file=template_file)
    return model if return_model else None


def write_aux_files(path: str | Path, *, image_size: int, special_ids: dict[str, int],
                    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), resample: int = 3,
                    template_file: str = "chat_template.jinja", tokenizer=None) -> None:
    """Write everything but ``config.json`` and the weights: tokenizer files (byte-level, with
    ``special_ids``, or the given ``tokenizers.Tokenizer``), the LLaVA-OneVision chat template
    (in ``template_file``), ``preprocessor_config.json`` and ``video_preprocessor_config.json``
    for ``image_size`` px frames. Raises ValueError for an unknown ``template_file``."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    from streamgraph.models.tokenizer import byte_level_tokenizer

    path = Path(path)
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer or byte_level_tokenizer(special_ids), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = LLAVA_ONEVISION_CHAT_TEMPLATE if template_file != "chat_template.json" else None
    tok.save_pretrained(path)
    tc_path = path / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.update(image_token="<image>", video_token="<video>")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tc.pop("chat_template", None)
    if template_file == "chat_template.jinja":
        (path / "chat_template.jinja").write_text(LLAVA_ONEVISION_CHAT_TEMPLATE)
    elif template_file == "chat_template.json":
        (path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_ONEVISION_CHAT_TEMPLATE}))
    elif template_file == "tokenizer_config.json":
        tc["chat_template"] = LLAVA_ONEVISION_CHAT_TEMPLATE
    else:
        raise ValueError(f"unknown template_file {template_file!r}")
    tc_path.write_text(json.dumps(tc, indent=2))

    size = {"height": image_size, "width": image_size}
    transformers.LlavaOnevisionImageProcessorPil(
        size=size, image_mean=list(image_mean), image_std=list(image_std), resample=resample,
    ).save_pretrained(path)
    (path / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor",
        "size": size, "resample": resample, "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(image_mean),
        "image_std": list(image_std), "do_convert_rgb": True, "do_sample_frames": False,
    }, indent=2))
