"""The cluster controller: StreamWorker actors on Ray, placement, admission, failover, metrics.

:class:`Cluster` runs in the driver process (``streamgraph cluster``, a test, a bench). It

1. starts one :class:`~streamgraph.cluster.worker.StreamWorker` actor per node or device,
   declaring to Ray what each needs: ``num_cpus`` = its intra-op threads, ``memory`` = the
   compiled plan's shared bytes plus its streams' bytes (when a per-actor memory budget is
   given), and one unit of the custom resource ``streamgraph_worker`` when the nodes declare it
   (``ray start --resources='{"streamgraph_worker": 1}'``: one actor per node that offers it),
   spread over the nodes (``scheduling_strategy="SPREAD"``);
2. has every actor measure its planned capacity at the same moment (so actors sharing a machine
   each measure the CPU share they actually get): ``slots`` streams within the deadline, from
   the frame costs measured in the actor and the compiled memory plan
   (:meth:`StreamWorker.measure <streamgraph.cluster.worker.StreamWorker.measure>`); Ray's
   resources are static per node and know no deadline, so the slots are the controller's
   ledger (:class:`~streamgraph.cluster.placement.Placement`), exported as the metric
   ``streamgraph_actor_stream_slots``;
3. admits a stream only when placing it keeps its actor within its slots (otherwise
   :class:`~streamgraph.cluster.placement.AdmissionError`, one line, before anything runs) and
   keeps it on that actor (sticky: its KV cache lives there; questions are routed there);
4. watches the actors with a heartbeat (``heartbeat_s``, also the metrics' source); when an
   actor dies (``ray.kill``, a crashed node, a heartbeat silent for ``dead_after_s``) its
   streams are placed again on the surviving actors with the same policy and their sessions
   restart (system prompt re-prefilled); each stream's report records the failover: the dead
   actor, when it was detected, when the stream ran again, the frames lost and the gap.

Other streams are not touched by a failover except that their actor's runner is rebuilt to
include the newcomers (their sessions, KV caches and pending frames carry over).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from streamgraph.cluster.placement import ActorPlan, AdmissionError, Placement
from streamgraph.errors import StreamgraphError

log = logging.getLogger(__name__)

WORKER_RESOURCE = "streamgraph_worker"
COUNTERS = ("run", "drop", "error", "misses", "questions_ok", "questions_error", "ttft_misses")


def require_ray():
    """``import ray``, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise StreamgraphError("streamgraph cluster needs the ray extra: pip install -c constraints.txt "
                               "'streamgraph[ray]'") from None
    return ray


@dataclass
class StreamState:
    """The controller's view of one stream: where it runs (``actor``), its placements and
    failovers, and its counters summed over every placement (``totals``)."""

    sid: str
    spec: dict
    actor: str | None
    admitted_epoch: float
    state: str = "running"               # running | unplaced (no capacity after a failover) | removed
    error: str | None = None
    placements: list = field(default_factory=list)
    failovers: list = field(default_factory=list)
    base: dict = field(default_factory=dict)       # counters of earlier placements
    info: dict | None = None                        # the latest heartbeat of the current placement

    def totals(self) -> dict:
        """Counters and histograms over every placement of the stream."""
        cur = self.info or {}
        out = {k: self.base.get(k, 0) + (cur.get("counts") or {}).get(k, 0) for k in COUNTERS}
        for k in ("delivered", "skipped"):
            out[k] = self.base.get(k, 0) + (cur.get(k) or 0)
        for k in ("latency_buckets", "ttft_buckets"):
            a, b = self.base.get(k), cur.get(k)
            out[k] = [x + y for x, y in zip(a, b)] if a and b else list(a or b or [])
        for k in ("latency_sum", "ttft_sum"):
            out[k] = self.base.get(k, 0.0) + (cur.get(k) or 0.0)
        stages = dict(self.base.get("misses_by_stage", {}))
        for s, n in (cur.get("misses_by_stage") or {}).items():
            stages[s] = stages.get(s, 0) + n
        out["misses_by_stage"] = stages
        out["lost"] = sum(f.get("frames_lost") or 0 for f in self.failovers)
        return out

    def _absorb(self, info: dict | None) -> None:
        """Fold a finished placement's counters (``info``) into ``base``."""
        if not info:
            return
        saved, self.info = self.info, info
        totals = self.totals()
        self.info = saved
        self.base = {k: v for k, v in totals.items() if k != "lost"}


class Cluster:
    """Streams of one bundle over ``actors`` StreamWorker actors on a Ray cluster.

    ``bundle``: a compiled bundle directory, present at the same path on every node (shared
    storage, or compiled on each); ``fps``: frames per second of every stream (default the
    graph's ``stream.fps``); ``threads``: intra-op threads per actor (its ``num_cpus``);
    ``placement``: ``plan`` or ``round_robin``; ``reserve_actors``: actors' slots kept free
    for failover (N+k); ``probe_seconds``: how long each actor measures its frame costs;
    ``miss_rate``: share of frames allowed to fail; ``memory_gb``: memory budget per actor
    (declared to Ray as its ``memory``; default: the node's available memory);
    ``actor_cpus``: per actor, CPU cores to pin it to (emulating unequal nodes on one
    machine; None: no pinning); ``heartbeat_s``: the controller's polling period;
    ``dead_after_s``: a silent actor is declared dead (and killed) after this long;
    ``on_actors(info)``: called with every actor's :meth:`StreamWorker.info
    <streamgraph.cluster.worker.StreamWorker.info>` (pid, node, ...) once they run and before
    they measure their capacity (to give them CPU limits, say).

    Call :meth:`start` (or use it as a context manager), then :meth:`add_stream`. Ray must
    be initialised by the caller (``ray.init(...)``). Raises ValueError for bad options."""

    def __init__(self, bundle: str | Path, *, actors: int = 4, threads: int = 1, fps: float | None = None,
                 placement: str = "plan", reserve_actors: int = 0, probe_seconds: float = 2.0,
                 miss_rate: float = 0.01, memory_gb: float | None = None, backend: str = "onnxruntime",
                 actor_cpus: list | None = None, heartbeat_s: float = 0.25, dead_after_s: float = 10.0,
                 history: int = 256, probe_sessions: int = 4, on_actors=None):
        for name, v in (("actors", actors), ("threads", threads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if actor_cpus is not None and len(actor_cpus) != actors:
            raise ValueError(f"actor_cpus has {len(actor_cpus)} entries for {actors} actors")
        self.bundle = str(Path(bundle).expanduser().resolve())
        self.n_actors, self.threads, self.backend = actors, threads, backend
        self.placement = Placement(placement, reserve_actors)
        self.probe_seconds, self.miss_rate, self.memory_gb = probe_seconds, miss_rate, memory_gb
        self.actor_cpus, self.heartbeat_s, self.dead_after_s = actor_cpus, heartbeat_s, dead_after_s
        self.history, self.probe_sessions = history, probe_sessions
        self.on_actors = on_actors
        if fps is None:
            from streamgraph.compiler.bundle import open_bundle

            with open_bundle(self.bundle) as b:
                fps = float(b.manifest["stream"]["fps"])
        self.fps = float(fps)
        self.handles: dict = {}
        self.plans: dict[str, ActorPlan] = {}
        self.actor_info: dict[str, dict] = {}
        self.dead: dict[str, dict] = {}
        self.streams: dict[str, StreamState] = {}
        self.snapshots: dict[str, dict] = {}
        self.admissions = {"admitted": 0, "refused": 0}
        self.failover_count = 0
        self.kills: dict[str, float] = {}
        self._lock = threading.RLock()
        self._admit = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._silent_since: dict[str, float] = {}

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout_s: float = 300.0) -> "Cluster":
        """Start the actors, measure each one's capacity (all at once), start the heartbeat."""
        ray = require_ray()
        from streamgraph.cluster.worker import StreamWorker

        Remote = ray.remote(StreamWorker)
        declared = WORKER_RESOURCE in ray.cluster_resources()
        memory = int(self.memory_gb * 1024 ** 3) if self.memory_gb is not None else None
        for i in range(self.n_actors):
            name = f"w{i}"
            opts = {"num_cpus": self.threads, "max_concurrency": 16, "max_restarts": 0,
                    "scheduling_strategy": "SPREAD"}
            if memory is not None:
                opts["memory"] = memory
            if declared:
                opts["resources"] = {WORKER_RESOURCE: 1}
            cpus = self.actor_cpus[i] if self.actor_cpus is not None else None
            self.handles[name] = Remote.options(**opts).remote(name, self.bundle, backend=self.backend,
                                                              threads=self.threads, cpus=cpus, history=self.history)
        infos = ray.get([h.info.remote() for h in self.handles.values()], timeout=timeout_s)
        self.actor_info = {i["actor"]: i for i in infos}
        if self.on_actors is not None:                 # e.g. put each actor's process in a cgroup
            self.on_actors(self.actor_info)
        start = time.time() + 0.5
        plans = ray.get([h.measure.remote(self.fps, probe_seconds=self.probe_seconds, start_epoch=start,
                                          miss_rate=self.miss_rate, memory_bytes=memory,
                                          probe_sessions=self.probe_sessions)
                         for h in self.handles.values()], timeout=timeout_s)
        for p in plans:
            plan = ActorPlan(**p)
            self.plans[plan.actor] = plan
            self.placement.add_actor(plan)
        self._monitor = threading.Thread(target=self._watch, name="streamgraph-cluster-monitor", daemon=True)
        self._monitor.start()
        return self

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the heartbeat and every actor (their streams end)."""
        ray = require_ray()
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(5.0)
        with self._lock:
            handles = dict(self.handles)
            self.handles.clear()
        refs = [h.stop.remote() for h in handles.values()]
        try:
            ray.get(refs, timeout=15)
        except Exception:                 # an actor that will not stop: killed below
            pass
        for h in handles.values():
            try:
                ray.kill(h)
            except Exception:
                pass

    @property
    def capacity(self) -> int:
        """Planned streams over the live actors."""
        return self.placement.capacity

    def replan(self, fps: float, timeout_s: float = 120.0) -> int:
        """Plan every live actor again for streams at ``fps`` from the frame costs they
        measured at :meth:`start` (no new probe); returns the new capacity. Only while no
        stream is placed (the slots of running streams would change under them): raises
        StreamgraphError otherwise."""
        ray = require_ray()
        with self._lock:
            if self.placement.streams:
                raise StreamgraphError("replan: remove the streams first")
            handles = dict(self.handles)
        memory = int(self.memory_gb * 1024 ** 3) if self.memory_gb is not None else None
        plans = ray.get([h.plan_for.remote(float(fps), miss_rate=self.miss_rate, memory_bytes=memory)
                         for h in handles.values()], timeout=timeout_s)
        with self._lock:
            self.fps = float(fps)
            for p in plans:
                plan = ActorPlan(**p)
                self.plans[plan.actor] = plan
                self.placement.add_actor(plan)
        return self.placement.capacity

    def set_policy(self, policy: str) -> None:
        """Change the placement policy for streams admitted from now on."""
        Placement(policy)                       # validates
        self.placement.policy = policy

    # ------------------------------------------------------------------ streams
    def add_stream(self, sid: str, source: str = "synthetic", *, t0: float | None = None,
                   overload: str | None = None, timeout_s: float = 60.0) -> dict:
        """Admit stream ``sid`` and start it on the actor the policy picks (its camera's
        frame 0 at epoch ``t0``, default now). Returns its info (``actor`` included). Raises
        :class:`~streamgraph.cluster.placement.AdmissionError` (one line) when it would put an
        actor past its planned capacity, StreamgraphError when the actor cannot open it."""
        ray = require_ray()
        spec = {"source": source, "fps": self.fps, "t0": t0 or time.time(), "overload": overload}
        with self._admit:
            with self._lock:
                if sid in self.streams and self.streams[sid].state != "removed":
                    raise AdmissionError(f"stream {sid!r} exists already (on {self.streams[sid].actor})")
                try:
                    actor = self.placement.choose(sid)
                except AdmissionError:
                    self.admissions["refused"] += 1
                    raise
                self.placement.assign(sid, actor)
                handle = self.handles[actor]
            try:
                info = ray.get(handle.add_stream.remote(sid, spec), timeout=timeout_s)
            except BaseException as e:
                with self._lock:
                    self.placement.release(sid)
                raise StreamgraphError(f"stream {sid!r}: actor {actor} could not open it: {_one_line(e)}") from None
            with self._lock:
                st = StreamState(sid, spec, actor, time.time())
                st.placements.append({"actor": actor, "placed_epoch": time.time(), "reason": "admitted"})
                st.info = info
                self.streams[sid] = st
                self.admissions["admitted"] += 1
        return info

    def remove_stream(self, sid: str, timeout_s: float = 60.0) -> dict:
        """Stop stream ``sid``; returns its final report (see :meth:`report`)."""
        ray = require_ray()
        with self._lock:
            st = self.streams.get(sid)
            if st is None or st.state == "removed":
                raise StreamgraphError(f"no stream {sid!r}")
            actor = self.placement.release(sid)
            handle = self.handles.get(actor) if actor else None
            st.state = "removed"
        rep = {}
        if handle is not None:
            rep = ray.get(handle.remove_stream.remote(sid), timeout=timeout_s)
            with self._lock:
                st.info = rep.get("cluster", st.info)
        return self._merge_report(st, rep)

    def ask(self, sid: str, text: str, max_new_tokens: int | None = None, timeout_s: float = 60.0) -> dict:
        """Ask about stream ``sid`` on the actor that holds its KV cache; returns the
        question's record. A question whose actor died meanwhile is asked again once the
        stream has been placed again."""
        ray = require_ray()
        end = time.monotonic() + timeout_s
        while True:
            with self._lock:
                st = self.streams.get(sid)
                if st is None or st.state == "removed":
                    raise StreamgraphError(f"no stream {sid!r}")
                if st.state == "unplaced":
                    raise StreamgraphError(f"stream {sid!r} is not running: {st.error}")
                actor = st.actor
                handle = self.handles.get(actor)
            if handle is not None:
                try:
                    rec = ray.get(handle.ask.remote(sid, text, max_new_tokens, max(1.0, end - time.monotonic())),
                                  timeout=max(1.0, end - time.monotonic()))
                    rec["actor"] = actor
                    return rec
                except ray.exceptions.RayActorError:
                    pass                                   # failover under way: ask again
                except ray.exceptions.RayTaskError as e:
                    raise e.as_instanceof_cause() from None
            if time.monotonic() > end:
                raise StreamgraphError(f"stream {sid!r}: no answer within {timeout_s:g} s")
            time.sleep(0.05)

    def report(self, sid: str, timeout_s: float = 30.0) -> dict:
        """Stream ``sid``'s report: the session's ``meta``/``summary`` on its current actor
        and ``cluster``: placements, failovers (gap, frames lost) and counters over all of them."""
        ray = require_ray()
        with self._lock:
            st = self.streams.get(sid)
            if st is None:
                raise StreamgraphError(f"no stream {sid!r}")
            handle = self.handles.get(st.actor) if st.state == "running" else None
        rep = ray.get(handle.report.remote(sid), timeout=timeout_s) if handle is not None else {}
        return self._merge_report(st, rep)

    def _merge_report(self, st: StreamState, rep: dict) -> dict:
        with self._lock:
            return {"stream": st.sid, "state": st.state, "actor": st.actor, "error": st.error,
                    "meta": rep.get("meta"), "summary": rep.get("summary"),
                    "cluster": {"placements": list(st.placements), "failovers": list(st.failovers),
                                "totals": st.totals(), "current": rep.get("cluster", st.info)}}

    # ------------------------------------------------------------------ failures
    def kill_actor(self, actor: str) -> float:
        """``ray.kill`` an actor (tests, drills); returns the epoch time of the kill. Its
        streams are placed again when the heartbeat notices."""
        ray = require_ray()
        with self._lock:
            handle = self.handles[actor]
            t = time.time()
            self.kills[actor] = t
        ray.kill(handle, no_restart=True)
        return t

    def _watch(self) -> None:
        ray = require_ray()
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                handles = dict(self.handles)
            refs = {name: h.snapshot.remote() for name, h in handles.items()}
            wait_until = time.monotonic() + max(1.0, 5 * self.heartbeat_s)
            for name, ref in refs.items():
                try:
                    snap = ray.get(ref, timeout=max(0.01, wait_until - time.monotonic()))
                except ray.exceptions.GetTimeoutError:
                    since = self._silent_since.setdefault(name, time.monotonic())
                    if time.monotonic() - since > self.dead_after_s:
                        self._failover(name, f"no heartbeat for {self.dead_after_s:g} s")
                        try:
                            ray.kill(handles[name], no_restart=True)
                        except Exception:
                            pass
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError) as e:
                    self._failover(name, _one_line(e))
                    continue
                except Exception as e:            # a bug in the worker's snapshot: log, keep going
                    log.warning("heartbeat of %s failed: %s", name, _one_line(e))
                    continue
                self._silent_since.pop(name, None)
                self._absorb_snapshot(name, snap)

    def _absorb_snapshot(self, actor: str, snap: dict) -> None:
        with self._lock:
            if actor not in self.handles:
                return
            self.snapshots[actor] = snap
            for sid, info in snap["streams"].items():
                st = self.streams.get(sid)
                if st is None or st.actor != actor or st.state != "running":
                    continue
                st.info = info
                for f in st.failovers:
                    if f.get("to") == actor and f.get("first_run_epoch") is None and info.get("first_run_epoch"):
                        f["first_run_epoch"] = info["first_run_epoch"]
                        f["first_k"] = info.get("first_k")
                        if f.get("last_k") is not None and info.get("first_k") is not None:
                            f["frames_lost"] = int(info["first_k"] - f["last_k"] - 1)
                            f["gap_s"] = (info["first_k"] - f["last_k"]) / self.fps
                        start = f.get("killed_epoch") or f["detected_epoch"]
                        f["resume_s"] = info["first_run_epoch"] - start

    def _failover(self, actor: str, why: str) -> None:
        """Place the streams of dead ``actor`` again on the survivors (sessions restart)."""
        ray = require_ray()
        detected = time.time()
        with self._lock:
            if actor not in self.handles:
                return
            del self.handles[actor]
            self.dead[actor] = {"detected_epoch": detected, "why": why, "killed_epoch": self.kills.get(actor)}
            self.snapshots.pop(actor, None)
            orphans = self.placement.remove_actor(actor)
            self.failover_count += 1
            moves = []
            for sid in orphans:
                st = self.streams[sid]
                last = st.info or {}
                st._absorb(st.info)
                st.info = None
                event = {"from": actor, "why": why, "killed_epoch": self.kills.get(actor), "detected_epoch": detected,
                         "last_k": last.get("last_k"), "last_capture_epoch": last.get("last_capture_epoch"),
                         "to": None, "placed_epoch": None, "first_run_epoch": None, "frames_lost": None,
                         "gap_s": None, "resume_s": None}
                st.failovers.append(event)
                try:
                    to = self.placement.choose(sid, failover=True)
                except AdmissionError as e:
                    st.state, st.actor, st.error = "unplaced", None, str(e)
                    event["error"] = str(e)
                    log.warning("failover of %s: %s", sid, e)
                    continue
                self.placement.assign(sid, to)
                st.actor = to
                event["to"] = to
                spec = {**st.spec, "resumed": {"from": actor, "detected_epoch": detected, "last_k": last.get("last_k")}}
                moves.append((st, to, event, self.handles[to].add_stream.remote(sid, spec)))
        for st, to, event, ref in moves:
            try:
                info = ray.get(ref, timeout=60)
            except Exception as e:
                with self._lock:
                    self.placement.release(st.sid)
                    st.state, st.actor, st.error = "unplaced", None, _one_line(e)
                    event["error"] = st.error
                continue
            with self._lock:
                event["placed_epoch"] = time.time()
                st.placements.append({"actor": to, "placed_epoch": event["placed_epoch"], "reason": f"failover from {actor}"})
                st.info = info

    # ------------------------------------------------------------------ metrics
    def snapshot(self) -> dict:
        """Everything /metrics shows: per actor (plan, streams, up) and per stream (counters
        over every placement, current actor)."""
        with self._lock:
            actors = {}
            for name, plan in self.plans.items():
                up = name in self.handles
                snap = self.snapshots.get(name) or {}
                actors[name] = {"up": up, "node": plan.node, "slots": plan.slots if up else 0,
                                "planned_slots": plan.slots, "streams": len(self.placement.on(name)) if up else 0,
                                "frame_ms": plan.frame_ms, "binds": plan.binds,
                                "runner_restarts": snap.get("runner_restarts", 0),
                                "carried_frames": snap.get("carried_frames", 0)}
            streams = {sid: {"actor": st.actor, "state": st.state, "totals": st.totals(),
                             "kv_bytes": (st.info or {}).get("kv_bytes", 0),
                             "slots_in_use": (st.info or {}).get("slots_in_use", 0),
                             "failovers": len(st.failovers)}
                       for sid, st in self.streams.items() if st.state != "removed"}
            return {"actors": actors, "streams": streams, "capacity": self.placement.capacity,
                    "admissible": self.placement.admissible, "admissions": dict(self.admissions),
                    "failovers": self.failover_count, "policy": self.placement.policy, "fps": self.fps}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
