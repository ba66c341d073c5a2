"""Many cameras across machines on Ray (docs/cluster.md).

* :mod:`streamgraph.cluster.placement` — actors' planned capacity, placement policies
  (``plan``, ``round_robin``) and admission control (Ray-free).
* :mod:`streamgraph.cluster.worker` — :class:`StreamWorker`, one Ray actor per node or
  device: one shared backend, the sessions of its streams, one EDF runner.
* :mod:`streamgraph.cluster.cluster` — :class:`Cluster`, the controller: starts the actors,
  measures their capacity, admits and places streams (sticky), fails over, aggregates metrics.
* :mod:`streamgraph.cluster.http` — ``/metrics`` (the names of ``serve``'s, per stream and per
  actor), ``/healthz`` and the stream/question API.

Needs the ``ray`` extra (``pip install -c constraints.txt 'streamgraph[ray]'``) for
:class:`Cluster`; placement and the worker class import without Ray.
"""
from __future__ import annotations

from streamgraph.cluster.placement import POLICIES, ActorPlan, AdmissionError, Placement

__all__ = ["ActorPlan", "AdmissionError", "Cluster", "POLICIES", "Placement", "StreamWorker"]


def __getattr__(name):
    if name == "Cluster":
        from streamgraph.cluster.cluster import Cluster

        return Cluster
    if name == "StreamWorker":
        from streamgraph.cluster.worker import StreamWorker

        return StreamWorker
    raise AttributeError(name)
