"""``streamgraph cluster``: a Ray cluster of StreamWorker actors behind one HTTP endpoint."""
from __future__ import annotations

import signal
import threading
import time

from streamgraph.errors import StreamgraphError


def run_cluster(bundle: str, *, address: str = "local", actors: int = 4, threads: int = 1, fps: float | None = None,
                placement: str = "plan", reserve_actors: int = 0, probe_seconds: float = 3.0,
                miss_rate: float = 0.01, memory_gb: float | None = None, videos: list[str] = (),
                host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                say=print, on_ready=None) -> int:
    """Connect to Ray (``address``: ``local`` starts one on this machine with ``actors *
    threads`` CPUs; ``auto`` or ``HOST:PORT`` joins a running cluster), start the cluster
    (:class:`~streamgraph.cluster.cluster.Cluster`), admit the ``[ID=]SOURCE`` streams of
    ``videos`` (a refused one is reported, one line, and skipped), serve ``/metrics``,
    ``/healthz`` and the stream API on ``host:port`` until SIGINT/SIGTERM, then stop the
    actors. Raises StreamgraphError (one line) for a bad bind or a missing ray."""
    from streamgraph.cluster.cluster import Cluster, require_ray
    from streamgraph.cluster.http import create_app
    from streamgraph.cluster.placement import AdmissionError
    from streamgraph.serve import ServerThread, check_bind, parse_stream_arg, token_from_env

    ray = require_ray()
    token = token_from_env(token)
    check_bind(host, token)
    if address == "local":
        ray.init(address="local", num_cpus=actors * threads, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    cluster = None
    try:
        cluster = Cluster(bundle, actors=actors, threads=threads, fps=fps, placement=placement,
                          reserve_actors=reserve_actors, probe_seconds=probe_seconds, miss_rate=miss_rate,
                          memory_gb=memory_gb)
        say(f"starting {actors} StreamWorker actor(s) on Ray ({address}); each measures its capacity "
            f"for {probe_seconds:g} s")
        cluster.start()
        for name, p in sorted(cluster.plans.items()):
            say(f"  {name} on {p.node[:12]}: {p.slots} stream(s) at {p.fps:g} fps within {p.deadline_ms:g} ms "
                f"({p.binds} binds; frame p50 {p.frame_ms.get('p50', 0):.1f} ms, p99 {p.frame_ms.get('p99', 0):.1f} ms)")
        say(f"planned capacity {cluster.capacity} stream(s), admission up to {cluster.placement.admissible}; "
            f"placement {placement}")
        for k, v in enumerate(videos, 1):
            sid, source = parse_stream_arg(v)
            sid = sid or f"s{k}"
            try:
                info = cluster.add_stream(sid, source)
                say(f"  stream {sid} <- {source}: on {info['actor']}")
            except AdmissionError as e:
                say(f"  refused: {e}")
        with ServerThread(create_app(cluster, token=token), host, port) as srv:
            say(f"serving on {srv.url} ({'token required' if token else 'no token: loopback only'}): /metrics, "
                f"/healthz, /v1/streams, /v1/chat/completions")
            if on_ready is not None:
                on_ready(srv.url, cluster)
            stop = threading.Event()
            main = threading.current_thread() is threading.main_thread()
            old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
            try:
                while not stop.wait(0.2):
                    pass
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
    finally:
        if cluster is not None:
            cluster.close()
        ray.shutdown()
    return 0


def wait_port(url: str, timeout: float = 30.0) -> None:
    """Block until ``url``/healthz answers (tests)."""
    import urllib.request

    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise StreamgraphError(f"{url} did not answer within {timeout:g} s") from None
            time.sleep(0.1)
