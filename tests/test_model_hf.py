"""streamgraph's model modules vs the Hugging Face transformers implementations.

Tiny random configs built with transformers; weights copied by name into streamgraph's
modules. (Loading real checkpoints from disk is issue #3; this pins the architecture.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from streamgraph.models.config import TextConfig, VisionConfig, VLMConfig  # noqa: E402
from streamgraph.models.vlm import StreamingVLM  # noqa: E402
from streamgraph.kv import FullCache, KVBuffer  # noqa: E402


def _qwen2(cfg: TextConfig):
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():                       # non-trivial norms and biases
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def _ours_from_qwen2(hf, cfg: VLMConfig) -> StreamingVLM:
    ours = StreamingVLM(cfg).eval()
    sd = {}
    for k, v in hf.state_dict().items():
        sd[k.replace("model.", "language_model.", 1) if k.startswith("model.") else k] = v
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("vision_tower", "multi_modal_projector")) for k in missing)
    return ours


@torch.no_grad()
def test_decoder_prefill_and_decode_match_qwen2():
    cfg = VLMConfig(text=TextConfig(tie_word_embeddings=False))
    hf = _qwen2(cfg.text)
    ours = _ours_from_qwen2(hf, cfg)
    step = ours.decoder_step()
    ids = torch.randint(0, cfg.text.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    ref = hf(input_ids=ids).logits[0]                                   # [n, V]
    x = cfg.text
    emb = ours.language_model.embed_tokens(ids)
    # prefill of the first 15 tokens as one chunk, then token-by-token decode over the static
    # KV buffer driven by the host-side policy, exactly as the runtime does
    kv = KVBuffer([x.num_hidden_layers, 2, 1, x.num_key_value_heads, 32, x.head_dim])
    pol = FullCache(32)
    got = []
    for a, b in [(0, 15)] + [(i, i + 1) for i in range(15, 23)]:
        plan = pol.plan_step(b - a, b - a)
        logits, new_kv = step(emb[:, a:b], torch.from_numpy(plan.positions[None]),
                              torch.ones(1, b - a, dtype=torch.bool), torch.from_numpy(kv.data),
                              torch.from_numpy(plan.cache_positions[None]),
                              torch.from_numpy(plan.cache_valid[None]))[:2]
        kv.write(new_kv.numpy(), plan.write_slots)
        pol.commit(plan)
        got.append((b - 1, logits[0]))
    for pos, lg in got:
        err = (lg - ref[pos]).abs().max().item()
        assert err < 1e-4, f"position {pos}: {err:.3g}"


@torch.no_grad()
def test_vision_tower_matches_siglip():
    v = VisionConfig(image_size=(32, 32), patch_size=8)
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=32, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(hf_cfg).eval()
    ours = StreamingVLM(VLMConfig(vision=v)).eval()
    sd = {"vision_tower." + k.removeprefix("vision_model."): t for k, t in hf.state_dict().items()
          if not k.removeprefix("vision_model.").startswith(("post_layernorm", "head"))}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("vision_tower")]
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = hf(pixel_values=px, output_hidden_states=True).hidden_states[-1]   # LLaVA-OV: layer -1, no post-LN
    np.testing.assert_allclose(ours.vision_tower(px).numpy(), ref.numpy(), atol=1e-5, rtol=0)
