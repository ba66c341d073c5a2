"""Session: feeds frames and questions through a compiled bundle (torch-free).

Token stream of a session (ChatML, as Qwen2 chat models use)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|>   (prefix, at open)
    [K visual tokens of frame 0][K of frame 1] ...                                   (push_frame)
    <|vision_end|>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n                (ask: prefill)
    answer tokens ...                                                                (ask: decode)
    <|im_end|>\\n<|im_start|>user\\n<|vision_start|>                                  (resume frames)

Every chunk goes through the same ``decoder_step`` engine; the cache policy plans slots and
positions, and the runtime writes ``new_kv`` into the one static KV buffer.

Bundles of Hugging Face checkpoints carry their own prompt format in the manifest
(``prompt.format``: ``prefix``, ``before_question``, ``after_question``, ``after_answer``, rendered
from the checkpoint's chat template at compile time), their stop token ids
(``prompt.stop_token_ids``) and, for LLaVA-OneVision, an embedding that closes the video
(``prompt.video_end_embedding``: ``image_newline``, prefilled once after the frames of a user
turn, right before the question, as transformers places it after a video's frames). The
ChatML strings above are the defaults for bundles without them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from streamgraph.backends import open_backend
from streamgraph.backends.base import Backend, SerializedBackend
from streamgraph.compiler.bundle import Bundle, open_bundle
from streamgraph.errors import BundleError, NonFiniteError, ReportError
from streamgraph.runtime.clock import Clock, SimulatedClock
from streamgraph.runtime.kv import CachePolicy, KVBuffer, StepPlan, make_policy
from streamgraph.runtime.guard import GuardedBackend
from streamgraph.runtime.metrics import DEFAULT_HISTORY, QuestionRecord
from streamgraph.runtime.preprocess import preprocess_frame
from streamgraph.runtime.reduction import EncoderStage, ReducerStage
from streamgraph.runtime.scheduler import Scheduler
from streamgraph.runtime.stream import StreamBase, check_question, check_time

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class Session(StreamBase):
    """A live streaming session over one bundle.

    Use :meth:`open` (engines of its own) or ``Session.open(engines)`` / :meth:`Engines.session`
    (engines shared with the other streams of the bundle). ``push_frame`` runs (or drops) one frame under its deadline and returns
    its :class:`~streamgraph.runtime.metrics.FrameRecord`; ``ask`` streams an answer's text
    pieces; ``report`` summarises the run. With ``trace=True`` every decoder step's logits are
    kept in ``self.trace`` (for parity tests). Several sessions can share one executor through
    :class:`~streamgraph.runtime.runner.StreamRunner` (EDF across streams).
    ``last_hidden [C]`` is the decoder's final-norm hidden state of the last valid token of the
    latest step. ``budgets`` lists the token budget buckets a frame can run at (ascending).
    ``history`` is how many recent records of each kind stay in memory (see
    :class:`~streamgraph.runtime.stream.StreamBase`).

    Every engine output is checked for NaN/Inf before anything stores it
    (:class:`~streamgraph.runtime.guard.GuardedBackend`): a frame that hits one becomes an
    ``error`` record and is not committed (KV buffer, cache policy and reducer state unchanged;
    the stream goes on as if it had been dropped); a question that hits one raises
    :class:`~streamgraph.errors.NonFiniteError` with the error in its record.

    Not thread-safe: drive a session from one thread at a time. To ask questions from other
    threads while frames stream, run it in a :class:`~streamgraph.runtime.runner.StreamRunner`
    and use :meth:`~streamgraph.runtime.runner.StreamRunner.ask`.
    """

    def __init__(self, bundle: Bundle, backend: Backend, *, clock: Clock | None = None,
                 overload: str | None = None, trace: bool = False, history: int = DEFAULT_HISTORY,
                 _assets: "_Assets | None" = None):
        self.bundle = bundle
        self.plan = bundle.plan
        self.backend = GuardedBackend(backend)    # engine errors named, NaN/Inf outputs refused
        slo = bundle.manifest["slo"]
        self.encoder_stage = EncoderStage(self.plan, self.backend)
        self.reducer_stage = ReducerStage(self.plan, self.backend)
        self.budgets = self.reducer_stage.budgets          # ascending token-budget buckets
        StreamBase.__init__(self, Scheduler(overload or slo["overload"], slo["frame_deadline_ms"], slo["ttft_ms"],
                                            budgets=self.budgets), clock or SimulatedClock(), history)
        self.clock_default = clock is None      # a StreamRunner may install its own clock (live sources)
        self.engines: Engines | None = None     # set when opened on shared Engines
        assets = _assets or _Assets.load(bundle)
        self.tokenizer = assets.tokenizer
        self.kv = KVBuffer(self.plan.kv.shape, self.plan.kv.dtype)
        if self.kv.nbytes != self.plan.kv.bytes:
            raise AssertionError(f"KV buffer {self.kv.nbytes} B != plan {self.plan.kv.bytes} B")
        cache = self.plan.cache
        self.policy: CachePolicy = make_policy(cache["op"], cache["params"], self.plan)
        self.policy.attach(self.kv)
        self.last_hidden: np.ndarray | None = None
        self.trace_enabled = trace
        self.trace: list[dict] = []
        self._answer_open = False
        self._answer_ids: list[int] = []
        self._unfed_ids: list[int] = []
        prompt = bundle.manifest["prompt"]
        system = prompt.get("system")
        self._format = {"prefix": f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{VISION_START}",
                        "before_question": f"{VISION_END}\n",
                        "after_question": f"{IM_END}\n{IM_START}assistant\n",
                        "after_answer": f"{IM_END}\n{IM_START}user\n{VISION_START}",
                        **prompt.get("format", {})}
        stop = prompt.get("stop_token_ids") or [self.tokenizer.token_to_id(IM_END),
                                                 self.tokenizer.token_to_id(ENDOFTEXT)]
        self._stop_ids = {i for i in stop if i is not None}
        self._video_end = assets.video_end
        self._segment_frames = 0          # frames prefilled since the last question
        self._pixel_dtype = np.dtype(self.plan.engines["vision_encoder"].inputs[0].dtype)
        self._prefill_text(self._format["prefix"], "prefix")

    @classmethod
    def open(cls, bundle_dir: "str | Path | Engines", backend: str | None = None, *, clock: Clock | None = None,
             overload: str | None = None, trace: bool = False, history: int = DEFAULT_HISTORY,
             **backend_options) -> "Session":
        """Start a session on a bundle: ``bundle_dir`` is a bundle directory (its engines are
        loaded for this session alone) or an :class:`Engines` (the bundle's engines loaded
        once, shared with every other session opened on it; this session gets its own KV
        buffer, cache policy, reducer/encoder state and scheduler).

        ``backend`` (default ``onnxruntime``) and ``backend_options`` apply to a directory
        only (an Engines already has its backend). ``bundle_key`` (in ``backend_options``):
        HMAC key of a keyed bundle (default ``$STREAMGRAPH_BUNDLE_KEY``, docs/bundles.md). The
        bundle directory stays share-locked until its engines are loaded, so a concurrent
        compile cannot swap it meanwhile.

        Raises :class:`~streamgraph.errors.BundleError` (one line naming the file) for a
        missing, corrupt, tampered or malformed bundle,
        :class:`~streamgraph.errors.BackendUnavailableError` when the backend cannot run, and
        ValueError for backend options given with an Engines."""
        if isinstance(bundle_dir, Engines):
            if backend is not None or backend_options:
                raise ValueError("Session.open(engines): the backend and its options are the Engines' "
                                 "(given to Engines.load)")
            return bundle_dir.session(clock=clock, overload=overload, trace=trace, history=history)
        key = backend_options.pop("bundle_key", None)
        with open_bundle(bundle_dir, key=key) as bundle:
            return cls(bundle, open_backend(backend or "onnxruntime", bundle, **backend_options), clock=clock,
                       overload=overload, trace=trace, history=history)

    # ------------------------------------------------------------------ decoder steps
    def _decoder_step(self, embeds: np.ndarray, n_valid: int, kind: str,
                      offsets: np.ndarray | None = None, commit: bool = True) -> np.ndarray:
        """Run one chunk ``embeds [1,T,C]`` (first ``n_valid`` valid) and (``commit``) write
        its KV. Returns ``logits [V]`` of the last valid token."""
        t = embeds.shape[1]
        if commit:
            step = self.policy.plan_step(t, n_valid, offsets, kind=kind)
        else:   # cost probe (calibration): same engine work, no cache-policy state touched
            s_cap = self.kv.capacity
            step = StepPlan(np.full(t, -1, np.int64), np.arange(s_cap, s_cap + t, dtype=np.int64),
                            np.arange(s_cap, dtype=np.int64), np.ones(s_cap, dtype=bool), n_valid)
        valid = np.zeros((1, t), dtype=bool)
        valid[0, :n_valid] = True
        out = self.backend.run("decoder_step", {
            "inputs_embeds": embeds, "positions": step.positions[None], "token_valid": valid,
            "kv_cache": self.kv.data, "cache_positions": step.cache_positions[None],
            "cache_valid": step.cache_valid[None]})
        logits = out["logits"][0]
        if not commit:
            return logits
        self.kv.write(out["new_kv"], step.write_slots)
        self.policy.commit(step, out)
        if "last_hidden" in out:
            self.last_hidden = out["last_hidden"][0]
        if self.trace_enabled:
            self.trace.append({"kind": kind, "logits": logits.copy(), "inputs_embeds": embeds.copy(),
                               "n_valid": n_valid, "last_hidden": self.last_hidden})
        return logits

    def _prefill_ids(self, ids: list[int], kind: str) -> np.ndarray:
        step = self.plan.prefill_chunk_tokens
        logits = None
        for i in range(0, len(ids), step):
            chunk = np.asarray([ids[i:i + step]], dtype=np.int64)
            embeds = self.backend.run("embed_tokens", {"input_ids": chunk})["inputs_embeds"]
            logits = self._decoder_step(embeds, chunk.shape[1], kind)
        return logits

    def _prefill_text(self, text: str, kind: str) -> np.ndarray:
        return self._prefill_ids(self._encode(text), kind)

    def _encode(self, text: str) -> list[int]:
        # the prompt is tokenized piece by piece: never add BOS/EOS around a piece
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ------------------------------------------------------------------ frames
    @property
    def slots_in_use(self) -> int:
        return self.policy.slots_in_use

    @property
    def kv_bytes(self) -> int:
        return self.kv.nbytes

    def push_frame(self, frame, timestamp: float | None = None, *, budget: int | None = None):
        """Run one frame through encoder -> reducer -> prefill, or drop it (see
        :meth:`StreamBase.push_frame`). ``budget`` is the token budget bucket to run (one of
        :attr:`budgets`; None = whatever the overload policy picks, the largest unless it
        degrades); the record's ``budget`` is the one used (N for a frame sent whole, e.g. DTD's
        first frame). Raises ValueError for a budget that is not a bucket, CapacityError when
        the cache policy has no room (``full`` at capacity); the frame's record then says
        ``error``."""
        if budget is not None:
            budget = self.reducer_stage.resolve(budget)
        if self._answer_open:
            try:
                self._close_answer()
            except NonFiniteError:
                pass                 # still open: retried by execute_frame, which records the error
        return super().push_frame(frame, timestamp, budget=budget)

    def calibrate(self, repeats: int = 2) -> dict[str, float]:
        """Measure every stage at every budget bucket on a blank frame, without touching the
        KV cache or the encoder/reducer state, and seed the scheduler's cost model with the
        median (seconds). The first run per bucket is a warm-up and is discarded."""
        h, w = self.plan.image_size
        image = np.zeros((h, w, 3), dtype=np.uint8)
        live = self.encoder_stage, self.reducer_stage
        try:
            for budget in self.budgets:
                self.encoder_stage = EncoderStage(self.plan, self.backend)   # scratch state
                self.reducer_stage = ReducerStage(self.plan, self.backend)
                samples: dict[str, list[float]] = {}
                for i in range(repeats + 1):
                    stage_s, *_ = self._run_frame(image, budget, commit=False)
                    for k, v in stage_s.items():
                        if i:
                            samples.setdefault(k, []).append(v)
                for k, v in samples.items():
                    self.scheduler.costs.set(k, float(np.median(v)), budget)
        finally:
            self.encoder_stage, self.reducer_stage = live
        return dict(self.scheduler.costs.mean)

    def execute_frame(self, image, budget: int | None = None) -> tuple[dict[str, float], int, dict]:
        if self._answer_open:
            self.stage = "prefill"
            self._close_answer()
        # a frame that fails is not committed: the KV buffer and the cache policy are written
        # only after a finite decoder step, and the reducer state is put back here (the
        # encoder's caches, finite functions of the frame's pixels, are kept)
        reducer = self.reducer_stage
        saved = ({k: v.copy() for k, v in reducer.state.items()}, reducer.frames)
        try:
            stage_s, n_valid, used, mode = self._run_frame(image, reducer.resolve(budget))
        except BaseException:
            for k, v in saved[0].items():
                np.copyto(reducer.state[k], v)
            reducer.frames = saved[1]
            raise
        return stage_s, n_valid, {"budget": used, "encoder": mode}

    def _run_frame(self, image, budget: int, commit: bool = True) -> tuple[dict[str, float], int, int, str]:
        """preprocess -> encode -> reduce -> prefill; returns seconds per stage, tokens kept,
        the budget used and the encoder path (full/refresh/reuse/skip). Only the valid prefix
        of the reduced tokens is prefilled; a frame with none skips the decoder. With
        ``commit=False`` the decoder step runs but nothing is written to the KV cache."""
        stage_s: dict[str, float] = {}
        t0 = time.perf_counter()
        self.stage = "preprocess"
        pixels = preprocess_frame(image, self.plan.image_size, self.plan.image_mean, self.plan.image_std,
                                  self.plan.resample, self.plan.rescale_factor).astype(self._pixel_dtype, copy=False)
        t1 = time.perf_counter()
        stage_s["preprocess"] = t1 - t0
        self.stage = "encode"
        tokens, mode = self.encoder_stage.run(pixels)
        t2 = time.perf_counter()
        stage_s["encode"] = t2 - t1
        self.stage = "reduce"
        reduced = self.reducer_stage.run(tokens, budget)
        if self.plan.reducer is not None:
            t3 = time.perf_counter()
            stage_s["reduce"] = t3 - t2
            t2 = t3
        self.stage = "prefill"
        if reduced.n_valid and commit:
            chunk, n_chunk, offsets = self.policy.prepare_frame(reduced.tokens, reduced.n_valid, reduced.offsets)
            self._decoder_step(chunk, n_chunk, "frame", offsets)
            self._segment_frames += 1
        elif reduced.n_valid:
            self._decoder_step(reduced.tokens, reduced.n_valid, "frame", commit=False)
        if commit and reduced.reserved:     # positions: keep: the frame spans all N positions
            self.policy.reserve_positions(reduced.reserved)
        stage_s["prefill"] = time.perf_counter() - t2
        return stage_s, reduced.n_valid, reduced.budget, mode

    # ------------------------------------------------------------------ questions
    def ask(self, question: str, max_new_tokens: int | None = None, at: float | None = None) -> Iterator[str]:
        """Ask about the stream so far; returns a generator of the answer's text pieces as
        they are decoded (greedy), at most ``max_new_tokens`` tokens (None: the graph's
        ``max_new_tokens``). ``at`` is the stream time (s) the question arrives (default: now).
        It is served at once, ahead of any later frame, with deadline ``arrival +
        slo.ttft_ms`` for its first token; its record is in ``self.questions``.

        Raises ValueError at once for an empty question, ``max_new_tokens`` < 1 (0 is refused,
        not read as the default) or an ``at`` that is not a finite number >= 0. While
        answering, an engine error (:class:`~streamgraph.errors.EngineError`, or
        :class:`~streamgraph.errors.NonFiniteError` for a NaN/Inf output; the step is not
        committed) is raised with its ``Type: message`` kept in the record's ``error``; the
        next frame or question closes the turn so the cache stays consistent."""
        check_question(question, max_new_tokens)
        asked = self.clock.now() if at is None else check_time("at", at)
        rec = QuestionRecord(text=question, asked_at=asked, deadline=asked + self.scheduler.ttft)
        return self._ask(question, max_new_tokens or self.plan.max_new_tokens, rec)

    def _ask(self, question: str, max_new: int, rec: QuestionRecord) -> Iterator[str]:
        """Runs :meth:`_answer`; the record is finished however it ends (an answer abandoned
        by the caller keeps what was decoded, without an error)."""
        self._begin_question(rec)
        try:
            yield from self._answer(question, max_new, rec)
        except GeneratorExit:
            rec.slots_in_use = self.policy.slots_in_use
            self._finish_question(rec)
            raise
        except BaseException as e:
            rec.slots_in_use = self.policy.slots_in_use
            try:
                self._finish_question(rec, e)
            except ReportError:
                pass                       # the writer keeps its error; the first error wins
            raise
        self._finish_question(rec)

    def _answer(self, question: str, max_new: int, rec: QuestionRecord) -> Iterator[str]:
        if self._answer_open:
            self._close_answer()
        asked = rec.asked_at
        self.clock.wait_until(asked)
        self._unfed_ids = []
        fmt = self._format
        ids = self._encode(f"{fmt['before_question']}{question}{fmt['after_question']}")
        rec.prompt_tokens = len(ids)
        self._answer_open = True
        self._answer_ids: list[int] = []
        t0 = time.perf_counter()
        self.policy.prepare_question(lambda: self._prefill_text(question, "retrieval"))
        if self._video_end is not None and self._segment_frames:   # opens the question turn
            self._decoder_step(self._video_end, 1, "video_end")
        self._segment_frames = 0
        logits = self._prefill_ids(ids, "question")
        token = int(np.argmax(logits))
        self.clock.spend(time.perf_counter() - t0)
        rec.ttft_ms = 1000.0 * (self.clock.now() - asked)      # from arrival: waiting included
        rec.ttft_met = self.clock.now() <= rec.deadline
        text_so_far = ""
        self._unfed_ids = []          # answer tokens decoded but not yet run through the decoder
        while True:
            if token in self._stop_ids:
                break
            self._answer_ids.append(token)
            self._unfed_ids = [token]
            rec.new_tokens = len(self._answer_ids)
            full = self.tokenizer.decode(self._answer_ids)
            piece, text_so_far = full[len(text_so_far):], full
            rec.answer = full
            if piece:
                yield piece
            if len(self._answer_ids) >= max_new:
                break
            t0 = time.perf_counter()
            embeds = self.backend.run("embed_tokens", {"input_ids": np.asarray([[token]], dtype=np.int64)})["inputs_embeds"]
            logits = self._decoder_step(embeds, 1, "decode")
            self._unfed_ids = []
            token = int(np.argmax(logits))
            dt = time.perf_counter() - t0
            self.clock.spend(dt)
            rec.decode_ms.append(1000.0 * dt)
        rec.slots_in_use = self.policy.slots_in_use
        try:
            self._close_answer()
        except NonFiniteError:
            pass                 # the answer is complete; the turn's end is retried by what comes next

    def _close_answer(self) -> None:
        """Write the end of the assistant turn into the cache so frames continue in a new user
        turn: the last answer token if it was never run (the answer stopped at
        ``max_new_tokens``), then ``after_answer`` (which starts with the end-of-turn token).
        An answer that ended on a stop token has all its tokens in the cache already."""
        if not self._answer_open:
            return
        last = self._unfed_ids
        tail = self._encode(self._format["after_answer"])
        t0 = time.perf_counter()
        self._prefill_ids(last + tail, "resume")
        self._answer_open = False             # only once written (a failed close is retried)
        self._unfed_ids = []
        self.clock.spend(time.perf_counter() - t0)

    # ------------------------------------------------------------------ report
    def report_meta(self) -> dict:
        return {**super().report_meta(), "bundle": str(self.bundle.path), "name": self.bundle.name,
                "backend": self.backend.name, "lock_key": self.bundle.lock_key, "cache": self.plan.cache,
                "kv_bytes_planned": self.plan.kv.bytes, "kv_bytes_allocated": self.kv.nbytes,
                "kv_buffer_address_constant": self.kv.data.ctypes.data == self.kv.address}


# ---------------------------------------------------------------------- shared engines
@dataclass(frozen=True)
class _Assets:
    """What every session of a bundle reads from its files besides the engines: the
    tokenizer and the video-end embedding ``[1,1,C]`` (None when the bundle has none)."""

    tokenizer: object
    video_end: np.ndarray | None

    @classmethod
    def load(cls, bundle: Bundle) -> "_Assets":
        """Raises BundleError (one line naming the file) for an unusable tokenizer or
        video-end embedding."""
        from tokenizers import Tokenizer

        prompt = bundle.manifest["prompt"]
        tok_rel = prompt["tokenizer"]
        try:                              # the file verified at load, inside the bundle
            tokenizer = Tokenizer.from_file(str(bundle.file(tok_rel)))
        except BundleError:
            raise
        except Exception as e:            # tokenizers' parse errors: one line naming the file
            raise BundleError(f"{bundle.path / tok_rel}: not a usable tokenizer: "
                              f"{' '.join(str(e).split())}") from None
        video_end = prompt.get("video_end_embedding")
        emb = None
        if video_end:
            hidden = bundle.plan.hidden_size
            try:
                emb = np.load(bundle.file(video_end), allow_pickle=False)
                if not isinstance(emb, np.ndarray) or emb.size != hidden:
                    raise ValueError(f"expected {hidden} values, got {getattr(emb, 'shape', emb)}")
            except BundleError:
                raise
            except Exception as e:
                raise BundleError(f"{bundle.path / video_end}: not a usable video-end embedding: "
                                  f"{' '.join(str(e).split())}") from None
            emb = np.ascontiguousarray(emb.reshape(1, 1, -1))
            emb.flags.writeable = False   # shared by every session of the bundle
        return cls(tokenizer, emb)


class Engines:
    """A bundle's engines loaded once, shared by every stream of that bundle.

    ``Engines.load(bundle_dir)`` verifies the bundle and opens its backend once (for
    ``onnxruntime``: one ``InferenceSession`` per engine), with the tokenizer and the
    video-end embedding. Each :meth:`session` (or ``Session.open(engines)``) then allocates
    only what is its own: the KV buffer (``plan.kv.bytes``), the cache policy, the
    reducer/encoder state buffers and the scheduler with its cost model. A stream's outputs
    are the same as on engines of its own (engines hold no stream state).

    Memory: the engine weights once, plus per stream the planned KV buffer and state
    (``bench/shared_backend.py`` measures it).

    Threads: when the backend is thread-safe (``backend.thread_safe``; ONNX Runtime's
    ``InferenceSession.run`` is), sessions on one Engines may run on different threads at
    the same time; a backend that is not (``tensorrt``, ``torch``) is wrapped in
    :class:`~streamgraph.backends.base.SerializedBackend` (one engine call at a time). One
    :class:`Session` is not thread-safe: drive each from one thread at a time (to ask from other
    threads while it streams, use :meth:`StreamRunner.ask
    <streamgraph.runtime.runner.StreamRunner.ask>`).
    """

    def __init__(self, bundle: Bundle, backend: Backend, _assets: _Assets | None = None):
        self.bundle = bundle
        self.backend: Backend = backend if getattr(backend, "thread_safe", False) else SerializedBackend(backend)
        self._assets = _assets or _Assets.load(bundle)
        self._lock = threading.Lock()
        self.sessions_opened = 0              # sessions started on these engines so far

    @classmethod
    def load(cls, bundle_dir: str | Path, backend: str = "onnxruntime", *, bundle_key: bytes | str | None = None,
             **backend_options) -> "Engines":
        """Load and verify the bundle at ``bundle_dir`` and open its engines with ``backend``
        (``onnxruntime``, ``torch``, ``tensorrt``; ``backend_options`` go to it, e.g.
        ``threads``). The directory stays share-locked until the engines and the tokenizer are
        loaded, so a concurrent compile cannot swap it meanwhile.

        Raises :class:`~streamgraph.errors.BundleError` (one line naming the file) for a
        missing, corrupt, tampered or malformed bundle,
        :class:`~streamgraph.errors.BackendUnavailableError` when the backend cannot run."""
        with open_bundle(bundle_dir, key=bundle_key) as bundle:
            be = open_backend(backend, bundle, **backend_options)
            return cls(bundle, be, _Assets.load(bundle))

    @property
    def name(self) -> str:
        """The backend's name (``onnxruntime``, ...)."""
        return self.backend.name

    def session(self, *, clock: Clock | None = None, overload: str | None = None, trace: bool = False,
                history: int = DEFAULT_HISTORY) -> Session:
        """A new :class:`Session` on these engines (arguments as :meth:`Session.open`)."""
        s = Session(self.bundle, self.backend, clock=clock, overload=overload, trace=trace, history=history,
                    _assets=self._assets)
        s.engines = self
        with self._lock:
            self.sessions_opened += 1
        return s

    def close(self) -> None:
        """Release the backend (sessions still open on it must not be used afterwards)."""
        self.backend.close()

    def __enter__(self) -> "Engines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
