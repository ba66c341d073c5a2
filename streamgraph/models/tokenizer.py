"""Byte-level tokenizer of the ``tiny`` preset, built with the ``tokenizers`` library.

Every byte is one token (ids 0..255, GPT-2 byte-to-unicode alphabet, no merges), followed by
the ChatML special tokens Qwen2 uses. Saved as a standard ``tokenizer.json`` so the runtime
loads it the same way it loads a Hugging Face checkpoint's tokenizer (torch-free).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_level_tokenizer(special_ids: dict[str, int] | None = None) -> Tokenizer:
    """Tokenizer with ids 0..255 = bytes and 256.. = :data:`SPECIAL_TOKENS`.

    ``special_ids`` instead places the given special tokens at the given ids (each >= 256,
    distinct), e.g. Qwen2's ``{"<|im_end|>": 151645, ...}``, so a random-weight checkpoint can
    use a real checkpoint's special-token ids. Raises ValueError for a bad id."""
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    specials = list(SPECIAL_TOKENS)
    if special_ids is not None:
        ids = list(special_ids.values())
        if len(set(ids)) != len(ids) or min(ids, default=256) < 256:
            raise ValueError(f"special token ids must be distinct and >= 256, got {special_ids}")
        vocab.update(special_ids)
        specials = list(special_ids)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def save_byte_level_tokenizer(path: str | Path) -> Path:
    """Write ``tokenizer.json`` to ``path`` and return it."""
    path = Path(path)
    byte_level_tokenizer().save(str(path))
    return path
