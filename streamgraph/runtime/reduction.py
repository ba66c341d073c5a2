"""Host side of encoder reuse and token reduction (torch-free).

:class:`EncoderStage` runs the vision encoder for a frame. With an ``stc_cacher`` encoder it
owns the reference buffers ``encoder_refs [Lv,4,B,N,Cv]`` (allocated once from the plan) and
decides per frame:

* ``skip`` — the frame barely changed: the mean absolute difference of its resized RGB pixels
  (in [0, 1] units, i.e. ``|Δpixel_values| · image_std`` averaged over every pixel and channel)
  to the **last encoded** frame is below ``skip_threshold``; the last encoded frame's visual
  tokens are reused outright and no encoder engine runs. Comparing with the last encoded
  frame (not the previous frame) bounds the drift a run of skips can accumulate;
* ``refresh`` — every ``refresh_every`` encoded frames (and for the first): the full encoder
  (``vision_encoder``), which also returns new reference buffers;
* ``reuse`` — otherwise: ``vision_encoder_reuse`` on the frame and the stored references.

A plain ``vision_encoder`` graph always reports ``full``.

:class:`ReducerStage` runs the reducer engine of the requested budget bucket
(``reducer_k{K}``), owns the reducer's state tensors (zeros at stream start, replaced by the
engine's ``next_state_*`` outputs after every run) and returns the valid prefix of the reduced
tokens. For a reducer that sends the first frame whole (DTD) the first frame's engine run only
initialises the state and all N encoder tokens are returned. With ``positions: keep`` a frame
occupies the positions of all its N encoder tokens whatever it keeps (see :class:`ReducedFrame`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}


class EncoderStage:
    """Encoder step of a session. :meth:`run` returns ``(visual_tokens [1,N,C], mode)`` with
    mode one of ``full``, ``refresh``, ``reuse``, ``skip``."""

    def __init__(self, plan, backend):
        self.plan = plan
        self.backend = backend
        params = (plan.encoder or {}).get("params", {})
        self.reuse = plan.encoder is not None
        self.refresh_every = int(params.get("refresh_every", 1))
        self.skip_threshold = float(params.get("skip_threshold", 0.0))
        self.refs: np.ndarray | None = None
        if self.reuse:
            spec = next(s for s in plan.engines["vision_encoder_reuse"].inputs if s.name == "encoder_refs")
            self.refs = np.zeros(spec.shape, dtype=_NP[spec.dtype])
        self._have_refs = False
        self._since_refresh = 0
        self._last_pixels: np.ndarray | None = None
        self._last_tokens: np.ndarray | None = None
        self._std = np.asarray(plan.image_std, np.float32)[None, :, None, None]
        self.last_change: float | None = None      # pixel change of the latest frame (skip metric)

    def pixel_change(self, pixels: np.ndarray) -> float:
        """Mean absolute difference, in [0, 1] pixel units, between ``pixels [1,3,H,W]``
        (normalised) and the last encoded frame; ``inf`` before any frame was encoded."""
        if self._last_pixels is None:
            return float("inf")
        return float(np.mean(np.abs(pixels - self._last_pixels) * self._std))

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, str]:
        if self.skip_threshold > 0:
            self.last_change = self.pixel_change(pixels)
            if self.last_change < self.skip_threshold:
                return self._last_tokens, "skip"
        if not self.reuse:
            tokens, mode = self.backend.run("vision_encoder", {"pixel_values": pixels})["visual_tokens"], "full"
        elif not self._have_refs or self._since_refresh >= self.refresh_every:
            out = self.backend.run("vision_encoder", {"pixel_values": pixels})
            np.copyto(self.refs, out["encoder_refs"])
            self._have_refs, self._since_refresh = True, 1
            tokens, mode = out["visual_tokens"], "refresh"
        else:
            tokens = self.backend.run("vision_encoder_reuse", {"pixel_values": pixels,
                                                               "encoder_refs": self.refs})["visual_tokens"]
            self._since_refresh += 1
            mode = "reuse"
        if self.skip_threshold > 0:
            self._last_pixels, self._last_tokens = pixels.copy(), tokens
        return tokens, mode


@dataclass
class ReducedFrame:
    """A frame's tokens for the decoder: the valid prefix ``tokens [1,n,C]``, position offsets
    of those tokens (``positions: keep``) or None, the budget the frame ran at, and
    ``reserved``: with ``positions: keep``, the positions the frame still occupies after its
    last kept token (its trailing dropped tokens; all N when it keeps none), 0 otherwise.

    With ``positions: keep`` a frame spans its N encoder tokens' positions whatever it keeps
    (the reference's "positional reservation", techniques.md §4.2): token j of the frame sits at
    ``frame start + offsets[j]`` and the next token at ``frame start + N``. The session passes
    ``offsets`` to the cache policy's ``plan_step`` and ``reserved`` to its
    ``reserve_positions``; policies that renumber positions contiguously ignore both."""

    tokens: np.ndarray
    n_valid: int
    offsets: np.ndarray | None
    budget: int
    reserved: int = 0


class ReducerStage:
    """Reducer step of a session over the plan's budget buckets (:attr:`budgets`, ascending)."""

    def __init__(self, plan, backend):
        self.plan = plan
        self.backend = backend
        self.reducer = plan.reducer
        self.budgets: list[int] = list(plan.budgets or [plan.tokens_per_frame])
        self.state: dict[str, np.ndarray] = {}
        self.first_frame_full = False
        self.keep_positions = False
        self.frames = 0
        if self.reducer is not None:
            engine = plan.engines[plan.reducer_engine(self.budgets[-1])]
            for spec in engine.inputs:
                if spec.name in self.reducer.get("state", []):
                    self.state[spec.name] = np.zeros(spec.shape, dtype=_NP[spec.dtype])
            self.first_frame_full = bool(self.reducer.get("first_frame_full", False))
            self.keep_positions = self.reducer["params"].get("positions") == "keep"

    def resolve(self, budget: int | None) -> int:
        """The bucket to run: ``budget`` itself, or the largest for None. ValueError for a
        budget that is not a bucket of the plan."""
        if budget is None:
            return self.budgets[-1]
        if isinstance(budget, bool) or int(budget) != budget or int(budget) not in self.budgets:
            raise ValueError(f"token budget {budget!r} is not a compiled bucket (buckets: "
                             f"{', '.join(map(str, self.budgets))})")
        return int(budget)

    def run(self, tokens: np.ndarray, budget: int) -> ReducedFrame:
        """Reduce ``tokens [1,N,C]`` at bucket ``budget`` (from :meth:`resolve`).

        Raises RuntimeError if the engine breaks the contract (valid tokens not a prefix)."""
        n = tokens.shape[1]
        if self.reducer is None:
            return ReducedFrame(tokens, n, None, n)
        feeds = {"visual_tokens": tokens, **self.state}
        out = self.backend.run(self.plan.reducer_engine(budget), feeds)
        for name, buf in self.state.items():
            np.copyto(buf, out[f"next_{name}"])
        self.frames += 1
        if self.first_frame_full and self.frames == 1:
            return ReducedFrame(tokens, n, None, n)
        keep = out["keep_mask"][0]
        n_valid = int(keep.sum())
        if not keep[:n_valid].all():
            raise RuntimeError(f"reducer engine {self.plan.reducer_engine(budget)} returned valid tokens "
                               f"that are not a prefix: keep_mask {keep.astype(int).tolist()}")
        if not self.keep_positions:
            return ReducedFrame(out["tokens"][:, :n_valid], n_valid, None, budget)
        offsets = out["source_index"][0][:n_valid].astype(np.int64)
        if n_valid and (offsets[0] < 0 or offsets[-1] >= n or (n_valid > 1 and (np.diff(offsets) <= 0).any())):
            raise RuntimeError(f"reducer engine {self.plan.reducer_engine(budget)} returned source_index "
                               f"{offsets.tolist()}: not ascending within [0, {n})")
        reserved = n - (int(offsets[-1]) + 1 if n_valid else 0)
        return ReducedFrame(out["tokens"][:, :n_valid], n_valid, offsets, budget, reserved)
