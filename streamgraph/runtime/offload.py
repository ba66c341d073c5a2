"""Host-side block store of the ReKV cache policy: RAM up to a cap, then disk (torch-free).

ReKV (Becomebright/ReKV ``model/attention/kv_cache_manager.py``: ``MemoryUnit``,
``_append_global``) offloads every block of ``block_size`` frame tokens to CPU memory with a
representative key per layer (the mean of the block's keys) and loads the blocks a question
retrieves back to the GPU. Here a block is appended once, never changed, and read back per
layer:

* payload ``[L, 2, Hkv, bt, Dh]`` — un-rotated keys (index 0) and values (index 1) of the
  block's ``bt`` tokens, every layer;
* mean key ``[L, Hkv, Dh]`` float32 — mean over the block's tokens of its un-rotated keys.

The RAM tier is a ring of ``cap_blocks`` preallocated slots holding the most recent blocks.
When a block is appended to a full ring, the oldest RAM block is written to disk first (each
block is written exactly once): ``blocks.bin`` (block-major payloads) and one
``keys_l{l}.bin`` per layer (so scoring layer ``l`` reads one contiguous file), in a
directory the store owns (a fresh temporary directory unless one is given) and removes when
it is closed or garbage-collected. RAM use is therefore bounded by
``cap_blocks * (block_bytes + key_bytes)`` whatever the stream length; disk grows with it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _close_files(fds: list[int], directory: str | None) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class BlockStore:
    """Append-only store of KV blocks with a RAM cap and disk spill.

    ``layer_shape = (2, Hkv, bt, Dh)`` is one layer of a block's payload and ``key_shape =
    (Hkv, Dh)`` one layer of its mean key; ``num_layers`` is L. ``cap_blocks`` (>= 1) is the
    number of blocks kept in RAM. ``directory``: where spilled blocks go (created if missing,
    its files removed on :meth:`close`); default: a new temporary directory, removed on
    :meth:`close` or garbage collection. Raises ValueError for ``cap_blocks < 1``.
    """

    def __init__(self, num_layers: int, layer_shape: tuple[int, ...], key_shape: tuple[int, ...],
                 cap_blocks: int, dtype=np.float32, directory: str | Path | None = None):
        if cap_blocks < 1:
            raise ValueError(f"cap_blocks must be >= 1, got {cap_blocks}")
        self.num_layers = int(num_layers)
        self.layer_shape = tuple(int(d) for d in layer_shape)
        self.key_shape = tuple(int(d) for d in key_shape)
        self.cap_blocks = int(cap_blocks)
        self.dtype = np.dtype(dtype)
        self.layer_bytes = int(np.prod(self.layer_shape)) * self.dtype.itemsize
        self.block_bytes = self.num_layers * self.layer_bytes
        self.key_layer_bytes = int(np.prod(self.key_shape)) * 4
        self.key_bytes = self.num_layers * self.key_layer_bytes
        # RAM tier, allocated once: block b lives in slot b % cap while b >= n - cap.
        self._ram_kv = np.zeros((self.cap_blocks, self.num_layers, *self.layer_shape), self.dtype)
        self._ram_keys = np.zeros((self.cap_blocks, self.num_layers, *self.key_shape), np.float32)
        self.n_blocks = 0
        self._given_dir = Path(directory) if directory is not None else None
        self.directory: Path | None = None
        self._fd_blocks: int | None = None
        self._fd_keys: list[int] = []
        self._finalizer = None

    # ------------------------------------------------------------------ accounting
    @property
    def ram_blocks(self) -> int:
        """Blocks held in RAM (<= cap_blocks)."""
        return min(self.n_blocks, self.cap_blocks)

    @property
    def disk_blocks(self) -> int:
        """Blocks spilled to disk (the oldest ``n_blocks - cap_blocks``)."""
        return max(0, self.n_blocks - self.cap_blocks)

    @property
    def ram_bytes(self) -> int:
        """Bytes of the RAM tier (allocated once: ``cap_blocks * (block_bytes + key_bytes)``)."""
        return int(self._ram_kv.nbytes + self._ram_keys.nbytes)

    @property
    def disk_bytes(self) -> int:
        """Bytes written to disk so far (payloads + mean keys)."""
        return self.disk_blocks * (self.block_bytes + self.key_bytes)

    # ------------------------------------------------------------------ disk
    def _open_disk(self) -> None:
        if self._given_dir is not None:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            self.directory = self._given_dir
            owned = None
        else:
            self.directory = Path(tempfile.mkdtemp(prefix="streamgraph-rekv-"))
            owned = str(self.directory)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self._fd_blocks = os.open(self.directory / "blocks.bin", flags, 0o600)
        self._fd_keys = [os.open(self.directory / f"keys_l{l}.bin", flags, 0o600)
                         for l in range(self.num_layers)]
        fds = [self._fd_blocks, *self._fd_keys]
        self._finalizer = weakref.finalize(self, _close_files, fds, owned)

    def _spill(self, b: int) -> None:
        """Write RAM block ``b`` (about to be overwritten in the ring) to disk."""
        if self._fd_blocks is None:
            self._open_disk()
        slot = b % self.cap_blocks
        payload = np.ascontiguousarray(self._ram_kv[slot])
        _pwrite_all(self._fd_blocks, memoryview(payload).cast("B"), b * self.block_bytes)
        for l, fd in enumerate(self._fd_keys):
            key = np.ascontiguousarray(self._ram_keys[slot, l])
            _pwrite_all(fd, memoryview(key).cast("B"), b * self.key_layer_bytes)

    def close(self) -> None:
        """Close the spill files and remove the store's own temporary directory."""
        if self._finalizer is not None:
            self._finalizer()
        elif self._given_dir is None and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ blocks
    def append(self, payload: np.ndarray, mean_key: np.ndarray) -> int:
        """Store a block: ``payload [L, *layer_shape]``, ``mean_key [L, *key_shape]``.
        Returns its id (0, 1, 2, ... in append order). Raises ValueError on a shape
        mismatch and OSError when the disk write fails."""
        if payload.shape != (self.num_layers, *self.layer_shape):
            raise ValueError(f"block payload {payload.shape} != {(self.num_layers, *self.layer_shape)}")
        if mean_key.shape != (self.num_layers, *self.key_shape):
            raise ValueError(f"block mean key {mean_key.shape} != {(self.num_layers, *self.key_shape)}")
        b = self.n_blocks
        if b >= self.cap_blocks:
            self._spill(b - self.cap_blocks)
        slot = b % self.cap_blocks
        self._ram_kv[slot] = payload
        self._ram_keys[slot] = mean_key
        self.n_blocks += 1
        return b

    def read_layer(self, b: int, layer: int) -> np.ndarray:
        """Layer ``layer`` of block ``b``'s payload, ``[*layer_shape]`` (a view into RAM or
        an array read from disk). Raises IndexError for an unknown block."""
        if not 0 <= b < self.n_blocks:
            raise IndexError(f"block {b} not in store of {self.n_blocks} blocks")
        if b >= self.n_blocks - self.cap_blocks:
            return self._ram_kv[b % self.cap_blocks, layer]
        raw = os.pread(self._fd_blocks, self.layer_bytes, b * self.block_bytes + layer * self.layer_bytes)
        return np.frombuffer(raw, self.dtype).reshape(self.layer_shape)

    def layer_keys(self, layer: int, chunk_blocks: int = 8192) -> Iterator[np.ndarray]:
        """Mean keys of layer ``layer`` for blocks ``0 .. n_blocks-1`` in order, as chunks
        ``[n, *key_shape]`` float32 of at most ``chunk_blocks`` blocks (so scoring needs
        bounded memory however many blocks there are)."""
        n_disk = self.disk_blocks
        for start in range(0, n_disk, chunk_blocks):
            stop = min(n_disk, start + chunk_blocks)
            raw = os.pread(self._fd_keys[layer], (stop - start) * self.key_layer_bytes,
                           start * self.key_layer_bytes)
            yield np.frombuffer(raw, np.float32).reshape(stop - start, *self.key_shape)
        ram_ids = np.arange(n_disk, self.n_blocks)
        for start in range(0, len(ram_ids), chunk_blocks):
            ids = ram_ids[start:start + chunk_blocks]
            yield self._ram_keys[ids % self.cap_blocks, layer]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
