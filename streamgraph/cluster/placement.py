"""Placement and admission control of streams over the actors of a cluster (Ray-free).

Each actor (:class:`~streamgraph.cluster.worker.StreamWorker`) reports its **plan**: how many
streams of the bundle it serves within the deadline (``slots``), the smaller of the CPU-time
answer (frame costs measured inside the actor, on the CPU share it actually gets, through
:func:`streamgraph.runtime.capacity.predict_cpu`) and the memory answer (the compiled memory
plan: ``shared + n * per_stream <= memory``, :func:`streamgraph.runtime.capacity.memory_streams`).

:class:`Placement` is the controller's ledger of which stream lives on which actor (sticky:
a stream stays on its actor until that actor dies or the stream is removed) and the
admission rule: a stream is admitted only when an actor has a free slot, i.e. when adding it
keeps every actor within its planned capacity; otherwise :class:`AdmissionError` says why in
one line, before any frame could miss. ``reserve_actors = k`` keeps the slots of the ``k``
largest actors free (N+k): the streams of any ``k`` actors that die can then be placed again
without refusals.

Policies:

* ``plan`` (default): the actor with a free slot whose load after adding the stream is
  lowest relative to its slots (``(streams + 1) / slots``; ties: most free memory, then
  name) — plan-aware: a bigger actor takes proportionally more streams.
* ``round_robin``: the next live actor in turn, ignoring per-actor slots (the baseline that
  Ray's own spreading amounts to); admission then checks only the cluster's total.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from streamgraph.errors import StreamgraphError

POLICIES = ("plan", "round_robin")


class AdmissionError(StreamgraphError):
    """A stream refused at admission (one line: which stream, why, and the cluster's load)."""


@dataclass
class ActorPlan:
    """One actor's planned capacity for streams of one bundle at ``fps``.

    ``slots``: streams it serves with at most ``miss_rate`` of frames late, dropped or
    degraded (``min(cpu_streams, memory_streams)``); ``binds``: ``CPU time`` or ``memory``;
    bytes from the compiled memory plan (``shared_bytes`` once per actor, ``per_stream_bytes``
    each stream; ``memory_bytes`` the actor's budget); ``frame_ms``: the measured frame cost
    (mean, p50, p99, max; ms) behind the CPU answer."""

    actor: str
    node: str
    slots: int
    cpu_streams: int
    memory_streams: int
    binds: str
    fps: float
    deadline_ms: float
    shared_bytes: int
    per_stream_bytes: int
    memory_bytes: int
    threads: int | None = None
    frame_ms: dict = field(default_factory=dict)
    cpu_binds: str = ""
    first_pass: dict = field(default_factory=dict)
    second_pass: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Placement:
    """The ledger of stream -> actor and the admission rule (see the module docstring).

    Raises ValueError for an unknown ``policy`` or a negative ``reserve_actors``."""

    def __init__(self, policy: str = "plan", reserve_actors: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r} (allowed: {', '.join(POLICIES)})")
        if isinstance(reserve_actors, bool) or not isinstance(reserve_actors, int) or reserve_actors < 0:
            raise ValueError(f"reserve_actors must be an integer >= 0, got {reserve_actors!r}")
        self.policy = policy
        self.reserve_actors = reserve_actors
        self.actors: dict[str, ActorPlan] = {}
        self.streams: dict[str, str] = {}          # stream -> actor, in admission order
        self._turn = 0

    # ------------------------------------------------------------------ actors
    def add_actor(self, plan: ActorPlan) -> None:
        self.actors[plan.actor] = plan

    def remove_actor(self, actor: str) -> list[str]:
        """Forget a dead actor; returns its streams (admission order), now unplaced."""
        self.actors.pop(actor, None)
        orphans = [s for s, a in self.streams.items() if a == actor]
        for s in orphans:
            del self.streams[s]
        return orphans

    def on(self, actor: str) -> list[str]:
        """The streams placed on ``actor``."""
        return [s for s, a in self.streams.items() if a == actor]

    @property
    def capacity(self) -> int:
        """Planned streams of every live actor together."""
        return sum(p.slots for p in self.actors.values())

    @property
    def admissible(self) -> int:
        """Streams admission lets in: the capacity less the slots of the ``reserve_actors``
        largest actors."""
        slots = sorted((p.slots for p in self.actors.values()), reverse=True)
        return sum(slots[self.reserve_actors:])

    def load(self) -> str:
        """``actor used/slots`` of every actor, for messages."""
        return ", ".join(f"{a} {len(self.on(a))}/{p.slots}" for a, p in sorted(self.actors.items()))

    # ------------------------------------------------------------------ admission
    def choose(self, stream: str, failover: bool = False) -> str:
        """The actor ``stream`` goes to under the policy; raises AdmissionError when admitting
        it would put an actor (``plan``) or the cluster (``round_robin``) past its planned
        capacity, or past the reserve. ``failover``: the stream is being placed again after
        its actor died; the reserve is there for it."""
        if stream in self.streams:
            raise AdmissionError(f"stream {stream!r} is placed already (on {self.streams[stream]})")
        if not self.actors:
            raise AdmissionError(f"stream {stream!r} refused: the cluster has no live actor")
        n = len(self.streams)
        fps, deadline = next(iter(self.actors.values())).fps, next(iter(self.actors.values())).deadline_ms
        limit = self.capacity if failover else self.admissible
        if n + 1 > limit:
            reserve = f", {self.reserve_actors} actor(s) held in reserve for failover" \
                if self.reserve_actors and not failover else ""
            raise AdmissionError(
                f"stream {stream!r} refused: the cluster is at its planned capacity ({n} of {limit} "
                f"streams at {fps:g} fps within {deadline:g} ms{reserve}; actors {self.load()}); "
                f"one more would make deadlines fail")
        if self.policy == "round_robin":
            names = sorted(self.actors)
            actor = names[self._turn % len(names)]
            self._turn += 1
            return actor
        best, key = None, None
        for name, p in self.actors.items():
            used = len(self.on(name))
            if used + 1 > p.slots:
                continue
            k = ((used + 1) / p.slots, -(p.memory_bytes - p.shared_bytes - (used + 1) * p.per_stream_bytes), name)
            if key is None or k < key:
                best, key = name, k
        if best is None:
            raise AdmissionError(
                f"stream {stream!r} refused: no actor has a free slot (actors {self.load()}; "
                f"{fps:g} fps within {deadline:g} ms); one more would make deadlines fail")
        return best

    def assign(self, stream: str, actor: str) -> None:
        if actor not in self.actors:
            raise ValueError(f"no live actor {actor!r}")
        self.streams[stream] = actor

    def release(self, stream: str) -> str | None:
        """Forget ``stream``; returns the actor it was on (None when unknown)."""
        return self.streams.pop(stream, None)
