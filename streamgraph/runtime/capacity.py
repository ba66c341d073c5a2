"""Capacity: how many identical streams one executor serves within the deadline (torch-free).

``streamgraph capacity GRAPH|BUNDLE`` answers "how many cameras fit on this box?" before a
deployment, from the bundle's static memory plan and the cost distribution of a frame
measured on this machine, and says which resource binds.

The model (docs/live.md, "Capacity")
------------------------------------
One process runs one :class:`~streamgraph.runtime.stream.StreamRunner`: one executor (engines
loaded once, one frame at a time) serving ``n`` identical streams at ``fps`` frames per second
each, earliest deadline first. The worst case is cameras in phase (the critical instant of
EDF): every frame period ``P = 1/fps`` brings ``n`` frames at once and they run back to back
at full token budget, so the ``k``-th of a burst ends

    ``S_k = X_1 + ... + X_k + k * o(n)``

after its capture, where ``X`` is the executor time of one frame (all stages; resampled from
the distribution measured on this machine, tail included, not its mean) and ``o(n)`` is the
runner's own time per frame with ``n`` streams (measured too: it grows with ``n``). ``n``
streams fit when

1. **deadline** — at most ``miss_rate`` (1 %) of the frames end after their deadline ``D``:
   ``mean over k <= n of P(S_k > D) <= miss_rate``, i.e. p99 end-to-end latency <= D;
2. **CPU time** — a burst ends before the next one arrives: ``P(S_n > P) <= miss_rate``
   (utilisation below 1 at the same percentile; it binds when ``D > P``);
3. **memory** — ``shared + n * per_stream <= memory``. ``shared`` is paid once per process:
   engine weights, activations and engine I/O (one executor runs one frame at a time; from
   the plan, or the process's measured resident memory when larger). ``per_stream`` is what
   each stream owns: its KV buffer, reducer and encoder state and host cache store (from the
   plan, or the measured growth per stream when larger).

The probabilities are estimated over :data:`BURSTS` bursts resampled from the measured costs
(runs of consecutive probe frames: a block bootstrap, so slow phases of the machine slow a
whole burst, as live) with a fixed seed and common random numbers, so the answer is
deterministic for given costs and exact for constant costs. A frame that fails is late (``fifo``), dropped (``drop_late``)
or degraded (``degrade``): all three count against the 1 %. Questions are not part of the
model: an answer holds the executor for its TTFT and decode time, so leave headroom for them.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from streamgraph.runtime.scheduler import FRAME_STAGES, OVERLOAD_POLICIES, TIME_EPS, overload_policy

MISS_RATE = 0.01           # share of frames allowed to fail (late, dropped or degraded)
BURSTS = 2000              # bursts resampled per prediction (common random numbers)
WARMUP = 10                # past frames of a stream that make its replayed cost model (EWMA)
MAX_STREAMS = 2048         # the search stops here (``CpuAnswer.capped``)
OVERHEAD_MEASURED_MAX = 256  # runner overhead measured up to this many streams, extrapolated beyond
PROBE_SECONDS = 3.0        # the cost probe runs at least this long (wall time)
PROBE_SESSIONS = 8         # the cost probe goes round robin over this many sessions first (memory permitting),
MAX_PROBE_SESSIONS = 128   # then over as many as that first answer, up to this
EXTRA_SESSIONS = 8         # sessions opened to measure the memory each stream adds
MiB = 1024 * 1024
GiB = 1024 * MiB


# ---------------------------------------------------------------------------- CPU time
@dataclass
class CpuAnswer:
    """The CPU-time side of the answer.

    ``streams``: the largest ``n`` that meets both CPU conditions (0 when one stream does not);
    ``binds``: which condition ``streams + 1`` streams break (``deadline`` or ``frame period``;
    ``search cap`` when the search stopped at ``max_streams``). Fractions are predicted shares
    of frames; times in ms."""

    streams: int
    binds: str
    fail_fraction: float            # share of frames late, dropped or degraded, at ``streams``
    fail_fraction_next: float | None    # the same at ``streams + 1`` (None when capped)
    period_exceed_next: float | None    # P(burst of streams + 1 outlasts the frame period)
    p99_latency_ms: float | None    # predicted p99 end-to-end latency at ``streams``
    overhead_ms: float              # runner time per frame at ``streams`` (o(n))
    utilization: float              # streams * (mean frame cost + o) * fps
    capped: bool = False


def _check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return v


def _check_samples(frame_s) -> np.ndarray:
    x = np.asarray(frame_s, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("frame cost samples: need at least one sample")
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError("frame cost samples must be finite numbers of seconds >= 0")
    return x


class BurstModel:
    """Bursts of ``n`` back-to-back frames resampled from ``frame_s`` (seconds, in the order
    they were measured): the latency ``S_k`` of the ``k``-th frame of each burst. Each burst is
    a run of consecutive samples from a random start (wrapping around at the end): a block
    bootstrap, so a slow phase of the machine (another process, a garbage collection) slows
    consecutive frames of a burst together, as it does live, instead of being averaged away by
    independent draws. Common random numbers: the first ``n`` frames of every burst are the same
    whatever the ``n`` asked, so the shares below are monotone in ``n`` for a non-decreasing
    overhead. Deterministic (``seed``)."""

    def __init__(self, frame_s, bursts: int = BURSTS, seed: int = 0):
        self.x = _check_samples(frame_s)
        if isinstance(bursts, bool) or not isinstance(bursts, int) or bursts < 1:
            raise ValueError(f"bursts must be an integer >= 1, got {bursts!r}")
        self.bursts = bursts
        self.seed = seed
        m = self.x.size
        self._start = np.minimum((np.random.default_rng(seed).random(bursts) * m).astype(np.int64), m - 1)
        self._sums = np.zeros((0, bursts))

    def sums(self, n: int) -> np.ndarray:
        """``[n, bursts]``: row ``k-1`` holds ``X_1 + ... + X_k`` of every burst (seconds)."""
        if n > self._sums.shape[0]:
            rows = max(n, 2 * self._sums.shape[0])
            idx = (self._start[None, :] + np.arange(rows)[:, None]) % self.x.size
            self._sums = np.cumsum(self.x[idx], axis=0)
        return self._sums[:n]

    def latencies(self, n: int, overhead_s: float = 0.0) -> np.ndarray:
        """``[n, bursts]`` end-to-end latencies (s) of the frames of ``n`` streams in phase."""
        return self.sums(n) + overhead_s * np.arange(1, n + 1, dtype=np.float64)[:, None]

    def replay(self, n: int, overhead_s: float, deadline_s: float, policy: "PolicyModel") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Replay the decisions of ``drop_late`` or ``degrade`` on ``n`` frames of every burst,
        as :class:`~streamgraph.runtime.scheduler.Scheduler` takes them: from its cost model's
        prediction, not from the cost to come. Every stream has its own cost model, an EWMA of
        its own frames: one per burst, so the prediction for the ``k``-th frame of a burst is the
        EWMA of the samples ``n``, ``2n``, ... before it (the same stream's frames in the bursts
        before). Returns ``failed [n, bursts]`` (late, dropped or degraded), ``latency [n,
        bursts]`` (s; NaN for a dropped frame) and ``end [bursts]`` (when the burst ends, s after
        its capture)."""
        m, a = self.x.size, policy.alpha
        eng = self.x if policy.engine_s is None else _check_samples(policy.engine_s)
        if eng.size != m:
            raise ValueError(f"engine_s has {eng.size} samples, frame_s {m}")
        rule = overload_policy(policy.overload)
        ratios = np.asarray(policy.ratios if rule.degrades else [1.0], dtype=np.float64)
        elapsed = np.zeros(self.bursts)
        failed = np.zeros((n, self.bursts), dtype=bool)
        latency = np.full((n, self.bursts), np.nan)
        limit = deadline_s + TIME_EPS
        for k in range(n):
            idx = (self._start + k) % m
            ewma = eng[(idx - WARMUP * n) % m]
            for j in range(WARMUP - 1, 0, -1):
                ewma = (1 - a) * ewma + a * eng[(idx - j * n) % m]
            elapsed += overhead_s
            behind = n - k - 1
            if not rule.degrades:           # drop_late
                chosen = np.where(elapsed + ewma <= limit, 1.0, np.nan)
            else:   # degrade: the largest bucket at which this frame and all behind it fit back to back
                chosen = np.full(self.bursts, np.nan)
                for r in ratios[::-1]:
                    ok = elapsed + ewma * r <= limit
                    if behind:
                        ok &= elapsed + (behind + 1) * ewma * r <= limit
                    chosen = np.where(np.isnan(chosen) & ok, r, chosen)
                cheapest = np.where(elapsed + ewma * ratios[0] <= limit, ratios[0], np.nan)
                chosen = np.where(np.isnan(chosen), cheapest, chosen)
            run = ~np.isnan(chosen)
            elapsed = np.where(run, elapsed + self.x[idx] * np.where(run, chosen, 1.0), elapsed)
            latency[k] = np.where(run, elapsed, np.nan)
            failed[k] = ~run | (elapsed > limit) | (run & (chosen < 1.0))
        return failed, latency, elapsed


@dataclass
class PolicyModel:
    """The overload policy as the model replays it. ``overload``: the policy (``fifo``,
    ``none`` and ``latest_only`` run every frame of a burst at full budget; ``drop_late`` drops
    a frame whose predicted end is after its deadline; ``degrade`` runs it at a smaller bucket
    when the frames behind it would not all fit at full budget, see
    :meth:`~streamgraph.runtime.scheduler.Scheduler.decide`). ``ratios``: predicted cost of
    each budget bucket relative to the full budget, ascending (the last 1.0; from calibration).
    ``alpha``: the cost model's EWMA weight. ``engine_s``: the stage time of each probe frame
    (what the cost model learns from; aligned with the frame samples; default: them)."""

    overload: str = "fifo"
    ratios: list[float] = field(default_factory=lambda: [1.0])
    alpha: float = 0.3
    engine_s: np.ndarray | None = None

    @property
    def replays(self) -> bool:
        return overload_policy(self.overload).sheds_late


def predict_cpu(frame_s, fps: float, deadline_s: float, overhead: Callable[[int], float] | None = None,
                miss_rate: float = MISS_RATE, max_streams: int = MAX_STREAMS, bursts: int = BURSTS,
                seed: int = 0, policy: PolicyModel | None = None) -> CpuAnswer:
    """The largest number of identical streams at ``fps`` whose frames meet ``deadline_s``
    on one executor (the model of this module's docstring).

    ``frame_s``: measured executor seconds of single frames at full budget (any number >= 1 of
    samples). ``overhead(n)``: the runner's seconds per frame with ``n`` streams (default 0;
    called for O(log n) values of ``n``). ``miss_rate``: share of frames allowed to fail, in
    [0, 1). ``policy``: replay ``drop_late``/``degrade`` decisions (:class:`PolicyModel`;
    default: every frame runs at full budget, as ``fifo``). A frame fails when it ends after
    its deadline, is dropped or is degraded. Raises ValueError for bad numbers."""
    fps = _check_positive("fps", fps)
    deadline = _check_positive("deadline", deadline_s)
    if isinstance(miss_rate, bool) or not (isinstance(miss_rate, (int, float)) and 0 <= miss_rate < 1):
        raise ValueError(f"miss_rate must be a number in [0, 1), got {miss_rate!r}")
    if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1:
        raise ValueError(f"max_streams must be an integer >= 1, got {max_streams!r}")
    model = BurstModel(frame_s, bursts, seed)
    period = 1.0 / fps
    over = overhead or (lambda n: 0.0)
    cache: dict[int, tuple[float, float, float]] = {}

    def run(n: int, o: float) -> tuple[float, float, np.ndarray]:
        """(share of frames failing, P(burst outlasts the period), latencies of frames run)."""
        if policy is not None and policy.replays:
            failed, lat, end = model.replay(n, o, deadline, policy)
            return float(failed.mean()), float(np.mean(end > period + TIME_EPS)), lat[~np.isnan(lat)]
        lat = model.latencies(n, o)
        return float(np.mean(lat > deadline + TIME_EPS)), float(np.mean(lat[-1] > period + TIME_EPS)), lat

    def stats(n: int) -> tuple[float, float, float]:
        """(share of frames failing, P(burst outlasts the period), o(n))."""
        if n not in cache:
            o = max(0.0, float(over(n)))
            late, outlast, _ = run(n, o)
            cache[n] = (late, outlast, o)
        return cache[n]

    def fits(n: int) -> bool:
        late, outlast, _ = stats(n)
        return late <= miss_rate and outlast <= miss_rate

    lo, hi = 0, 1                      # fits(lo) (trivially for 0); hi: next candidate
    while hi <= max_streams and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, max_streams + 1)      # not fits(hi), or hi beyond the cap (never evaluated)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    n = lo
    capped = n == max_streams
    if capped:
        late_next = outlast_next = None
        binds = "search cap"
    else:
        late_next, outlast_next, _ = stats(n + 1)
        binds = "deadline" if late_next > miss_rate else "frame period"
    if n == 0:
        return CpuAnswer(0, binds, 0.0, late_next, outlast_next, None, 1000.0 * stats(1)[2], 0.0, capped)
    late, _, o = stats(n)
    lat = run(n, o)[2]
    return CpuAnswer(n, binds, late, late_next, outlast_next,
                     1000.0 * float(np.quantile(lat, 0.99)) if lat.size else None,
                     1000.0 * o, n * (float(model.x.mean()) + o) * fps, capped)


def predict_at(frame_s, n: int, fps: float, deadline_s: float, overhead_s: float = 0.0,
               bursts: int = BURSTS, seed: int = 0, policy: PolicyModel | None = None) -> dict[str, float]:
    """The model's figures for exactly ``n`` streams: ``late`` (share of frames late, dropped
    or degraded), ``outlast`` (P(a burst outlasts the frame period)), ``p99_ms`` (p99
    end-to-end latency of the frames run) and ``max_ms``, with ``overhead_s`` runner seconds
    per frame and ``policy`` as :func:`predict_cpu`."""
    fps, deadline = _check_positive("fps", fps), _check_positive("deadline", deadline_s)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    o = _check_positive("overhead", overhead_s, allow_zero=True)
    model = BurstModel(frame_s, bursts, seed)
    if policy is not None and policy.replays:
        failed, lat, end = model.replay(n, o, deadline, policy)
        lat = lat[~np.isnan(lat)]
        late, outlast = float(failed.mean()), float(np.mean(end > 1.0 / fps + TIME_EPS))
    else:
        lat = model.latencies(n, o)
        late, outlast = float(np.mean(lat > deadline + TIME_EPS)), float(np.mean(lat[-1] > 1.0 / fps + TIME_EPS))
    return {"late": late, "outlast": outlast, "p99_ms": 1000.0 * float(np.quantile(lat, 0.99)) if lat.size else None,
            "max_ms": 1000.0 * float(lat.max()) if lat.size else None}


# ---------------------------------------------------------------------------- memory
def plan_shared_bytes(plan) -> dict[str, int]:
    """Bytes paid once per process (from the plan): engine ``weights``, the peak
    ``activations`` estimate and ``engine_io`` (one executor runs one frame at a time), and
    their ``total``."""
    m = plan.memory
    out = {"weights": int(m.weights_bytes), "activations": int(m.activations_bytes), "engine_io": int(m.io_bytes)}
    out["total"] = sum(out.values())
    return out


def plan_stream_bytes(plan) -> dict[str, int]:
    """Bytes each stream owns (from the plan): its ``kv_cache`` buffer, the reducer's state
    tensors (``reducer_state``), the encoder's reference buffers (``encoder_refs``,
    ``stc_cacher``), the cache policy's host store (``host_store``), and their ``total``."""
    reducer_state = 0
    if plan.reducer is not None:
        names = set(plan.reducer.get("state", []))
        budgets = plan.budgets or [plan.tokens_per_frame]
        eng = plan.engines.get(plan.reducer_engine(budgets[-1]))
        if eng is not None:
            reducer_state = sum(s.nbytes(1) for s in eng.inputs if s.name in names)
    refs = 0
    reuse = plan.engines.get("vision_encoder_reuse")
    if plan.encoder is not None and reuse is not None:
        refs = sum(s.nbytes(1) for s in reuse.inputs if s.name == "encoder_refs")
    out = {"kv_cache": int(plan.kv.bytes), "reducer_state": int(reducer_state), "encoder_refs": int(refs),
           "host_store": int(getattr(plan.memory, "host_bytes", 0) or 0)}
    out["total"] = sum(out.values())
    return out


def memory_streams(shared_bytes: int, per_stream_bytes: int, memory_bytes: int) -> int:
    """The largest ``n`` with ``shared_bytes + n * per_stream_bytes <= memory_bytes`` (0 when
    the shared part alone does not fit). Raises ValueError for negative sizes or a
    ``per_stream_bytes`` of 0."""
    for name, v in (("shared_bytes", shared_bytes), ("memory_bytes", memory_bytes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if isinstance(per_stream_bytes, bool) or not isinstance(per_stream_bytes, (int, np.integer)) or per_stream_bytes < 1:
        raise ValueError(f"per_stream_bytes must be an integer >= 1, got {per_stream_bytes!r}")
    if memory_bytes < shared_bytes:
        return 0
    return int((memory_bytes - shared_bytes) // per_stream_bytes)


def available_memory_bytes() -> int:
    """Memory available for new work now: ``MemAvailable`` of /proc/meminfo (Linux), else
    the machine's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def rss_bytes() -> int | None:
    """Resident memory of this process (bytes), or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _touch(session) -> None:
    """Write every per-stream buffer of ``session`` once, so its pages count as resident."""
    session.kv.data[...] = 0
    for buf in session.reducer_stage.state.values():
        buf[...] = 0
    if session.encoder_stage.refs is not None:
        session.encoder_stage.refs[...] = 0


def _memory_probe(bundle_dir: str, backend: str, threads: int | None, extra: int) -> dict:
    """Run in a fresh interpreter by :func:`measure_memory`: resident bytes after the engines
    and one session that ran two frames, then after ``extra`` more sessions."""
    from streamgraph.backends import open_backend
    from streamgraph.compiler.bundle import open_bundle
    from streamgraph.runtime.stream import SimulatedClock
    from streamgraph.runtime.session import Session

    options = {"threads": threads} if (threads is not None and backend == "onnxruntime") else {}
    with open_bundle(bundle_dir) as bundle:
        engines = open_backend(backend, bundle, **options)
        first = Session(bundle, engines, clock=SimulatedClock(), overload="fifo")
        h, w = bundle.plan.image_size
        for t in (0.0, 10.0):                 # the engines' arenas and activations are allocated
            first.push_frame(np.zeros((h, w, 3), np.uint8), timestamp=t)
        _touch(first)
        one = rss_bytes()
        more = []
        for _ in range(extra):
            s = Session(bundle, engines, clock=SimulatedClock(), overload="fifo")
            _touch(s)
            more.append(s)
        return {"rss_one_stream": one, "rss_more_streams": rss_bytes(), "extra": extra}


def measure_memory(bundle_dir: str | Path, backend: str = "onnxruntime", threads: int | None = None,
                   extra: int = EXTRA_SESSIONS, timeout_s: float = 300.0) -> dict | None:
    """Resident memory of a deployment of the bundle, measured in a fresh interpreter (torch-
    free, as deployed): ``shared_bytes`` (interpreter, runtime, engines, one frame's
    activations) and ``per_stream_bytes`` (the growth per added session, its buffers
    written). None where it cannot be measured (no /proc, the subprocess failed)."""
    if rss_bytes() is None:
        return None
    code = ("import json, sys; from streamgraph.runtime.capacity import _memory_probe; "
            "print(json.dumps(_memory_probe(sys.argv[1], sys.argv[2], "
            "None if sys.argv[3] == '-' else int(sys.argv[3]), int(sys.argv[4]))))")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(bundle_dir), backend,
                              "-" if threads is None else str(threads), str(extra)],
                             capture_output=True, text=True, timeout=timeout_s, check=True)
        d = __import__("json").loads(out.stdout.strip().splitlines()[-1])
        per = max(0, (d["rss_more_streams"] - d["rss_one_stream"]) // d["extra"])
        return {"shared_bytes": max(0, d["rss_one_stream"] - per), "per_stream_bytes": per, **d}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------- measurements
@dataclass
class CostSamples:
    """Measured executor seconds of single frames at full budget: ``frame_s`` (the whole
    single-frame path: stages and the session's own work) and ``stage_s`` per stage."""

    frame_s: np.ndarray
    stage_s: dict[str, np.ndarray] = field(default_factory=dict)
    engine_s: np.ndarray | None = None     # the stage times of each frame, summed (aligned with frame_s)

    def summary_ms(self) -> dict[str, dict[str, float]]:
        """mean, p50, p99 and max in ms of the frame and of every stage."""
        def s(a):
            a = 1000.0 * np.asarray(a, dtype=np.float64)
            return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                    "p99": float(np.percentile(a, 99)), "max": float(a.max())}
        return {"frame": s(self.frame_s), **{k: s(v) for k, v in self.stage_s.items()}}


def probe_costs(open_session: Callable[[], object], frames, warmup: int = 2, sessions: int = 1,
                min_seconds: float = 0.0, max_frames: int = 20_000) -> CostSamples:
    """Run ``frames`` (images or :class:`~streamgraph.runtime.sources.Frame`) one by one, each
    alone on the executor (captures far apart), at full budget, round robin over ``sessions``
    sessions from ``open_session()`` (fresh probe sessions: ``fifo``, each its own clock), and
    return their times: ``frame_s``, the wall time of the whole single-frame path
    (:meth:`~streamgraph.runtime.stream.StreamBase.push_frame`: decision, stages, record), and
    ``stage_s`` per stage; the first ``warmup`` are discarded. The frames are cycled until at
    least ``min_seconds`` of wall time went by (at most ``max_frames``), so that the samples, in
    their order, cover the machine's slow phases too. Round robin, because frames of
    different streams run back to back cost more than one stream's (each brings its own KV
    buffer and state into the caches). A cache that fills up (``full``:
    :class:`~streamgraph.errors.CapacityError`) gets a fresh session; a frame with a NaN/Inf
    output gives no sample. Raises ValueError when no frame ran."""
    from streamgraph.errors import CapacityError

    pool = [open_session() for _ in range(max(1, sessions))]
    frame_s: list[float] = []
    engine_s: list[float] = []
    stage_s: dict[str, list[float]] = {s: [] for s in FRAME_STAGES}
    frames = list(frames)
    if not frames:
        raise ValueError("the cost probe needs at least one frame")
    start = time.perf_counter()
    i = -1
    while True:
        i += 1
        if i >= max_frames or (i >= len(frames) and time.perf_counter() - start >= min_seconds):
            break
        frame = frames[i % len(frames)]
        j = i % len(pool)
        session = pool[j]
        t0 = time.perf_counter()
        try:
            rec = session.push_frame(getattr(frame, "image", frame), timestamp=session.clock.now() + 1000.0)
        except CapacityError:
            pool[j] = open_session()
            continue
        wall = time.perf_counter() - t0
        if i < warmup or rec.decision != "run":
            continue
        frame_s.append(wall)
        engine_s.append(sum(rec.stage_ms.values()) / 1000.0)
        for k, v in rec.stage_ms.items():
            stage_s.setdefault(k, []).append(v / 1000.0)
    if not frame_s:
        raise ValueError("the cost probe ran no frame (give more probe frames)")
    return CostSamples(np.asarray(frame_s), {k: np.asarray(v) for k, v in stage_s.items() if v}, np.asarray(engine_s))


class RunnerOverhead:
    """The runner's own seconds per frame with ``n`` streams beyond what the single-frame path
    costs, ``o(n)``: :class:`~streamgraph.runtime.stream.StreamRunner` over ``n`` zero-cost
    :class:`~streamgraph.runtime.simulate.SimulatedSession` streams in phase (the scheduler of
    the graph: policy, deadline, budgets), wall time per frame, less the wall time per frame of
    the same sessions' :meth:`~streamgraph.runtime.stream.StreamBase.push_frame` (already in the
    probe's frame costs). The median of ``repeats`` runs; cached per ``n``; measured up to
    :data:`OVERHEAD_MEASURED_MAX` streams and extrapolated linearly beyond."""

    def __init__(self, overload: str, deadline_ms: float, ttft_ms: float, budgets: list[int], fps: float,
                 min_frames: int = 128, repeats: int = 3):
        self.args = (overload, deadline_ms, ttft_ms, budgets)
        self.fps = fps
        self.min_frames = min_frames
        self.repeats = repeats
        self.measured: dict[int, float] = {}
        self._single: float | None = None

    def _sessions(self, n: int, clock) -> list:
        from streamgraph.runtime.scheduler import Scheduler
        from streamgraph.runtime.simulate import SimulatedSession

        overload, deadline_ms, ttft_ms, budgets = self.args
        out = []
        for _ in range(n):
            s = SimulatedSession(Scheduler(overload, deadline_ms, ttft_ms, budgets=budgets),
                                 {stage: 0.0 for stage in FRAME_STAGES}, clock=clock)
            s.calibrate()
            out.append(s)
        return out

    def single_frame_s(self) -> float:
        """Wall seconds per frame of a zero-cost simulated session's ``push_frame``."""
        from streamgraph.runtime.stream import SimulatedClock

        if self._single is None:
            image = np.zeros((1, 1, 3), np.uint8)
            runs = []
            for _ in range(self.repeats):
                (s,) = self._sessions(1, SimulatedClock())
                t0 = time.perf_counter()
                for k in range(self.min_frames):
                    s.push_frame(image, timestamp=k / self.fps)
                runs.append((time.perf_counter() - t0) / self.min_frames)
            self._single = float(np.median(runs))
        return self._single

    def measure(self, n: int) -> float:
        from streamgraph.runtime.stream import SimulatedClock
        from streamgraph.runtime.stream import StreamRunner
        from streamgraph.runtime.sources import Frame

        if n not in self.measured:
            periods = max(3, math.ceil(self.min_frames / n))
            image = np.zeros((1, 1, 3), np.uint8)
            frames = [Frame(image=image, timestamp=k / self.fps, index=k, source_index=k) for k in range(periods)]
            runs = []
            for _ in range(self.repeats):         # the median of a few runs: robust to a busy moment
                clock = SimulatedClock()
                runner = StreamRunner([(s, frames) for s in self._sessions(n, clock)])
                t0 = time.perf_counter()
                runner.run()
                runs.append((time.perf_counter() - t0) / (n * periods))
            self.measured[n] = max(0.0, float(np.median(runs)) - self.single_frame_s())
        return self.measured[n]

    def __call__(self, n: int) -> float:
        if n <= OVERHEAD_MEASURED_MAX:
            return self.measure(n)
        a, b = OVERHEAD_MEASURED_MAX // 2, OVERHEAD_MEASURED_MAX
        oa, ob = self.measure(a), self.measure(b)
        return ob + (n - b) * max(0.0, (ob - oa) / (b - a))


# ---------------------------------------------------------------------------- the answer
@dataclass
class CapacityAnswer:
    """How many identical streams fit (``streams``), which resource binds (``binds``:
    ``CPU time`` or ``memory``), and the figures behind it (ms, bytes)."""

    name: str
    streams: int
    binds: str
    fps: float
    deadline_ms: float
    miss_rate: float
    cpu: CpuAnswer
    memory: dict
    costs_ms: dict
    calibrated_ms: dict
    overhead_ms: dict
    machine: dict
    probe: dict
    samples: CostSamples | None = field(default=None, repr=False, compare=False)
    overhead: "RunnerOverhead | None" = field(default=None, repr=False, compare=False)
    policy: PolicyModel | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """Everything above as JSON-ready values (the raw frame samples in ms included)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("samples", "overhead", "policy")}
        if self.policy is not None:
            d["policy"] = {"overload": self.policy.overload, "ratios": list(self.policy.ratios),
                           "alpha": self.policy.alpha}
        d["frame_samples_ms"] = [] if self.samples is None else [1000.0 * float(v) for v in self.samples.frame_s]
        return d


def check_numbers(fps=None, threads=None, memory_gb=None, probe_frames=None, miss_rate=None,
                  probe_seconds=None, max_fps: float = 1000.0) -> None:
    """One-line ValueError for a bad argument of :func:`estimate` (``--fps``, ``--threads``,
    ``--memory-gb``, ``--probe-frames``, ``--probe-seconds``, ``--miss-rate``)."""
    if probe_seconds is not None and (isinstance(probe_seconds, bool) or not isinstance(probe_seconds, (int, float))
                                      or not (math.isfinite(probe_seconds) and 0 <= probe_seconds <= 3600)):
        raise ValueError(f"--probe-seconds must be a number of seconds in [0, 3600], got {probe_seconds!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                            or not (math.isfinite(fps) and 0 < fps <= max_fps)):
        raise ValueError(f"--fps must be a number of frames per second in (0, {max_fps:g}], got {fps!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024):
        raise ValueError(f"--threads must be an integer in [1, 1024], got {threads!r}")
    if memory_gb is not None and (isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float))
                                  or not (math.isfinite(memory_gb) and 0 < memory_gb <= 1e6)):
        raise ValueError(f"--memory-gb must be a number of GiB in (0, 1e6], got {memory_gb!r}")
    if probe_frames is not None and (isinstance(probe_frames, bool) or not isinstance(probe_frames, int)
                                     or not 1 <= probe_frames <= 100_000):
        raise ValueError(f"--probe-frames must be an integer in [1, 100000], got {probe_frames!r}")
    if miss_rate is not None and (isinstance(miss_rate, bool) or not isinstance(miss_rate, (int, float))
                                  or not (math.isfinite(miss_rate) and 0 <= miss_rate < 1)):
        raise ValueError(f"--miss-rate must be a share of frames in [0, 1), got {miss_rate!r}")


def estimate(bundle_dir: str | Path, *, fps: float | None = None, threads: int | None = None,
             memory_gb: float | None = None, probe_frames: int = 48, probe_seconds: float = PROBE_SECONDS,
             miss_rate: float = MISS_RATE,
             video: str | Path | None = None, backend: str = "onnxruntime", overload: str | None = None,
             progress: Callable[[str], None] | None = None) -> CapacityAnswer:
    """Predict how many identical streams of the bundle at ``bundle_dir`` one executor of this
    machine serves within the deadline (the model of this module's docstring).

    ``fps``: frames per second of every stream (default the graph's ``stream.fps``);
    ``threads``: intra-op threads of the engines (default: the machine's cores);
    ``memory_gb``: GiB the deployment may use (default: memory available now);
    ``probe_frames``: frames run to measure the cost distribution (synthetic frames of the
    graph's frame size, or the first frames of ``video``), cycled for at least
    ``probe_seconds`` of wall time; ``miss_rate``: share of frames
    allowed to fail; ``overload``: the overload policy the streams run (default the graph's
    ``slo.overload``; its scheduling work is part of the runner's overhead). Costs are measured
    in this process, memory in a fresh one: run it on the target machine, otherwise idle. Raises ValueError for bad numbers,
    :class:`~streamgraph.errors.BundleError` for a bad bundle,
    :class:`~streamgraph.errors.SourceError` for a bad video."""
    from streamgraph.backends import open_backend
    from streamgraph.compiler.bundle import open_bundle
    from streamgraph.runtime import sources
    from streamgraph.runtime.stream import SimulatedClock
    from streamgraph.runtime.session import Session

    check_numbers(fps=fps, threads=threads, memory_gb=memory_gb, probe_frames=probe_frames, miss_rate=miss_rate,
                  probe_seconds=probe_seconds)
    if overload is not None and overload not in OVERLOAD_POLICIES:
        raise ValueError(f"unknown overload policy {overload!r} (allowed: {', '.join(OVERLOAD_POLICIES)})")
    say = progress or (lambda msg: None)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    options = {"threads": threads} if (threads is not None and backend == "onnxruntime") else {}
    with open_bundle(bundle_dir) as bundle:
        plan = bundle.plan
        manifest = bundle.manifest
        stream_fps = float(fps or manifest["stream"]["fps"])
        slo = manifest["slo"]
        engines = open_backend(backend, bundle, **options)

        def open_probe():
            return Session(bundle, engines, clock=SimulatedClock(), overload="fifo")

        if video is not None:
            frames = list(sources.video(video, fps=stream_fps, max_frames=probe_frames + 2))
        else:
            h, w = manifest["stream"].get("frame_size") or plan.image_size
            frames = list(sources.synthetic(probe_frames + 2, fps=stream_fps, size=(h, w)))
        first = [open_probe()]
        calibrated = {k: 1000.0 * v for k, v in first[0].calibrate().items()}
        costs = first[0].scheduler.costs
        backend_name = engines.name
        backend_threads = getattr(engines, "threads", None)
        budgets = list(plan.budgets or [plan.tokens_per_frame])
        overload = overload or slo["overload"]
        deadline_ms = float(slo["frame_deadline_ms"])

        # memory
        say("measuring the memory of a deployment (fresh process)")
        measured = measure_memory(bundle_dir, backend, threads)
        plan_shared, plan_stream = plan_shared_bytes(plan), plan_stream_bytes(plan)
        measured_stream = measured["per_stream_bytes"] if measured else None
        measured_shared = measured["shared_bytes"] if measured else None
        per_stream = max(plan_stream["total"], measured_stream or 0, 1)
        shared = max(plan_shared["total"], measured_shared or 0)
        memory_bytes = int(memory_gb * GiB) if memory_gb is not None else available_memory_bytes()
        n_mem = memory_streams(shared, per_stream, memory_bytes)

        # CPU time: search up to one stream past the memory answer (enough to say which binds).
        # The probe goes round robin over PROBE_SESSIONS streams, then again over as many streams
        # as that first answer (memory permitting): frames of many streams cost more than of a few
        overhead = RunnerOverhead(overload, deadline_ms, float(slo["ttft_ms"]), budgets, stream_fps)
        full_cost = costs.predict_frame(budgets[-1]) or 0.0
        ratios = [min(1.0, (costs.predict_frame(b) or full_cost) / full_cost) if full_cost > 0 else 1.0 for b in budgets]
        cap = max(1, min(MAX_STREAMS, n_mem + 1))
        room = int(max(1, min(n_mem, available_memory_bytes() // 4 // per_stream)))
        n_probe = min(PROBE_SESSIONS, room)
        passes = []
        while True:
            say(f"measuring the frame cost distribution over {n_probe} streams")
            samples = probe_costs(lambda: first.pop() if first else open_probe(), frames, sessions=n_probe,
                                  min_seconds=probe_seconds)
            say("measuring the runner's overhead per frame and predicting")
            policy = PolicyModel(overload_policy(overload).name, ratios, costs.alpha, samples.engine_s)
            cpu = predict_cpu(samples.frame_s, stream_fps, deadline_ms / 1000.0, overhead, miss_rate,
                              max_streams=cap, policy=policy)
            passes.append({"sessions": n_probe, "frame_mean_ms": 1000.0 * float(samples.frame_s.mean()),
                           "streams": cpu.streams})
            wider = min(cpu.streams, MAX_PROBE_SESSIONS, room)
            if len(passes) == 2 or wider <= n_probe:
                break
            n_probe = wider
    if cpu.capped and cap == n_mem + 1:
        cpu.binds = f"not reached: memory binds first (CPU time fits at least {cpu.streams})"
    n = min(cpu.streams, n_mem)
    binds = "memory" if n_mem < cpu.streams else "CPU time"
    if cpu.capped and cap == MAX_STREAMS and n_mem >= MAX_STREAMS:
        binds = f"neither up to {MAX_STREAMS} streams (the search stops there)"
    memory = {"available_bytes": memory_bytes, "memory_gb": memory_gb, "streams": n_mem,
              "shared_bytes": shared, "per_stream_bytes": per_stream,
              "plan_shared": plan_shared, "plan_per_stream": plan_stream,
              "measured_shared_bytes": measured_shared, "measured_per_stream_bytes": measured_stream,
              "measured_in": "a fresh process" if measured else "not measured (plan only)"}
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine = {"cpus": os.cpu_count(), "backend": backend_name, "threads": backend_threads,
               "loadavg_before": list(load_before) if load_before else None,
               "loadavg_after": list(load_after) if load_after else None}
    return CapacityAnswer(
        name=bundle.name, streams=n, binds=binds, fps=stream_fps, deadline_ms=deadline_ms, miss_rate=miss_rate,
        cpu=cpu, memory=memory, costs_ms=samples.summary_ms(), calibrated_ms=calibrated,
        overhead_ms={str(k): 1000.0 * v for k, v in sorted(overhead.measured.items())}, machine=machine,
        probe={"frames": int(samples.frame_s.size), "sessions": n_probe, "budget": budgets[-1], "overload": overload,
               "source": str(video) if video is not None else "synthetic", "passes": passes},
        samples=samples, overhead=overhead, policy=policy)
