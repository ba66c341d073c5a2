"""``streamgraph serve``: streams over HTTP (FastAPI + uvicorn, Server-Sent Events, Prometheus).

* :mod:`streamgraph.serve.streams` — a served stream = a session + a runner + its worker thread;
  the manager of a server's streams.
* :mod:`streamgraph.serve.app` — the HTTP API (:func:`create_app`), OpenAI-compatible chat
  completions included.
* :mod:`streamgraph.serve.metrics` — ``/metrics`` (prometheus_client).

Needs the ``serve`` extra (``pip install 'streamgraph[serve]'``). See docs/live.md, "Server".
"""
from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time

from streamgraph.errors import StreamgraphError

TOKEN_ENV = "STREAMGRAPH_API_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False                  # a host name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuse a bind that other machines can reach without an API token. Raises
    StreamgraphError (one line)."""
    if token is not None and not token.strip():
        raise StreamgraphError(f"--token (or ${TOKEN_ENV}) is empty")
    if not is_loopback(host) and not token:
        raise StreamgraphError(f"--host {host}: binding a non-loopback address needs an API token "
                               f"(--token TOKEN or ${TOKEN_ENV}); clients send 'Authorization: Bearer TOKEN'")


def create_app(*args, **kwargs):
    """See :func:`streamgraph.serve.app.create_app`."""
    from streamgraph.serve.app import create_app as _create

    return _create(*args, **kwargs)


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread (tests, embedding).

    ``with ServerThread(app) as srv:`` binds ``host`` on a free port (``port=0``) or the given
    one, waits until it accepts connections (at most ``start_timeout`` s) and gives
    ``srv.url``; leaving the block stops the server (streams stopped by the app's shutdown).
    Raises StreamgraphError when the server does not start in time."""

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0, *, start_timeout: float = 30.0,
                 log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host.strip("[]"), port))
        except OSError as e:
            self.sock.close()
            raise StreamgraphError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.start_timeout = start_timeout
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="streamgraph-serve", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise StreamgraphError(f"the server on {self.url} stopped while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise StreamgraphError(f"the server on {self.url} did not start within {self.start_timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def token_from_env(token: str | None) -> str | None:
    """``token``, else ``$STREAMGRAPH_API_TOKEN`` (None when neither is set)."""
    if token is not None:
        return token
    return os.environ.get(TOKEN_ENV) or None


def parse_stream_arg(text: str) -> tuple[str | None, str]:
    """``[ID=]SOURCE`` of ``serve --video`` -> (id or None, source). An id is 1-64 letters,
    digits, '.', '_', '-' (so a URL's ``?a=b`` is never read as one)."""
    from streamgraph.serve.streams import STREAM_ID

    head, sep, rest = text.partition("=")
    if sep and STREAM_ID.match(head) and rest:
        return head, rest
    return None, text


def run_server(*, target: str | None, videos: list[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               token: str | None = None, fps: float | None = None, speed: float = 1.0, loop: bool = False,
               overload: str | None = None, backend: str = "onnxruntime", records: str | None = None,
               history: int = 1024, max_streams: int = 8, max_body_bytes: int = 1 << 20,
               log_level: str = "info", on_ready=None) -> int:
    """``streamgraph serve``: check the bind, load the ``--video`` streams, then serve until
    Ctrl-C/SIGTERM (streams stopped, records closed). ``target``: a bundle directory, the
    default of streams added without one (a graph file is compiled by the caller first).
    ``on_ready(url, streams)`` is called once the socket is bound and the streams run.
    Raises StreamgraphError / ValueError (one line) for a bad bind, source or bundle."""
    try:
        import uvicorn

        from streamgraph.serve.app import create_app as _create
        from streamgraph.serve.streams import StreamConfig, StreamManager
    except ImportError as e:
        raise StreamgraphError(f"streamgraph serve needs the serve extra ({e.name} is missing): "
                               f"pip install 'streamgraph[serve]'") from None
    token = token_from_env(token)
    check_bind(host, token)
    if records is not None:
        from streamgraph.runtime.metrics import check_report_dir

        check_report_dir(records)
    manager = StreamManager(max_streams=max_streams, history=history, records=records,
                            default_bundle=target, backend=backend)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        # listen now, so a client that connects as soon as on_ready reports the URL is queued
        # in the backlog until uvicorn accepts, instead of refused (uvicorn listens again: harmless)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise StreamgraphError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    try:
        for v in videos:
            sid, source = parse_stream_arg(v)
            manager.add(StreamConfig(source=source, fps=fps, speed=speed, loop=loop, overload=overload), sid)
        app = _create(manager, token=token, max_body_bytes=max_body_bytes)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        bound = sock.getsockname()
        url = f"http://{'[' + bound[0] + ']' if ':' in bound[0] else bound[0]}:{bound[1]}"
        if on_ready is not None:
            on_ready(url, manager.list())
        _serve_until_signal(server, sock)
    finally:
        manager.close()
        sock.close()
    return 0


def _serve_until_signal(server, sock) -> None:
    """Run uvicorn in a thread; SIGINT/SIGTERM in the main thread stop it gracefully (the
    app's shutdown stops the streams), a second one forces it."""
    import signal

    def stop(signum, frame):
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="streamgraph-serve", daemon=True)
    main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
