"""The decoder of a session: decoder steps over the static KV buffer, the prompt format,
greedy generation, and the NaN/Inf guard on every engine output (torch-free).

Token stream of a session (ChatML, as Qwen2 chat models use)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|>   (prefix, at open)
    [K visual tokens of frame 0][K of frame 1] ...                                   (frames)
    <|vision_end|>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n                (question: prefill)
    answer tokens ...                                                                (answer: decode)
    <|im_end|>\\n<|im_start|>user\\n<|vision_start|>                                  (resume frames)

Every chunk goes through the same ``decoder_step`` engine (:meth:`Decoder.step`): the cache
policy plans slots and positions (:meth:`~streamgraph.kv.base.CachePolicy.plan_step`), the
backend runs the step over the session's KV buffer (:meth:`~streamgraph.backends.base.Backend.decoder_step`),
every output is checked for NaN/Inf, and only then does the backend scatter the step's new KV
into its slots (:meth:`~streamgraph.backends.base.Backend.commit_kv`) and the policy commit.

Bundles of Hugging Face checkpoints carry their own prompt format in the manifest
(``prompt.format``: ``prefix``, ``before_question``, ``after_question``, ``after_answer``, rendered
from the checkpoint's chat template at compile time), their stop token ids
(``prompt.stop_token_ids``) and, for LLaVA-OneVision, an embedding that closes the video
(``prompt.video_end_embedding``: ``image_newline``, prefilled once after the frames of a user
turn, right before the question, as transformers places it after a video's frames). The
ChatML strings above are the defaults for bundles without them (:func:`prompt_format`).

The guard (:class:`GuardedBackend`) wraps a session's backend: any exception the backend
raises becomes :class:`~streamgraph.errors.EngineError` naming the engine (one line, the
original chained), and a floating-point output holding NaN/Inf (``new_kv``, ``logits``, reducer
``next_state_*``, ``encoder_refs``, visual tokens, ...) raises
:class:`~streamgraph.errors.NonFiniteError` ("decoder_step produced NaN/Inf in new_kv") *before*
anything is returned, so nothing non-finite reaches the KV buffer, the cache policy or a
reducer's / encoder's state. The check costs one pass over each floating output
(``isfinite`` for small arrays; ``min`` and ``max``, which propagate NaN, for large ones).
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from streamgraph.backends.base import Backend
from streamgraph.contract import (CACHE_POSITIONS, CACHE_VALID, DECODER_STEP, EMBED_TOKENS, INPUT_IDS, INPUTS_EMBEDS,
                                  LAST_HIDDEN, LOGITS, NEW_KV, POSITIONS, STREAMING_HEADS, TOKEN_VALID,
                                  WINDOW_VALID)
from streamgraph.errors import EngineError, NonFiniteError, StreamgraphError
from streamgraph.kv.base import CachePolicy, KVBuffer, StepPlan

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

_LARGE = 1 << 16
_NEW_KV_FINITE = "new_kv_finite"      # device backends: whether the step's new_kv is finite


# ---------------------------------------------------------------------- the NaN/Inf guard
def nonfinite_outputs(outputs: dict[str, np.ndarray]) -> list[str]:
    """Names of the floating-point arrays in ``outputs`` holding NaN or Inf (a device
    backend's ``new_kv_finite: False`` names ``new_kv``)."""
    bad = []
    for name, value in outputs.items():
        if name == _NEW_KV_FINITE:
            if not value and NEW_KV not in outputs:
                bad.append(NEW_KV)
            continue
        a = np.asarray(value)
        if a.dtype.kind != "f" or not a.size:
            continue
        if a.size < _LARGE:
            ok = bool(np.isfinite(a).all())
        else:                                   # no temporary of a's size; NaN propagates
            ok = bool(np.isfinite(a.min()) and np.isfinite(a.max()))
        if not ok:
            bad.append(name)
    return bad


def _engine_error(engine: str, e: Exception) -> EngineError:
    msg = " ".join(str(e).split())
    return EngineError(f"engine {engine} failed: {type(e).__name__}" + (f": {msg}" if msg else ""), engine=engine)


def _overrides(backend, method: str) -> bool:
    """Whether ``backend`` brings its own ``method`` (not the base class default, not absent)."""
    own = getattr(type(backend), method, None)
    return own is not None and own is not getattr(Backend, method, None)


class GuardedBackend:
    """Wraps a session's ``backend``: engine errors named (EngineError), NaN/Inf outputs
    refused (NonFiniteError) before they are returned. Other attributes (``name``,
    ``threads``, ...) are the backend's; ``backend`` is the wrapped one.

    The decoder's KV calls (:meth:`alloc_kv`, :meth:`decoder_step`, :meth:`commit_kv`) go to
    the backend when it brings its own (bound or device-resident buffers); otherwise (the
    base class defaults, or a plain object with only ``run``) the base class defaults run
    with this guard as the backend — through the guarded :meth:`run`, with ``kv.data`` as
    ``kv_cache`` and a host scatter — so a wrapper of ``run`` sees every engine call."""

    def __init__(self, backend):
        self.backend = backend
        self._own_kv = _overrides(backend, "decoder_step") or _overrides(backend, "commit_kv")
        self._own_alloc = _overrides(backend, "alloc_kv")

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``engine``. Raises EngineError when the backend fails, NonFiniteError when an
        output holds NaN/Inf (nothing is returned, so nothing is stored)."""
        try:
            out = self.backend.run(engine, inputs)
        except StreamgraphError:
            raise
        except Exception as e:                 # ORT failures, MemoryError, OSError, ...
            raise _engine_error(engine, e) from e
        bad = nonfinite_outputs(out)
        if bad:
            raise NonFiniteError(f"{engine} produced NaN/Inf in {', '.join(bad)}", engine=engine)
        return out

    def alloc_kv(self, shape, dtype: str) -> KVBuffer:
        """The session's KV buffer ``[L,2,B,Hkv,S,Dh]`` (the backend's, or a host one)."""
        if self._own_alloc:
            return self.backend.alloc_kv(shape, dtype)
        return Backend.alloc_kv(self, shape, dtype)

    def decoder_step(self, kv: KVBuffer, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``decoder_step`` over ``kv``; every output checked (``new_kv`` included) before
        it is returned. Raises EngineError / NonFiniteError (the step stays uncommitted)."""
        if not self._own_kv:
            kv.pending_new_kv = None             # a failed step leaves nothing to commit
            return Backend.decoder_step(self, kv, inputs)
        try:
            out = self.backend.decoder_step(kv, inputs)
        except StreamgraphError:
            raise
        except Exception as e:
            raise _engine_error(DECODER_STEP, e) from e
        bad = nonfinite_outputs(out)
        if bad:
            raise NonFiniteError(f"{DECODER_STEP} produced NaN/Inf in {', '.join(bad)}", engine=DECODER_STEP)
        return out

    def commit_kv(self, kv: KVBuffer, write_slots: np.ndarray) -> None:
        """Scatter the last step's new KV into ``write_slots`` (>= 0) of ``kv``."""
        if not self._own_kv:
            return Backend.commit_kv(self, kv, write_slots)
        try:
            self.backend.commit_kv(kv, write_slots)
        except StreamgraphError:
            raise
        except Exception as e:
            raise _engine_error(DECODER_STEP, e) from e


# ---------------------------------------------------------------------- prompt format
def prompt_format(prompt: dict, tokenizer) -> tuple[dict[str, str], set[int]]:
    """The prompt pieces (``prefix``, ``before_question``, ``after_question``,
    ``after_answer``) and the stop token ids of a bundle's manifest ``prompt`` section: its
    own ``format`` / ``stop_token_ids`` where it has them, ChatML (``<|im_end|>``,
    ``<|endoftext|>``) otherwise."""
    system = prompt.get("system")
    fmt = {"prefix": f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{VISION_START}",
           "before_question": f"{VISION_END}\n",
           "after_question": f"{IM_END}\n{IM_START}assistant\n",
           "after_answer": f"{IM_END}\n{IM_START}user\n{VISION_START}",
           **prompt.get("format", {})}
    stop = prompt.get("stop_token_ids") or [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(ENDOFTEXT)]
    return fmt, {i for i in stop if i is not None}


# ---------------------------------------------------------------------- the decoder
class Decoder:
    """Decoder steps, prefill and greedy generation of one session over its KV buffer.

    ``plan``: the bundle's plan; ``backend``: a :class:`GuardedBackend`; ``kv``: the session's
    buffer ``[L,2,B,Hkv,S,Dh]`` (from ``backend.alloc_kv``); ``policy``: its cache policy;
    ``prompt``: the manifest's ``prompt`` section; ``video_end``: the video-end embedding
    ``[1,1,C]`` or None. With ``trace=True`` every step's logits ``[V]``, inputs and
    ``last_hidden`` are appended to :attr:`trace` (parity tests). ``last_hidden [C]`` is the
    final-norm hidden state of the last valid token of the latest committed step.

    The answer turn: :meth:`answer` leaves it open (``answer_open``) until the next frame or
    question writes its end (:meth:`close_answer`), so an answer abandoned or failed midway
    is closed consistently."""

    def __init__(self, plan, backend: GuardedBackend, kv: KVBuffer, policy: CachePolicy, tokenizer,
                 prompt: dict, video_end: np.ndarray | None = None, trace: bool = False):
        self.plan = plan
        self.backend = backend
        self.kv = kv
        self.policy = policy
        self.tokenizer = tokenizer
        self.format, self.stop_ids = prompt_format(prompt, tokenizer)
        self.video_end = video_end
        self.trace_enabled = trace
        self.trace: list[dict] = []
        self.last_hidden: np.ndarray | None = None
        self.answer_open = False
        self.answer_ids: list[int] = []
        self.unfed_ids: list[int] = []        # answer tokens decoded but not yet run through the decoder
        self.segment_frames = 0               # frames prefilled since the last question
        # the decoder_step inputs this bundle's engine takes (window_valid / streaming_heads
        # only in engines that have them), read once
        names = {spec.name for spec in plan.engines[DECODER_STEP].inputs}
        self._window = WINDOW_VALID in names
        self._heads = STREAMING_HEADS in names
        shape = plan.kv.shape
        self._no_streaming_heads = np.zeros((shape[0], shape[3]), dtype=bool)     # [L, Hkv]

    # ------------------------------------------------------------------ steps
    def _inputs(self, embeds: np.ndarray, n_valid: int, step: StepPlan) -> dict[str, np.ndarray]:
        t = embeds.shape[1]
        valid = np.zeros((1, t), dtype=bool)
        valid[0, :n_valid] = True
        inputs = {INPUTS_EMBEDS: embeds, POSITIONS: step.positions[None], TOKEN_VALID: valid,
                  CACHE_POSITIONS: step.cache_positions[None], CACHE_VALID: step.cache_valid[None]}
        if self._window:
            w = step.window_valid if step.window_valid is not None else step.cache_valid
            inputs[WINDOW_VALID] = w[None]
        if self._heads:
            h = self.policy.streaming_heads
            inputs[STREAMING_HEADS] = self._no_streaming_heads if h is None else h
        return inputs

    def step(self, embeds: np.ndarray, n_valid: int, kind: str, offsets: np.ndarray | None = None) -> np.ndarray:
        """Run one chunk ``embeds [1,T,C]`` (first ``n_valid`` valid) of ``kind`` and commit
        its KV. Returns ``logits [V]`` of the last valid token. Raises EngineError /
        NonFiniteError (nothing committed: KV buffer and policy unchanged), CapacityError
        from the policy."""
        step = self.policy.plan_step(embeds.shape[1], n_valid, offsets, kind=kind)
        out = self.backend.decoder_step(self.kv, self._inputs(embeds, n_valid, step))   # checked
        self.backend.commit_kv(self.kv, step.write_slots)
        self.policy.commit(step, out)
        logits = out[LOGITS][0]
        if LAST_HIDDEN in out:
            self.last_hidden = out[LAST_HIDDEN][0]
        if self.trace_enabled:
            self.trace.append({"kind": kind, "logits": logits.copy(), "inputs_embeds": embeds.copy(),
                               "n_valid": n_valid, "last_hidden": self.last_hidden})
        return logits

    def probe(self, embeds: np.ndarray, n_valid: int) -> np.ndarray:
        """The engine work of a chunk without touching the cache policy or committing any KV
        (calibration): every slot visible, positions past the cache. Returns ``logits [V]``."""
        t, s_cap = embeds.shape[1], self.kv.capacity
        step = StepPlan(np.full(t, -1, np.int64), np.arange(s_cap, s_cap + t, dtype=np.int64),
                        np.arange(s_cap, dtype=np.int64), np.ones(s_cap, dtype=bool), n_valid)
        return self.backend.decoder_step(self.kv, self._inputs(embeds, n_valid, step))[LOGITS][0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """``ids [1,T]`` int64 -> ``inputs_embeds [1,T,C]`` (the ``embed_tokens`` engine)."""
        return self.backend.run(EMBED_TOKENS, {INPUT_IDS: ids})[INPUTS_EMBEDS]

    def prefill_ids(self, ids: list[int], kind: str) -> np.ndarray:
        """Prefill token ``ids`` in chunks of ``plan.prefill_chunk_tokens``; returns the last
        chunk's ``logits [V]``."""
        n = self.plan.prefill_chunk_tokens
        logits = None
        for i in range(0, len(ids), n):
            chunk = np.asarray([ids[i:i + n]], dtype=np.int64)
            logits = self.step(self.embed(chunk), chunk.shape[1], kind)
        return logits

    def prefill_text(self, text: str, kind: str) -> np.ndarray:
        return self.prefill_ids(self.encode(text), kind)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt piece (never BOS/EOS around a piece)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prefill_frame(self, tokens: np.ndarray, n_valid: int, offsets: np.ndarray | None) -> None:
        """Prefill a frame's reduced tokens ``[1,T,C]`` (the first ``n_valid`` valid; with
        ``positions: keep`` their ``offsets``) as one ``frame`` chunk."""
        chunk, n_chunk, offsets = self.policy.prepare_frame(tokens, n_valid, offsets)
        self.step(chunk, n_chunk, "frame", offsets)
        self.segment_frames += 1

    # ------------------------------------------------------------------ questions
    def answer(self, rec, max_new_tokens: int | None, clock) -> Iterator[str]:
        """Greedy answer to the question of ``rec`` (a QuestionRecord): closes an open answer
        turn, waits on ``clock`` for ``rec.asked_at``, prefills ``before_question + question +
        after_question`` (after the policy's retrieval pass and the video-end embedding, when
        the bundle has one), then decodes until a stop token or ``max_new_tokens`` (None: the
        plan's ``max_new_tokens``), yielding text pieces. Fills ``rec``; spends the work on
        ``clock``. Leaves the turn open (closed by the next frame or question)."""
        max_new = max_new_tokens or self.plan.max_new_tokens
        if self.answer_open:
            self.close_answer(clock)
        asked = rec.asked_at
        clock.wait_until(asked)
        self.unfed_ids = []
        fmt = self.format
        question = rec.text
        ids = self.encode(f"{fmt['before_question']}{question}{fmt['after_question']}")
        rec.prompt_tokens = len(ids)
        self.answer_open = True
        self.answer_ids = []
        t0 = time.perf_counter()
        self.policy.prepare_question(lambda: self.prefill_text(question, "retrieval"))
        if self.video_end is not None and self.segment_frames:   # opens the question turn
            self.step(self.video_end, 1, "video_end")
        self.segment_frames = 0
        logits = self.prefill_ids(ids, "question")
        token = int(np.argmax(logits))
        clock.spend(time.perf_counter() - t0)
        rec.ttft_ms = 1000.0 * (clock.now() - asked)      # from arrival: waiting included
        rec.ttft_met = clock.now() <= rec.deadline
        text_so_far = ""
        while True:
            if token in self.stop_ids:
                break
            self.answer_ids.append(token)
            self.unfed_ids = [token]
            rec.new_tokens = len(self.answer_ids)
            full = self.tokenizer.decode(self.answer_ids)
            piece, text_so_far = full[len(text_so_far):], full
            rec.answer = full
            if piece:
                yield piece
            if len(self.answer_ids) >= max_new:
                break
            t0 = time.perf_counter()
            logits = self.step(self.embed(np.asarray([[token]], dtype=np.int64)), 1, "decode")
            self.unfed_ids = []
            token = int(np.argmax(logits))
            dt = time.perf_counter() - t0
            clock.spend(dt)
            rec.decode_ms.append(1000.0 * dt)
        rec.slots_in_use = self.policy.slots_in_use
        try:
            self.close_answer(clock)
        except NonFiniteError:
            pass                 # the answer is complete; the turn's end is retried by what comes next

    def close_answer(self, clock) -> None:
        """Write the end of the assistant turn into the cache so frames continue in a new user
        turn: the last answer token if it was never run (the answer stopped at
        ``max_new_tokens``), then ``after_answer`` (which starts with the end-of-turn token).
        An answer that ended on a stop token has all its tokens in the cache already. No-op
        when no answer is open; a failed close leaves it open (retried)."""
        if not self.answer_open:
            return
        tail = self.encode(self.format["after_answer"])
        t0 = time.perf_counter()
        self.prefill_ids(self.unfed_ids + tail, "resume")
        self.answer_open = False             # only once written (a failed close is retried)
        self.unfed_ids = []
        clock.spend(time.perf_counter() - t0)
