"""Export-friendly torch modules of the LLaVA-OneVision-style model (gpt-fast style).

Three engines come out of these modules:

* :class:`VisionEncoder` — ``pixel_values [B,3,H,W]`` -> ``visual_tokens [B,N,C]``
  (SigLIP-style ViT at the configured feature layer, the 2-layer MLP projector into the
  decoder width C, and for LLaVA-OneVision checkpoints the 2x2 bilinear video pooling).
* :class:`TokenEmbedding` — ``input_ids [B,T] int64`` -> ``inputs_embeds [B,T,C]``.
* :class:`DecoderStep` — one prefill chunk or decode step over the static KV buffer of
  DESIGN.md: keys are cached un-rotated and RoPE is applied inside the step to the cached
  keys with ``cache_positions`` and to the new tokens with ``positions``.

Parameter names follow transformers' ``SiglipVisionModel`` / ``Qwen2Model`` /
``LlavaOnevisionMultiModalProjector`` so Hugging Face checkpoints map by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamgraph.models.config import TextConfig, VisionConfig, VLMConfig


# ----------------------------------------------------------------------------- vision
class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = c // self.num_heads
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim ** -0.5)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, c)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size,
                                         kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)
        self.register_buffer("position_ids", torch.arange(cfg.num_patches)[None], persistent=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embedding(pixel_values)            # [B, Cv, gh, gw]
        x = x.flatten(2).transpose(1, 2)                  # [B, N, Cv], row-major patches
        return x + self.position_embedding(self.position_ids)


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # only the layers whose output is used (cfg.feature_layers) are built and run
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.layers_used))


class SiglipVisionTower(nn.Module):
    """ViT trunk; returns the hidden states ``cfg.feature_layers`` select (no post-layernorm),
    concatenated along channels: ``[B, N, Cv * len(feature_layers)]``. The default
    ``(-1,)`` is the last encoder layer, as LLaVA-OneVision's ``vision_feature_layer=-1``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        n = cfg.num_hidden_layers
        self.feature_index = [i if i >= 0 else n + 1 + i for i in cfg.feature_layers]

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.embeddings(pixel_values)
        hidden = [x]                                  # hidden[i]: output of layer i (0: embeddings)
        for layer in self.encoder.layers:
            x = layer(x)
            hidden.append(x)
        return self.select_features(hidden)

    def select_features(self, hidden: list[Tensor]) -> Tensor:
        """The features ``feature_layers`` selects from ``hidden`` (``hidden[0]`` the patch
        embeddings, ``hidden[i]`` the output of layer i, each ``[B, N, Cv]``), concatenated
        along channels: ``[B, N, Cv * len(feature_layers)]``. Encoders that run the layers
        themselves (STC-Cacher's refresh/reuse engines) use it to read the same hidden states."""
        if len(self.feature_index) == 1:
            return hidden[self.feature_index[0]]
        return torch.cat([hidden[i] for i in self.feature_index], dim=-1)


class MultiModalProjector(nn.Module):
    """LLaVA 2-layer MLP projector: Linear(Cv, C) -> GELU -> Linear(C, C)."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        approx = "tanh" if self.act in ("gelu_pytorch_tanh", "gelu_new") else "none"
        return self.linear_2(F.gelu(self.linear_1(x), approximate=approx))


class VisionEncoder(nn.Module):
    """Engine ``vision_encoder``: ``pixel_values [B,3,H,W]`` (normalised, model dtype) ->
    ``visual_tokens [B,N,C]`` with C the decoder width and N = (H/patch)·(W/patch), or, with
    ``pool_grid`` (LLaVA-OneVision's video path, ``video_pooling="bilinear_2x"``), the
    projected tokens bilinearly pooled to ``ceil(H/patch/2)·ceil(W/patch/2)``
    (:func:`streamgraph.reducers.pool.bilinear_pool_2x`) — per frame exactly the features
    transformers' ``LlavaOnevisionModel.get_video_features`` computes, before it appends
    ``image_newline``."""

    def __init__(self, vision_tower: SiglipVisionTower, projector: MultiModalProjector,
                 pool_grid: tuple[int, int] | None = None):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = projector
        self.pool_grid = pool_grid

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.head(self.vision_tower(pixel_values))

    def head(self, features: Tensor) -> Tensor:
        """Projector, then (with ``pool_grid``) the 2x2 bilinear pooling: selected ViT features
        ``[B, N_vit, Cv']`` -> ``visual_tokens [B, N, C]``."""
        x = self.multi_modal_projector(features)
        if self.pool_grid is not None:
            from streamgraph.reducers.pool import bilinear_pool_2x

            x = bilinear_pool_2x(x, self.pool_grid)
        return x


# ----------------------------------------------------------------------------- decoder
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """``positions [B,T] int64`` -> cos, sin ``[B,1,T,Dh]`` float32 (HF rotate_half layout)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq          # [B, T, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B,H,T,Dh]`` by cos/sin ``[B,1,T,Dh]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c, bias=False)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TokenEmbedding(nn.Module):
    """Engine ``embed_tokens``: ``input_ids [B,T] int64`` -> ``inputs_embeds [B,T,C]``."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)


class DecoderStep(nn.Module):
    """Engine ``decoder_step``: one prefill chunk (T tokens) or decode step (T=1) over the
    static KV buffer.

    Inputs:
      * ``inputs_embeds [B,T,C]`` float — embeddings of the new tokens;
      * ``positions [B,T]`` int64 — RoPE position of each new token;
      * ``token_valid [B,T]`` bool — invalid (padding / masked) tokens are never attended to;
      * ``kv_cache [L,2,B,Hkv,S,Dh]`` float — un-rotated keys (index 0) and values (index 1);
      * ``cache_positions [B,S]`` int64 — RoPE position of each slot;
      * ``cache_valid [B,S]`` bool — which slots are visible to the new tokens (to every head
        that is not a streaming head);
      * ``window_valid [B,S]`` bool (optional) — which slots a streaming head sees
        (DuoAttention: attention sinks + the recent window); default ``cache_valid``;
      * ``streaming_heads [L,Hkv]`` bool (optional) — True for a streaming KV head; the query
        heads of its GQA group see ``window_valid``, every other head ``cache_valid``
        (DuoAttention, Xiao et al., ICLR 2025, mit-han-lab/duo-attention). Default: none.
        With all False the outputs equal those without the two inputs, bit for bit (same
        boolean mask).

    Outputs:
      * ``logits [B,V]`` float32 — for the last valid token of the chunk;
      * ``new_kv [L,2,B,Hkv,T,Dh]`` — un-rotated keys and values of the new tokens, to be
        written by the host into the slots its cache policy chose;
      * ``last_hidden [B,C]`` — final-norm hidden state of the last valid token;
      * ``query_mean [L,B,H,Dh]`` float32 — per layer and query head, the mean over the
        chunk's valid tokens of the query projection **before RoPE** (zeros for a chunk
        without valid tokens). ReKV scores blocks with it (Becomebright/ReKV
        ``ContextManager._calc_block_topk``: the raw ``h_q`` of the question averaged over
        its tokens; techniques.md section 5.3).

    Semantics: each new token attends to every cache slot its head sees (``cache_valid``, or
    ``window_valid`` for a streaming head) and causally to the valid tokens of its own chunk
    (and always to itself, so no softmax row is empty). The last valid token is the one at
    index ``sum(token_valid) - 1`` (valid tokens form a prefix).
    """

    def __init__(self, model: Qwen2Model, lm_head: nn.Linear, cfg: TextConfig):
        super().__init__()
        self.model = model
        self.lm_head = lm_head
        self.cfg = cfg
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        self.register_buffer("inv_freq", inv.to(torch.float32), persistent=False)

    def forward(self, inputs_embeds: Tensor, positions: Tensor, token_valid: Tensor,
                kv_cache: Tensor, cache_positions: Tensor, cache_valid: Tensor,
                window_valid: Tensor | None = None, streaming_heads: Tensor | None = None):
        cfg = self.cfg
        b, t, _ = inputs_embeds.shape
        s = kv_cache.shape[4]
        nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rep = nh // nkv
        cos_n, sin_n = rope_cos_sin(positions, self.inv_freq)
        cos_c, sin_c = rope_cos_sin(cache_positions, self.inv_freq)

        idx = torch.arange(t, device=positions.device)
        causal = idx[None, :] <= idx[:, None]                                  # [T, T]
        eye = idx[None, :] == idx[:, None]
        chunk_mask = causal[None] & (token_valid[:, None, :] | eye[None])      # [B, T, T]
        cache_mask = cache_valid[:, None, :].expand(b, t, s)                   # [B, T, S]
        mask = torch.cat([cache_mask, chunk_mask], dim=-1)[:, None]            # [B, 1, T, S+T]
        wv = cache_valid if window_valid is None else window_valid             # [B, S]
        neg = torch.finfo(torch.float32).min
        scale = 1.0 / math.sqrt(dh)

        h = inputs_embeds
        new_k, new_v, q_means = [], [], []
        w = token_valid.to(torch.float32)[:, None, :, None]                    # [B, 1, T, 1]
        n_valid = w.sum(dim=2).clamp(min=1.0)                                  # [B, 1, 1]
        for li, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t, nh, dh).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, nkv, dh).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, nkv, dh).transpose(1, 2)
            new_k.append(k)
            new_v.append(v)
            q_means.append((q.float() * w).sum(dim=2) / n_valid)                # [B, H, Dh]
            k_all = torch.cat([apply_rope(kv_cache[li, 0], cos_c, sin_c), apply_rope(k, cos_n, sin_n)], dim=2)
            v_all = torch.cat([kv_cache[li, 1], v], dim=2)
            q = apply_rope(q, cos_n, sin_n)
            k_all = k_all[:, :, None].expand(b, nkv, rep, s + t, dh).reshape(b, nh, s + t, dh)
            v_all = v_all[:, :, None].expand(b, nkv, rep, s + t, dh).reshape(b, nh, s + t, dh)
            scores = torch.matmul(q, k_all.transpose(-1, -2)).float() * scale
            if streaming_heads is None:
                scores = scores.masked_fill(~mask, neg)
            else:   # per KV head: window_valid for a streaming head, else cache_valid
                sh = streaming_heads[li][None, :, None]                        # [1, Hkv, 1]
                hc = (sh & wv[:, None, :]) | (~sh & cache_valid[:, None, :])   # [B, Hkv, S] (no bool Where in ORT)
                m = torch.cat([hc[:, :, None, :].expand(b, nkv, t, s),
                               chunk_mask[:, None].expand(b, nkv, t, t)], dim=-1)  # [B, Hkv, T, S+T]
                # scores viewed per KV head and GQA group: the mask broadcasts over the group
                scores = scores.view(b, nkv, rep, t, s + t).masked_fill(~m[:, :, None], neg).view(b, nh, t, s + t)
            probs = torch.softmax(scores, dim=-1).to(v_all.dtype)
            out = torch.matmul(probs, v_all).transpose(1, 2).reshape(b, t, nh * dh)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h)
        last = token_valid.to(torch.int64).sum(dim=1) - 1                       # [B]
        gather_idx = last.clamp(min=0)[:, None, None].expand(b, 1, h.shape[-1])
        last_hidden = torch.gather(h, 1, gather_idx)[:, 0]                      # [B, C]
        logits = self.lm_head(last_hidden).float()
        new_kv = torch.stack([torch.stack(new_k), torch.stack(new_v)], dim=1)  # [L, 2, B, Hkv, T, Dh]
        return logits, new_kv, last_hidden, torch.stack(q_means)


class StreamingVLM(nn.Module):
    """The whole model; :meth:`engines` returns the per-engine modules that get exported."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(
            cfg.vision.hidden_size * len(cfg.vision.feature_layers), cfg.text.hidden_size,
            cfg.projector_hidden_act, bias=cfg.projector_bias)
        self.language_model = Qwen2Model(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        if cfg.image_newline:
            # LLaVA-OneVision's learned embedding appended once after a video's frames
            self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))

    def vision_encoder(self) -> VisionEncoder:
        pool = self.cfg.vision.grid if self.cfg.video_pooling == "bilinear_2x" else None
        return VisionEncoder(self.vision_tower, self.multi_modal_projector, pool)

    def token_embedding(self) -> TokenEmbedding:
        return TokenEmbedding(self.language_model.embed_tokens)

    def decoder_step(self) -> DecoderStep:
        return DecoderStep(self.language_model, self.lm_head, self.cfg.text)


def init_random_(model: StreamingVLM, seed: int) -> StreamingVLM:
    """Deterministic random weights from ``seed`` (normal std 0.02 for matrices, like HF's
    ``initializer_range``; norms at 1 + small noise so RMSNorm/LayerNorm are not trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        # Larger embeddings so logits are not flat for a random tiny model.
        model.language_model.embed_tokens.weight.mul_(25.0)
    return model
