"""StreamWorker: one Ray actor per node or device — one shared backend, the sessions of its streams.

The actor loads the bundle's engines once (:meth:`Engines.load
<streamgraph.runtime.session.Engines.load>`, ``threads`` intra-op threads) and keeps, for
every stream placed on it, that stream's own :class:`~streamgraph.runtime.session.Session`
(its KV cache lives here and nowhere else) and its source. A driver thread runs them all on
one executor through a :class:`~streamgraph.runtime.stream.StreamRunner` (earliest deadline
first across the actor's streams, overload policy per stream) on one
:class:`~streamgraph.runtime.stream.WallClock`; questions are served between frames by the
same runner (:meth:`StreamRunner.ask <streamgraph.runtime.stream.StreamRunner.ask>`).

A runner serves a fixed set of streams, so when a stream is added or removed the driver stops
the runner after the frame or answer in progress, opens or closes that stream's session (a new
session prefills the system prompt), and starts a new runner over the same sessions: their KV
caches, cost models and records carry over, and frames still pending in the old runner are
handed to the new one (nothing is lost or recorded twice). Questions that were waiting are
asked again on the new runner.

The class is plain Python; :mod:`streamgraph.cluster.cluster` wraps it with ``ray.remote``.
It never imports torch.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamgraph.errors import StreamClosedError, StreamgraphError

log = logging.getLogger(__name__)

#: Upper bounds (s) of the latency histogram buckets shipped to the controller (as serve's /metrics).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PacedCamera:
    """A camera emulated from decoded images: frame ``k`` is captured at epoch time
    ``t0 + k / fps`` (seconds since 1970, so every actor of a cluster agrees on it) and the
    source holds only the newest one, as :class:`~streamgraph.runtime.live.LiveSource` does.
    ``latest()`` returns the newest frame captured since the previous call (None when none),
    stamped with its capture time on ``clock`` (``epoch0`` is the clock's zero as epoch time);
    frames overwritten meanwhile are counted in ``skipped``. ``images``: ``[H, W, 3]`` uint8
    arrays, cycled. Frames handed back with :meth:`carry` are returned first. ``after_k``: a
    stream resumed after a failover starts after this frame (the last one its previous actor
    reported), so no frame is run twice."""

    live = True

    def __init__(self, images: list, fps: float, t0: float, clock, epoch0: float, after_k: int | None = None):
        if not images:
            raise ValueError("a paced camera needs at least one image")
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
        self.images, self.fps, self.t0 = images, float(fps), float(t0)
        self.clock, self.epoch0 = clock, float(epoch0)
        self.running = True          # the runner must not replace the clock
        self.ended = False
        self.first_k: int | None = None
        self.last_k: int | None = None
        self.delivered = 0
        self.skipped = 0
        self._carry: deque = deque()
        self._floor = -1 if after_k is None else int(after_k)

    def k_at(self, epoch: float) -> int:
        """Index of the newest frame captured at or before ``epoch``."""
        return math.floor((epoch - self.t0) * self.fps + 1e-9)

    def carry(self, frames) -> None:
        self._carry.extend(frames)

    def latest(self, timeout: float | None = 0):
        from streamgraph.runtime.sources import Frame

        if self._carry:
            return self._carry.popleft()
        k = self.k_at(self.epoch0 + self.clock.now())
        if k <= self._floor or (self.last_k is not None and k <= self.last_k):
            return None
        if self.last_k is None:
            self.first_k = k
        else:
            self.skipped += k - self.last_k - 1
        self.last_k = k
        self.delivered += 1
        capture = self.t0 + k / self.fps - self.epoch0
        return Frame(image=self.images[k % len(self.images)], timestamp=capture, index=k, source_index=k)

    def close(self, timeout: float | None = None) -> None:
        pass                           # the worker ends a stream, not the runner

    def shutdown(self) -> None:
        self.ended = True


class _LiveFeed:
    """A live source (URL, device, pipe) for the worker: frames the old runner left pending
    come back first; ``close`` from a runner is ignored (runners come and go), ``shutdown``
    closes the source."""

    live = True

    def __init__(self, source):
        self.source = source
        self.running = True
        self.first_k = self.last_k = None
        self.delivered = 0
        self.fps = None
        self._carry: deque = deque()

    @property
    def clock(self):
        return self.source.clock

    @property
    def ended(self) -> bool:
        return bool(getattr(self.source, "ended", False))

    @property
    def skipped(self) -> int:
        """Frames the source's capture overwrote before the executor took them."""
        stats = getattr(self.source, "stats", None)
        return int(stats.get("skipped_by_capture", 0)) if isinstance(stats, dict) else 0

    def carry(self, frames) -> None:
        self._carry.extend(frames)

    def latest(self, timeout: float | None = 0):
        if self._carry:
            return self._carry.popleft()
        frame = self.source.latest(0)
        if frame is not None:
            self.delivered += 1
        return frame

    def close(self, timeout: float | None = None) -> None:
        pass

    def shutdown(self) -> None:
        try:
            self.source.close(timeout=2.0)
        except Exception:               # a live source that will not close cleanly
            log.exception("closing a live source failed")


def renice(target: int = 0) -> int | None:
    """Set every thread of this process to niceness ``target`` (Linux: niceness is per
    thread; threads created later inherit their creator's). Ray starts worker processes at
    niceness 15 (``RAY_worker_niceness``), which lets any other work on the node take the CPU
    from a deadline-bound actor. Returns the niceness now (None where it cannot be read);
    lowering it needs CAP_SYS_NICE, and without it the niceness stays as it was."""
    if not hasattr(os, "setpriority"):
        return None
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) != target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except OSError:               # no permission (lowering needs CAP_SYS_NICE), or the thread ended
            pass
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except OSError:
        return None


@dataclass
class _Stream:
    sid: str
    spec: dict
    session: object
    feed: object
    opened_epoch: float
    counts: dict = field(default_factory=lambda: {"run": 0, "drop": 0, "error": 0, "misses": 0,
                                                  "questions_ok": 0, "questions_error": 0, "ttft_misses": 0})
    misses_by_stage: dict = field(default_factory=dict)
    latency_buckets: list = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    ttft_buckets: list = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    ttft_sum: float = 0.0
    busy_s: float = 0.0
    first_run_epoch: float | None = None
    last_capture_epoch: float | None = None
    slots_in_use: int = 0


class _Request:
    def __init__(self, kind: str, sid: str, spec: dict | None = None):
        self.kind, self.sid, self.spec = kind, sid, spec
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class StreamWorker:
    """One actor: the engines of ``bundle`` loaded once (``backend``, ``threads`` intra-op
    threads) and the streams placed on it (see the module docstring).

    ``name``: the actor's name in metrics and messages; ``cpus``: CPU cores to pin the
    process to (``os.sched_setaffinity``; None: leave it) — a way to give actors of one
    machine different CPU shares, as on heterogeneous nodes; ``history``: records kept in
    memory per stream; ``niceness``: the niceness the actor's threads run at (default 0, as a
    service, not Ray's background-worker 15; None: leave it). Raises
    :class:`~streamgraph.errors.BundleError` for a bad bundle."""

    def __init__(self, name: str, bundle: str, *, backend: str = "onnxruntime", threads: int = 1,
                 cpus: list[int] | None = None, history: int = 256, niceness: int | None = 0):
        from streamgraph.runtime.stream import WallClock
        from streamgraph.runtime.session import Engines

        if cpus is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(int(c) for c in cpus))
        self._niceness = niceness
        self.niceness = renice(niceness) if niceness is not None else None
        self.name, self.bundle_dir, self.history = name, str(bundle), int(history)
        options = {"threads": threads} if backend == "onnxruntime" else {}
        self.engines = Engines.load(bundle, backend, **options)
        self.threads = threads
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.clock = WallClock()
        self.epoch0 = time.time() - self.clock.now()
        first = self.engines.session(clock=self.clock)
        first.calibrate()
        self._costs = first.scheduler.costs          # copied into every session of this actor
        self.streams: dict[str, _Stream] = {}        # driver thread writes; others read under _lock
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._requests: list[_Request] = []
        self._runner = None
        self._order: list[_Stream] = []
        self._closing = False
        self.runner_restarts = 0
        self.carried_frames = 0
        self._driver = threading.Thread(target=self._drive, name=f"streamgraph-worker-{name}", daemon=True)
        self._driver.start()

    # ------------------------------------------------------------------ identity
    def info(self) -> dict:
        """Who and where this actor is."""
        node = None
        import sys

        ray = sys.modules.get("ray")           # only inside Ray: never start a Ray instance here
        if ray is not None and ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
        plan = self.engines.bundle.plan
        return {"actor": self.name, "node": node, "host": socket.gethostname(), "pid": os.getpid(),
                "threads": self.threads, "cpus": self.cpus, "niceness": self.niceness, "backend": self.engines.name,
                "bundle": self.engines.bundle.name, "kv_bytes_per_stream": int(plan.kv.bytes)}

    def ping(self) -> bool:
        return True

    # ------------------------------------------------------------------ capacity
    def measure(self, fps: float, *, probe_seconds: float = 2.0, start_epoch: float | None = None,
                miss_rate: float = 0.01, memory_bytes: int | None = None, probe_sessions: int = 4,
                overload: str | None = None) -> dict:
        """This actor's planned capacity for streams of its bundle at ``fps``: frame costs
        measured here (:func:`~streamgraph.runtime.capacity.probe_costs`, round robin over
        ``probe_sessions`` probe sessions for at least ``probe_seconds``; starting at
        ``start_epoch`` so that every actor of a machine probes at the same time and each
        measures the CPU share it gets), the CPU answer of
        :func:`~streamgraph.runtime.capacity.predict_cpu` (deadline: the graph's
        ``slo.frame_deadline_ms``; runner overhead measured), and the memory answer of the
        compiled plan within ``memory_bytes`` (default: memory available on the node now).
        A second pass is a trial run of 80 % of that first answer's streams (paced cameras in
        phase, from a common start, through a StreamRunner as streams run here) whose effective
        frame costs give a second answer; the smaller is kept (``first_pass`` or
        ``second_pass`` holds the other). Returns an
        :class:`~streamgraph.cluster.placement.ActorPlan` as a dict."""
        from streamgraph.runtime import capacity as cap
        from streamgraph.runtime import sources

        if self._niceness is not None:
            renice(self._niceness)                  # Ray's task threads too
        bundle = self.engines.bundle
        plan, manifest = bundle.plan, bundle.manifest
        h, w = manifest["stream"].get("frame_size") or plan.image_size
        frames = list(sources.synthetic(24, fps=fps, size=(h, w)))
        if start_epoch is not None:
            time.sleep(max(0.0, start_epoch - time.time()))
        self._passes = [cap.probe_costs(lambda: self.engines.session(overload="fifo"), frames,
                                        sessions=probe_sessions, min_seconds=probe_seconds)]
        first = self.plan_for(fps, miss_rate=miss_rate, memory_bytes=memory_bytes, overload=overload)
        # Second pass, a trial run: frames back to back take the whole CPU and push other work off
        # it (a shared machine's load balancer moves it elsewhere), which a real load does not,
        # and they leave out what the live path costs around each frame (the runner, the
        # cameras, the records). So run 80 % of the first answer's streams as cameras in phase,
        # through this actor's own path (StreamRunner over paced cameras), from a common start on
        # every actor, and take each frame's *effective* cost: in each burst, the time from one
        # frame's end to the next's (from the capture to the first's end); keep the smaller answer.
        m = max(1, math.floor(0.8 * first["slots"]))
        if start_epoch is None:
            start_epoch = time.time()
        period = 1.0 / fps
        second_start = start_epoch + probe_seconds + 2.0
        second_start += (-second_start) % period                     # on the frame grid of every actor
        trial = self._trial(m, fps, second_start, probe_seconds, overload)
        if trial is None:
            return first
        self._passes.append(trial)
        self._burst = m
        return self.plan_for(fps, miss_rate=miss_rate, memory_bytes=memory_bytes, overload=overload)

    def _trial(self, streams: int, fps: float, start_epoch: float, seconds: float, overload: str | None):
        """Effective frame costs of a trial run: ``streams`` paced cameras in phase (frame 0 at
        ``start_epoch``) through a :class:`~streamgraph.runtime.stream.StreamRunner` on this
        actor's clock for ``seconds``; per burst, sorted by end, the gaps between consecutive
        frame ends (the first from the capture): what each frame added to the burst, runner
        and bookkeeping included. The first burst is left out (warm-up). None when no burst ran."""
        from streamgraph.runtime.capacity import CostSamples
        from streamgraph.runtime.stream import StreamRunner

        order = [self._open(f"probe-{j}", {"source": f"synthetic:{j}", "fps": fps, "t0": start_epoch,
                                          "overload": overload}) for j in range(streams)]
        bursts: dict[float, list] = {}

        def on_frame(_i: int, rec) -> None:
            if rec.decision == "run" and rec.end is not None:
                bursts.setdefault(round(rec.capture, 6), []).append((rec.end, sum(rec.stage_ms.values()) / 1000.0))

        runner = StreamRunner([(st.session, st.feed) for st in order], clock=self.clock, calibrate=False,
                              keep_open=True, on_frame=on_frame)
        stop = threading.Timer(max(0.0, start_epoch + seconds - time.time()), runner.stop)
        stop.start()
        try:
            runner.run()
        finally:
            stop.cancel()
        frame_s, engine_s = [], []
        for capture in sorted(bursts)[1:]:
            prev = capture
            for end, eng in sorted(bursts[capture]):
                frame_s.append(max(0.0, end - prev))
                engine_s.append(eng)
                prev = end
        if not frame_s:
            return None
        return CostSamples(np.asarray(frame_s), {}, np.asarray(engine_s))

    def plan_for(self, fps: float, *, miss_rate: float = 0.01, memory_bytes: int | None = None,
                 overload: str | None = None) -> dict:
        """The plan of :meth:`measure` at another ``fps``, from the frame costs it measured
        (no new probe; the runner overhead is measured again): the smaller answer of its
        passes. Raises StreamgraphError before :meth:`measure` ran."""

        passes = getattr(self, "_passes", None)
        if not passes:
            raise StreamgraphError(f"actor {self.name}: measure() first")
        answers = [self._plan_one(samples, fps, miss_rate, memory_bytes, overload, runner_overhead=(i == 0))
                   for i, samples in enumerate(passes)]
        best = min(answers, key=lambda a: a["slots"])        # the smaller answer of the passes
        if len(answers) > 1:
            other = answers[0] if best is answers[1] else answers[1]
            best["first_pass" if best is answers[1] else "second_pass"] = {
                "slots": other["slots"], "frame_ms": other["frame_ms"], "burst": getattr(self, "_burst", None)}
        return best

    def _plan_one(self, samples, fps: float, miss_rate: float, memory_bytes: int | None, overload: str | None,
                  runner_overhead: bool = True) -> dict:
        from streamgraph.runtime import capacity as cap
        from streamgraph.runtime.scheduler import overload_policy

        plan, slo = self.engines.bundle.plan, self.engines.bundle.manifest["slo"]
        overload = overload or slo["overload"]
        deadline_ms = float(slo["frame_deadline_ms"])
        budgets = list(plan.budgets or [plan.tokens_per_frame])
        costs = self._costs
        full = costs.predict_frame(budgets[-1]) or 0.0
        ratios = [min(1.0, (costs.predict_frame(b) or full) / full) if full > 0 else 1.0 for b in budgets]
        policy = cap.PolicyModel(overload_policy(overload).name, ratios, costs.alpha, samples.engine_s)
        overhead = cap.RunnerOverhead(overload, deadline_ms, float(slo["ttft_ms"]), budgets, fps) \
            if runner_overhead else None                            # a trial's costs include the runner
        shared = cap.plan_shared_bytes(plan)["total"]
        per_stream = max(1, cap.plan_stream_bytes(plan)["total"])
        memory = int(memory_bytes) if memory_bytes is not None else cap.available_memory_bytes()
        n_mem = cap.memory_streams(shared, per_stream, memory)
        cpu = cap.predict_cpu(samples.frame_s, fps, deadline_ms / 1000.0, overhead, miss_rate,
                              max_streams=max(1, min(cap.MAX_STREAMS, n_mem + 1)), policy=policy)
        slots = min(cpu.streams, n_mem)
        info = self.info()
        return {"actor": self.name, "node": info["node"] or info["host"], "slots": int(slots),
                "cpu_streams": int(cpu.streams), "memory_streams": int(n_mem),
                "binds": "memory" if n_mem < cpu.streams else "CPU time", "fps": float(fps),
                "deadline_ms": deadline_ms, "shared_bytes": int(shared), "per_stream_bytes": int(per_stream),
                "memory_bytes": memory, "threads": self.threads, "frame_ms": samples.summary_ms()["frame"],
                "cpu_binds": cpu.binds}

    # ------------------------------------------------------------------ membership
    def _submit(self, req: _Request, timeout: float) -> object:
        with self._cond:
            if self._closing:
                raise StreamgraphError(f"actor {self.name} is stopping")
            self._requests.append(req)
            if self._runner is not None:
                self._runner.stop()
            self._cond.notify_all()
        if not req.done.wait(timeout):
            raise StreamgraphError(f"actor {self.name}: {req.kind} of stream {req.sid!r} took more than {timeout:g} s")
        if req.error is not None:
            raise req.error
        return req.result

    def add_stream(self, sid: str, spec: dict, timeout: float = 60.0) -> dict:
        """Open a session for stream ``sid`` here and start streaming it (blocks until its
        session exists and the runner includes it). ``spec``: ``source`` (``synthetic``,
        ``synthetic:SEED``, a video file replayed as a camera, or a live URL/device/pipe),
        ``fps``, ``t0`` (epoch time of the camera's frame 0; default now), ``overload``.
        Returns the stream's info. Raises StreamgraphError / ValueError (one line)."""
        return self._submit(_Request("add", sid, dict(spec)), timeout)

    def remove_stream(self, sid: str, timeout: float = 60.0) -> dict:
        """Stop stream ``sid`` here; returns its final report (see :meth:`report`)."""
        return self._submit(_Request("remove", sid), timeout)

    def _open(self, sid: str, spec: dict) -> _Stream:
        from streamgraph.runtime import sources

        if sid in self.streams:
            raise StreamgraphError(f"stream {sid!r} exists already on actor {self.name}")
        plan, manifest = self.engines.bundle.plan, self.engines.bundle.manifest
        fps = float(spec.get("fps") or manifest["stream"]["fps"])
        size = tuple(manifest["stream"].get("frame_size") or plan.image_size)
        source = str(spec.get("source") or "synthetic")
        t0 = float(spec.get("t0") or time.time())
        after_k = (spec.get("resumed") or {}).get("last_k")
        if source == "synthetic" or source.startswith("synthetic:"):
            seed = int(source.partition(":")[2] or 0)
            images = [f.image for f in sources.synthetic(max(1, int(spec.get("frames", 32))), fps=fps, size=size,
                                                         seed=seed)]
            feed = PacedCamera(images, fps, t0, self.clock, self.epoch0, after_k)
        else:
            from streamgraph.runtime import live as live_mod

            if live_mod.classify(source) == "file":
                images = [f.image for f in sources.video(source, fps=fps, size=size)]
                feed = PacedCamera(images, fps, t0, self.clock, self.epoch0, after_k)
            else:
                feed = _LiveFeed(live_mod.open_source(source, fps=fps, size=size, clock=self.clock))
        session = self.engines.session(clock=self.clock, overload=spec.get("overload"), history=self.history)
        session.scheduler.costs = copy.deepcopy(self._costs)
        return _Stream(sid, {**spec, "fps": fps, "t0": t0, "source": source}, session, feed, time.time())

    def _apply(self, req: _Request) -> None:
        try:
            if req.kind == "add":
                st = self._open(req.sid, req.spec)
                with self._lock:
                    self.streams[req.sid] = st
                req.result = self._stream_info(st)
            else:
                with self._lock:
                    st = self.streams.pop(req.sid, None)
                if st is None:
                    raise StreamgraphError(f"no stream {req.sid!r} on actor {self.name}")
                st.feed.shutdown()
                req.result = self._report(st)
        except BaseException as e:
            req.error = e
        finally:
            req.done.set()

    # ------------------------------------------------------------------ the driver thread
    def _on_frame(self, order: list[_Stream]):
        buckets = np.asarray(LATENCY_BUCKETS)

        def on_frame(i: int, rec) -> None:
            st = order[i]
            with self._lock:
                c = st.counts
                c[rec.decision] = c.get(rec.decision, 0) + 1
                st.slots_in_use = rec.slots_in_use
                st.last_capture_epoch = self.epoch0 + rec.capture
                if rec.decision != "run":
                    return
                if st.first_run_epoch is None:
                    st.first_run_epoch = self.epoch0 + rec.end
                if rec.deadline_met is False:
                    c["misses"] += 1
                    stage = rec.overran or "-"
                    st.misses_by_stage[stage] = st.misses_by_stage.get(stage, 0) + 1
                lat = rec.end - rec.capture
                st.latency_buckets[int(np.searchsorted(buckets, lat))] += 1
                st.latency_sum += lat
                if rec.start is not None:
                    st.busy_s += rec.end - rec.start
        return on_frame

    def _on_answer(self, order: list[_Stream]):
        buckets = np.asarray(LATENCY_BUCKETS)

        def on_answer(q, rec) -> None:
            st = order[q.stream]
            with self._lock:
                st.counts["questions_error" if rec.error else "questions_ok"] += 1
                st.slots_in_use = rec.slots_in_use
                if rec.ttft_ms is not None:
                    t = rec.ttft_ms / 1000.0
                    st.ttft_buckets[int(np.searchsorted(buckets, t))] += 1
                    st.ttft_sum += t
                    st.counts["ttft_misses"] += rec.ttft_met is False
        return on_answer

    def _drive(self) -> None:
        from streamgraph.runtime.stream import StreamRunner

        while True:
            with self._cond:
                while not self._requests and not self._closing and not self.streams:
                    self._cond.wait()
                if self._closing:
                    reqs, self._requests = self._requests, []
                    for r in reqs:
                        r.error = StreamgraphError(f"actor {self.name} is stopping")
                        r.done.set()
                    return
                reqs, self._requests = self._requests, []
            for r in reqs:
                self._apply(r)
            order = list(self.streams.values())
            if not order:
                continue
            runner = StreamRunner([(st.session, st.feed) for st in order], clock=self.clock, calibrate=False,
                                  keep_open=True, on_frame=self._on_frame(order), on_answer=self._on_answer(order))
            with self._cond:
                self._runner, self._order = runner, order
                if self._requests or self._closing:
                    runner.stop()
                self._cond.notify_all()
            try:
                runner.run()
            except BaseException as e:           # an engine or source error: this actor's streams fail
                log.error("actor %s: runner failed: %s", self.name, e)
            with self._cond:
                self._runner = None
                self.runner_restarts += 1
            for st, pending in zip(order, runner.pending):   # hand pending frames to the next runner
                frames = [f for _, f in pending]
                self.carried_frames += len(frames)
                st.feed.carry(frames)

    # ------------------------------------------------------------------ questions
    def ask(self, sid: str, text: str, max_new_tokens: int | None = None, timeout: float = 60.0) -> dict:
        """Ask about stream ``sid`` (its KV cache is here); blocks until answered and returns
        the question's record (``answer``, ``ttft_ms``, ``ttft_met``, ...). A question that was
        waiting when the runner changed is asked again on the new one. Raises
        StreamgraphError (unknown stream, no answer in ``timeout`` s), ValueError (empty
        question), or the engine's error."""
        from streamgraph.runtime.metrics import record_dict

        end = time.monotonic() + timeout
        while True:
            with self._cond:
                if sid not in self.streams:
                    raise StreamgraphError(f"no stream {sid!r} on actor {self.name}")
                runner, order = self._runner, self._order
            idx = next((i for i, st in enumerate(order) if st.sid == sid), None) if runner is not None else None
            if idx is None:
                if time.monotonic() > end:
                    raise StreamgraphError(f"stream {sid!r}: no answer within {timeout:g} s")
                time.sleep(0.005)
                continue
            try:
                answer = runner.ask(text, idx, max_new_tokens=max_new_tokens)
                answer.result(timeout=max(0.0, end - time.monotonic()))
            except StreamClosedError:
                time.sleep(0.005)                # the runner changed: ask the next one
                continue
            except TimeoutError:
                raise StreamgraphError(f"stream {sid!r}: no answer within {timeout:g} s") from None
            return record_dict(answer.record)

    # ------------------------------------------------------------------ reports and metrics
    def _stream_info(self, st: _Stream) -> dict:
        feed = st.feed
        return {"stream": st.sid, "actor": self.name, "source": st.spec.get("source"), "fps": st.spec.get("fps"),
                "t0": st.spec.get("t0"), "opened_epoch": st.opened_epoch, "first_run_epoch": st.first_run_epoch,
                "last_capture_epoch": st.last_capture_epoch, "first_k": feed.first_k, "last_k": feed.last_k,
                "delivered": feed.delivered, "skipped": feed.skipped, "counts": dict(st.counts),
                "misses_by_stage": dict(st.misses_by_stage), "latency_buckets": list(st.latency_buckets),
                "latency_sum": st.latency_sum, "ttft_buckets": list(st.ttft_buckets), "ttft_sum": st.ttft_sum,
                "busy_s": st.busy_s, "kv_bytes": int(st.session.kv_bytes), "slots_in_use": st.slots_in_use,
                "resumed": st.spec.get("resumed")}

    def snapshot(self) -> dict:
        """Counters of every stream here and of the actor (the controller's heartbeat)."""
        with self._lock:
            streams = {sid: self._stream_info(st) for sid, st in self.streams.items()}
        return {"actor": self.name, "epoch": time.time(), "streams": streams,
                "runner_restarts": self.runner_restarts, "carried_frames": self.carried_frames,
                "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}

    def _report(self, st: _Stream) -> dict:
        for attempt in range(5):      # read while the driver thread may append a record: retry
            try:
                rep = st.session.report()
                break
            except RuntimeError:      # a record list changed size while it was read
                if attempt == 4:
                    raise
                time.sleep(0.01)
        with self._lock:
            info = self._stream_info(st)
        return {"meta": rep.meta, "summary": rep.summary, "cluster": info}

    def report(self, sid: str) -> dict:
        """Stream ``sid``'s report (the session's ``meta`` and ``summary``, and ``cluster``: its
        counters and, when it was placed again after a failover, ``resumed``)."""
        with self._lock:
            st = self.streams.get(sid)
        if st is None:
            raise StreamgraphError(f"no stream {sid!r} on actor {self.name}")
        return self._report(st)

    def stop(self) -> None:
        """Stop the driver and every stream's source."""
        with self._cond:
            self._closing = True
            if self._runner is not None:
                self._runner.stop()
            self._cond.notify_all()
        self._driver.join(10.0)
        for st in list(self.streams.values()):
            st.feed.shutdown()
        self.engines.close()
