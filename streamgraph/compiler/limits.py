"""Physical bounds of graph-file numbers and names (docs/yaml-reference.md, "Bounds").

Every number a graph file gives is finite and within these bounds, so that nothing
downstream (shape products, memory plans, runtime loops, file names) can overflow, hang or
allocate absurdly; the pydantic models of :mod:`streamgraph.compiler.spec` and
:mod:`streamgraph.compiler.ops` use them as ``Field(le=...)`` and the JSON Schema shows
them as ``maximum``. They are generous: each is far above what a real deployment needs.

This module never imports torch.
"""
from __future__ import annotations

#: Longest graph or node name, in characters (a graph name is a directory name).
MAX_NAME_CHARS = 128
#: Longest ``model.hf`` path, in characters (Linux PATH_MAX).
MAX_PATH_CHARS = 4096
#: Longest component of a ``model.hf`` path, in UTF-8 bytes (Linux NAME_MAX).
MAX_PATH_PART_BYTES = 255
#: Deepest nesting of YAML collections in a graph file (a valid one needs 4).
MAX_YAML_DEPTH = 64

#: Largest frame side, in pixels (``stream.frame_size``).
MAX_FRAME_SIDE = 16384
#: Largest frame area, in pixels (height x width): 2**26, e.g. 8192 x 8192 (8K UHD is
#: 7680 x 4320 = 33.2 Mpx).
MAX_FRAME_PIXELS = 1 << 26
#: Highest sampling rate, frames per second (``stream.fps``).
MAX_FPS = 1000.0
#: Longest deadline, in milliseconds: one day (``slo.frame_deadline_ms``, ``slo.ttft_ms``).
MAX_DEADLINE_MS = 86_400_000.0
#: Largest memory budget, in MiB: 1 PiB (``budget.memory_mb``, ``rekv.store_mb``).
MAX_MEMORY_MB = float(1 << 30)
#: Most tokens of one kind: a token budget per frame, a prefill chunk, an answer
#: (``tokens_per_frame``, ``prefill_chunk_tokens``, ``max_new_tokens``): 2**20.
MAX_TOKENS = 1 << 20
#: Most KV-cache slots of one cache parameter (``capacity_tokens``, ``window_tokens``, ...):
#: 2**24 (16.7 M tokens).
MAX_CACHE_TOKENS = 1 << 24
#: Most budget buckets of one reducer (each is an engine).
MAX_BUCKETS = 32
#: Largest count of frames or blocks (``vision_window_frames``, ``topk``, ``store_blocks``,
#: ``refresh_every``): 2**20.
MAX_COUNT = 1 << 20
#: Longest window in seconds of stream: one day (``vision_window_seconds``).
MAX_SECONDS = 86_400.0
