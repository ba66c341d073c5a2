"""KV cache: the static buffer and the cache policies (one file per policy)."""
