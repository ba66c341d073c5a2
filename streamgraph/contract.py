"""The compile -> run contract, written once: engine roles, every engine I/O name, dtypes.

The compiler (plan, lowering, bundle checks), the models' engine modules, the backends and
the runtime all name engines and tensors through this module, so a name exists in one place.
Modelled on ONNX Runtime GenAI's ``genai_config.json`` (every engine input/output named once
in one config). Torch-free and numpy-light: per-frame code reads the plain dicts and
constants below (no function call, so this file is not on the per-frame path).

Engines (batch B = 1; ``T`` is the chunk axis, the only dynamic one):

===========================  ==============================================================
role                          I/O
===========================  ==============================================================
``vision_encoder``            ``pixel_values [B,3,H,W]`` -> ``visual_tokens [B,N,C]``
                              (+ ``encoder_refs [Lv,4,B,T,Cv]`` with STC-Cacher)
``vision_encoder_reuse``      ``pixel_values``, ``encoder_refs`` -> ``visual_tokens``
``reducer_k{K}``              ``visual_tokens`` (+ state) -> ``tokens [B,K,C]``,
                              ``keep_mask [B,K]``, ``source_index [B,K]`` (+ next state)
``embed_tokens``              ``input_ids [B,T]`` -> ``inputs_embeds [B,T,C]``
``decoder_step``              see :data:`DECODER_STEP_INPUTS` / :data:`DECODER_STEP_OUTPUTS`
===========================  ==============================================================
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------- engine roles
VISION_ENCODER = "vision_encoder"
VISION_ENCODER_REUSE = "vision_encoder_reuse"
EMBED_TOKENS = "embed_tokens"
DECODER_STEP = "decoder_step"
REDUCER_PREFIX = "reducer_k"


def reducer_engine(budget: int) -> str:
    """Engine name of the reducer at token budget bucket ``budget`` (``reducer_k{K}``)."""
    return f"{REDUCER_PREFIX}{int(budget)}"


def engine_file(role: str) -> str:
    """Bundle-relative path of an engine's ONNX file."""
    return f"engines/{role}.onnx"


# ----------------------------------------------------------------------------- tensor names
PIXEL_VALUES = "pixel_values"          # f[B,3,H,W]
VISUAL_TOKENS = "visual_tokens"        # f[B,N,C]
ENCODER_REFS = "encoder_refs"          # f[Lv,4,B,T,Cv] (STC-Cacher references)
TOKENS = "tokens"                      # f[B,K,C] reducer output
KEEP_MASK = "keep_mask"                # bool[B,K]
SOURCE_INDEX = "source_index"          # i64[B,K]
INPUT_IDS = "input_ids"                # i64[B,T]
INPUTS_EMBEDS = "inputs_embeds"        # f[B,T,C]
POSITIONS = "positions"                # i64[B,T] RoPE position of each new token
TOKEN_VALID = "token_valid"            # bool[B,T] valid tokens form a prefix of the chunk
KV_CACHE = "kv_cache"                  # f[L,2,B,Hkv,S,Dh] the one static KV buffer (keys un-rotated)
CACHE_POSITIONS = "cache_positions"    # i64[B,S] RoPE position of each slot
CACHE_VALID = "cache_valid"            # bool[B,S] slot visible to every head not streaming
WINDOW_VALID = "window_valid"          # bool[B,S] slot visible to streaming heads (DuoAttention)
STREAMING_HEADS = "streaming_heads"    # bool[L,Hkv] True: the KV head is a streaming head
LOGITS = "logits"                      # f32[B,V] of the last valid token
NEW_KV = "new_kv"                      # f[L,2,B,Hkv,T,Dh] the chunk's un-rotated K/V
LAST_HIDDEN = "last_hidden"            # f[B,C] final-norm hidden state of the last valid token
QUERY_MEAN = "query_mean"              # f32[L,B,H,Dh] mean pre-RoPE query over valid tokens (ReKV)

#: decoder_step inputs, in engine order.
DECODER_STEP_INPUTS = (INPUTS_EMBEDS, POSITIONS, TOKEN_VALID, KV_CACHE, CACHE_POSITIONS, CACHE_VALID,
                       WINDOW_VALID, STREAMING_HEADS)
#: decoder_step outputs, in engine order.
DECODER_STEP_OUTPUTS = (LOGITS, NEW_KV, LAST_HIDDEN, QUERY_MEAN)


# ----------------------------------------------------------------------------- dtypes
@dataclass(frozen=True)
class DType:
    """One tensor dtype as every layer spells it."""

    name: str          # the plan's name ("float32")
    bytes: int         # bytes per element
    numpy: np.dtype    # numpy dtype
    onnx: str          # ONNX Runtime's type string ("tensor(float)")
    torch: str         # attribute of the torch module ("float32"); resolve with getattr(torch, ...)


#: The one dtype table: plan name -> :class:`DType`.
DTYPES: dict[str, DType] = {
    "float32": DType("float32", 4, np.dtype(np.float32), "tensor(float)", "float32"),
    "float16": DType("float16", 2, np.dtype(np.float16), "tensor(float16)", "float16"),
    "int64": DType("int64", 8, np.dtype(np.int64), "tensor(int64)", "int64"),
    "bool": DType("bool", 1, np.dtype(np.bool_), "tensor(bool)", "bool"),
}
#: Dtypes a KV buffer / float engine tensor may have in a plan.
FLOAT_DTYPES = ("float32", "float16")
#: ONNX Runtime type string -> plan name.
ONNX_TO_DTYPE = {d.onnx: d.name for d in DTYPES.values()}
