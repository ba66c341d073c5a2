"""Session: a stream over a compiled bundle — thin wiring of the session's roles (torch-free).

A :class:`Session` is a :class:`~streamgraph.runtime.stream.StreamBase` (records, clock, the
scheduler's decision per frame, the question entry) over a
:class:`~streamgraph.runtime.pipeline.FramePipeline` (its executor: preprocess -> encode ->
reduce -> prefill, calibration) and a :class:`~streamgraph.runtime.decoder.Decoder` (decoder
steps over the KV buffer, the prompt format, greedy generation, the NaN/Inf guard). This
module opens them: :meth:`Session.open`, :class:`Engines` (a bundle's engines shared by its
streams) and the assets every session of a bundle reads (tokenizer, video-end embedding).
None of its code runs per frame.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamgraph.backends import open_backend
from streamgraph.backends.base import Backend, SerializedBackend
from streamgraph.compiler.bundle import Bundle, open_bundle
from streamgraph.errors import BundleError
from streamgraph.kv import CachePolicy, make_policy
from streamgraph.runtime.decoder import Decoder, GuardedBackend
from streamgraph.runtime.metrics import DEFAULT_HISTORY
from streamgraph.runtime.pipeline import FramePipeline
from streamgraph.runtime.scheduler import Scheduler
from streamgraph.runtime.stream import Clock, SimulatedClock, StreamBase


class Session(StreamBase):
    """A live streaming session over one bundle.

    Use :meth:`open` (engines of its own) or ``Session.open(engines)`` / :meth:`Engines.session`
    (engines shared with the other streams of the bundle). ``push_frame`` runs (or drops) one frame under its deadline and returns
    its :class:`~streamgraph.runtime.metrics.FrameRecord`; ``ask`` streams an answer's text
    pieces; ``report`` summarises the run. With ``trace=True`` every decoder step's logits are
    kept in ``self.trace`` (for parity tests). Several sessions can share one executor through
    :class:`~streamgraph.runtime.stream.StreamRunner` (EDF across streams).
    ``last_hidden [C]`` is the decoder's final-norm hidden state of the last valid token of the
    latest step. ``budgets`` lists the token budget buckets a frame can run at (ascending).
    ``history`` is how many recent records of each kind stay in memory (see
    :class:`~streamgraph.runtime.stream.StreamBase`).

    Roles: ``pipeline`` (:class:`~streamgraph.runtime.pipeline.FramePipeline`, the executor),
    ``decoder`` (:class:`~streamgraph.runtime.decoder.Decoder`), ``kv`` (the KV buffer, from
    ``backend.alloc_kv``), ``policy`` (the cache policy), ``backend`` (the guarded backend).

    Every engine output is checked for NaN/Inf before anything stores it
    (:class:`~streamgraph.runtime.decoder.GuardedBackend`): a frame that hits one becomes an
    ``error`` record and is not committed (KV buffer, cache policy and reducer state unchanged;
    the stream goes on as if it had been dropped); a question that hits one raises
    :class:`~streamgraph.errors.NonFiniteError` with the error in its record.

    Not thread-safe: drive a session from one thread at a time. To ask questions from other
    threads while frames stream, run it in a :class:`~streamgraph.runtime.stream.StreamRunner`
    and use :meth:`~streamgraph.runtime.stream.StreamRunner.ask`.
    """

    def __init__(self, bundle: Bundle, backend: Backend, *, clock: Clock | None = None,
                 overload: str | None = None, trace: bool = False, history: int = DEFAULT_HISTORY,
                 _assets: "_Assets | None" = None):
        self.bundle = bundle
        self.plan = plan = bundle.plan
        self.backend = GuardedBackend(backend)    # engine errors named, NaN/Inf outputs refused
        slo = bundle.manifest["slo"]
        assets = _assets or _Assets.load(bundle)
        self.tokenizer = assets.tokenizer
        self.kv = self.backend.alloc_kv(plan.kv.shape, plan.kv.dtype)
        if self.kv.nbytes != plan.kv.bytes:
            raise AssertionError(f"KV buffer {self.kv.nbytes} B != plan {plan.kv.bytes} B")
        cache = plan.cache
        self.policy: CachePolicy = make_policy(cache["op"], cache["params"], plan)
        self.policy.attach(self.kv)
        self.decoder = Decoder(plan, self.backend, self.kv, self.policy, assets.tokenizer,
                               bundle.manifest["prompt"], assets.video_end, trace)
        self.pipeline = FramePipeline(plan, self.backend, self.decoder, owner=self)
        self.budgets = self.pipeline.budgets               # ascending token-budget buckets
        StreamBase.__init__(self, Scheduler(overload or slo["overload"], slo["frame_deadline_ms"], slo["ttft_ms"],
                                            budgets=self.budgets), clock or SimulatedClock(), history,
                            executor=self.pipeline)
        self.clock_default = clock is None      # a StreamRunner may install its own clock (live sources)
        self.engines: Engines | None = None     # set when opened on shared Engines
        self.trace_enabled = trace
        self.trace: list[dict] = self.decoder.trace
        self.decoder.prefill_text(self.decoder.format["prefix"], "prefix")

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

    # ------------------------------------------------------------------ the roles' state
    @property
    def last_hidden(self) -> np.ndarray | None:
        """``[C]`` final-norm hidden state of the last valid token of the latest step."""
        return self.decoder.last_hidden

    @property
    def encoder_stage(self):
        return self.pipeline.encoder_stage

    @property
    def reducer_stage(self):
        return self.pipeline.reducer_stage

    @property
    def _format(self) -> dict[str, str]:
        return self.decoder.format

    def _encode(self, text: str) -> list[int]:
        return self.decoder.encode(text)

    @property
    def _answer_ids(self) -> list[int]:
        return self.decoder.answer_ids

    @property
    def _video_end(self) -> np.ndarray | None:
        return self.decoder.video_end

    @_video_end.setter
    def _video_end(self, value: np.ndarray | None) -> None:
        self.decoder.video_end = value

    # ------------------------------------------------------------------ frames
    def execute_frame(self, image, budget: int | None = None) -> tuple[dict[str, float], int, dict]:
        """One frame through the pipeline without the stream's bookkeeping (see
        :meth:`FramePipeline.execute_frame <streamgraph.runtime.pipeline.FramePipeline.execute_frame>`)."""
        return self.pipeline.execute_frame(image, budget)

    def calibrate(self, repeats: int = 2) -> dict[str, float]:
        """Measure every stage at every budget bucket on a blank frame, without touching the
        KV cache or the encoder/reducer state, and seed the scheduler's cost model with the
        median (seconds). The first run per bucket is a warm-up and is discarded."""
        return StreamBase.calibrate(self, repeats)

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
    <streamgraph.runtime.stream.StreamRunner.ask>`).
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
