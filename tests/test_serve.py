"""``streamgraph serve`` over real HTTP on loopback: uvicorn in a thread (and once the CLI in a
subprocess), httpx for SSE, the ``openai`` client for chat completions, prometheus_client's
parser for /metrics.

References are independent of the server: every answer served over HTTP is recomputed
offline by a fresh Session fed the same frames and questions in the order the stream's
records.jsonl says they happened; the /metrics counts are recomputed from records.jsonl.
Nothing is asserted on wall-clock time."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from streamgraph.runtime import sources  # noqa: E402
from streamgraph.runtime.metrics import RECORDS_FILE, read_records  # noqa: E402
from streamgraph.serve import ServerThread, check_bind, create_app, parse_stream_arg  # noqa: E402

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 16 * 1024
MAX_NEW = 6
DEMO = sources.streamqa_demo() / "videos" / "e1000900020.mp4"      # 12 frames, 2 fps
# two streams: (id, source, fps, speed, max_frames)
STREAMS = [("cam-a", str(sources.sample_clip()), 4.0, 2.0, 12), ("cam-b", str(DEMO), 2.0, 3.0, None)]
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(onnx_bundle, tmp_path_factory):
    records = tmp_path_factory.mktemp("serve-records")
    app = create_app(token=TOKEN, max_body_bytes=MAX_BODY, default_bundle=str(onnx_bundle), records=records,
                     max_streams=4, answer_timeout_s=TIMEOUT)
    with ServerThread(app) as srv:
        yield srv.url, records
    # leaving the block stops uvicorn; the app's shutdown stops every stream


def _client(url: str, **kw) -> httpx.Client:
    return httpx.Client(base_url=url, headers=AUTH, timeout=TIMEOUT, trust_env=False, **kw)


def _wait(pred, what: str, timeout: float = TIMEOUT, poll: float = 0.05):
    """Poll ``pred()`` until truthy (bounded: fails the test after ``timeout`` s)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}")


def _frames_by_capture(source: str, fps: float, speed: float, max_frames):
    """capture time (as the runner computes it: timestamp / speed) -> image, 64x64 as the bundle."""
    src = sources.video(source, fps=fps, size=(64, 64), max_frames=max_frames)
    return {round(f.timestamp / speed, 9): f.image for f in src}


def _replay(bundle: Path, records: list[dict], images: dict) -> list[tuple[str, str]]:
    """(question, answer) of a fresh Session fed, in records order, the frames that ran (at
    the budget they ran at) and the questions."""
    from streamgraph.runtime.scheduler import Decision
    from streamgraph.runtime.session import Session

    s = Session.open(bundle)
    out = []
    for r in records:
        if r["kind"] == "frame" and r["decision"] == "run":
            image = images[round(r["capture"], 9)]
            rec = s.run_decided(image, r["capture"], Decision("run", r["deadline"], r["budget"] or None))
            assert rec.decision == "run" and rec.tokens_kept == r["tokens_kept"]
        elif r["kind"] == "question":
            assert not r["error"], r
            out.append((r["text"], "".join(s.ask(r["text"], max_new_tokens=MAX_NEW, at=r["asked_at"]))))
    return out


def _sse_ask(url: str, stream: str, question: str) -> dict:
    """POST /v1/streams/{id}/ask and read the SSE events; returns the pieces and the done record."""
    pieces, done, event = [], None, None
    with _client(url) as c, c.stream("POST", f"/v1/streams/{stream}/ask",
                                     json={"question": question, "max_new_tokens": MAX_NEW}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                if event == "token":
                    pieces.append(data["text"])
                elif event == "done":
                    done = data
                else:
                    pytest.fail(f"unexpected SSE event {event}: {data}")
    assert done is not None
    return {"question": question, "pieces": pieces, "done": done}


def _openai(url: str, key: str = TOKEN):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def _chat(url: str, stream: str, question: str, streaming: bool) -> dict:
    client = _openai(url)
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": question}]
    if streaming:
        chunks = list(client.chat.completions.create(model=stream, messages=msgs, max_tokens=MAX_NEW, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish and finish[-1] in ("stop", "length")
    else:
        resp = client.chat.completions.create(model=stream, messages=msgs, max_tokens=MAX_NEW)
        text = resp.choices[0].message.content
        assert resp.usage.completion_tokens >= 1 and resp.choices[0].finish_reason in ("stop", "length")
    return {"question": question, "answer": text}


def _metrics(url: str) -> dict:
    with _client(url) as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _samples(families: dict, family: str, sample: str, stream: str, **labels) -> float | None:
    for s in families[family].samples:
        if s.name == sample and s.labels.get("stream") == stream and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_two_streams_concurrent_questions_sse_and_openai_match_offline_replay(server, onnx_bundle):
    url, records_dir = server
    with _client(url) as c:
        for sid, source, fps, speed, max_frames in STREAMS:
            r = c.post("/v1/streams", json={"id": sid, "source": source, "fps": fps, "speed": speed,
                                            "max_frames": max_frames})
            assert r.status_code == 201, r.text
            assert r.json()["id"] == sid and r.json()["state"] in ("running", "ended")
        assert sorted(s["id"] for s in c.get("/v1/streams").json()["streams"]) == ["cam-a", "cam-b"]
        assert sorted(m.id for m in _openai(url).models.list().data) == ["cam-a", "cam-b"]
        # questions once both streams have frames in their cache, while they still stream
        _wait(lambda: all(c.get(f"/v1/streams/{sid}").json()["frames"]["run"] >= 2 for sid, *_ in STREAMS),
              "two frames run on each stream")

    jobs = [(_sse_ask, "cam-a", "what moves on the left?"), (_sse_ask, "cam-b", "which shape appeared first?"),
            (_chat, "cam-a", "how many cars?", True), (_chat, "cam-b", "where is the triangle now?", False),
            (_sse_ask, "cam-b", "what color was the square?"), (_chat, "cam-a", "is it day or night?", True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(lambda job: job[0](url, *job[1:]), job) for job in jobs]
        results = [f.result(timeout=2 * TIMEOUT) for f in futures]
    served: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for (fn, sid, q, *_), res in zip(jobs, results):
        if fn is _sse_ask:
            assert "".join(res["pieces"]) == res["done"]["answer"]        # streamed pieces = the record's answer
            assert res["done"]["stream"] == sid and res["done"]["text"] == q
            assert 1 <= res["done"]["new_tokens"] <= MAX_NEW and res["done"]["ttft_ms"] is not None
            served[sid][q] = res["done"]["answer"]
        else:
            served[sid][q] = res["answer"]

    # every stream plays to its end; then the records on disk are complete
    n_frames = {sid: len(_frames_by_capture(src, fps, speed, mf)) for sid, src, fps, speed, mf in STREAMS}
    with _client(url) as c:
        _wait(lambda: all(c.get(f"/v1/streams/{sid}").json()["state"] == "ended" and
                          c.get(f"/v1/streams/{sid}").json()["frames"]["sampled"] == n_frames[sid]
                          for sid in n_frames), "both sources to end")
    families = _metrics(url)
    for sid, source, fps, speed, max_frames in STREAMS:
        recs = read_records(records_dir / sid / RECORDS_FILE)
        frames = [r for r in recs if r["kind"] == "frame"]
        questions = [r for r in recs if r["kind"] == "question"]
        assert len(frames) == n_frames[sid] and sorted(q["text"] for q in questions) == sorted(served[sid])
        # /metrics against the records
        by_decision = collections.Counter(r["decision"] for r in frames)
        for decision in ("run", "drop", "error"):
            assert _samples(families, "streamgraph_frames", "streamgraph_frames_total", sid,
                            decision=decision) == by_decision[decision]
        ran = [r for r in frames if r["decision"] == "run"]
        assert _samples(families, "streamgraph_frame_latency_seconds", "streamgraph_frame_latency_seconds_count",
                        sid) == len(ran)
        assert _samples(families, "streamgraph_frame_latency_seconds", "streamgraph_frame_latency_seconds_sum",
                        sid) == pytest.approx(sum(r["end"] - r["capture"] for r in ran), rel=1e-6, abs=1e-9)
        misses = collections.Counter(r["overran"] for r in ran if r["deadline_met"] is False)
        for stage, n in misses.items():
            assert _samples(families, "streamgraph_deadline_misses", "streamgraph_deadline_misses_total", sid,
                            stage=stage) == n
        assert sum(s.value for s in families["streamgraph_deadline_misses"].samples
                   if s.labels.get("stream") == sid and s.name.endswith("_total")) == sum(misses.values())
        assert _samples(families, "streamgraph_stage_seconds", "streamgraph_stage_seconds_count", sid,
                        stage="encode") == len(ran)
        assert _samples(families, "streamgraph_ttft_seconds", "streamgraph_ttft_seconds_count", sid) == len(questions)
        assert _samples(families, "streamgraph_ttft_seconds", "streamgraph_ttft_seconds_sum", sid) == pytest.approx(
            sum(q["ttft_ms"] for q in questions) / 1000.0, rel=1e-6)
        assert _samples(families, "streamgraph_questions", "streamgraph_questions_total", sid,
                        status="ok") == len(questions)
        from streamgraph.compiler.bundle import Bundle

        assert _samples(families, "streamgraph_kv_bytes", "streamgraph_kv_bytes", sid) == Bundle.load(onnx_bundle).plan.kv.bytes
        # the answers served over HTTP are what a fresh session gives for the same stream
        replayed = _replay(onnx_bundle, recs, _frames_by_capture(source, fps, speed, max_frames))
        assert [(q, served[sid][q]) for q, _ in replayed] == replayed
    assert [s.value for s in families["streamgraph_streams"].samples] == [2]

    with _client(url) as c:
        for sid, *_ in STREAMS:
            assert c.delete(f"/v1/streams/{sid}").json() == {"id": sid, "deleted": True}
        assert c.get("/v1/streams").json() == {"streams": []}
    families = _metrics(url)
    assert not any(s.labels.get("stream") in ("cam-a", "cam-b") for f in families.values() for s in f.samples)


def _assert_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    msg = err["message"]
    assert msg and "\n" not in msg and "Traceback" not in msg and "internal error" not in msg
    return msg


def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_serving(server, tmp_path):
    url, _ = server
    with _client(url) as c:
        # unknown stream
        assert "nope" in _assert_error(c.post("/v1/streams/nope/ask", json={"question": "hi"}), 404)
        _assert_error(c.get("/v1/streams/nope"), 404)
        _assert_error(c.delete("/v1/streams/nope"), 404)
        _assert_error(c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                          "content": "hi"}]}), 404)
        _assert_error(c.get("/v1/no-such-path"), 404)
        # a stream to ask about
        r = c.post("/v1/streams", json={"id": "ok", "source": str(DEMO), "max_frames": 2, "speed": 4})
        assert r.status_code == 201, r.text
        # empty questions
        for q in ("", "   \n"):
            assert "question" in _assert_error(c.post("/v1/streams/ok/ask", json={"question": q}), 400)
            _assert_error(c.post("/v1/chat/completions", json={"model": "ok", "messages": [{"role": "user",
                                                                                            "content": q}]}), 400)
        _assert_error(c.post("/v1/streams/ok/ask", json={"question": "x", "max_new_tokens": 0}), 400)
        _assert_error(c.post("/v1/chat/completions", json={"model": "ok", "messages": []}), 400)
        _assert_error(c.post("/v1/chat/completions", json={"model": "ok", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
        # malformed bodies
        _assert_error(c.post("/v1/streams/ok/ask", content=b"{not json", headers={"content-type": "application/json"}),
                      400)
        _assert_error(c.post("/v1/streams/ok/ask", json={"question": "x", "unknown": 1}), 400)
        # oversize bodies: announced by Content-Length, and chunked (no length)
        big = {"question": "x" * (MAX_BODY + 1)}
        assert "limit" in _assert_error(c.post("/v1/streams/ok/ask", json=big), 413)
        payload = json.dumps(big).encode()
        chunks = (payload[i:i + 4096] for i in range(0, len(payload), 4096))
        _assert_error(c.post("/v1/streams/ok/ask", content=chunks, headers={"content-type": "application/json"}), 413)
        # bad streams
        _assert_error(c.post("/v1/streams", json={"source": str(tmp_path / "missing.mp4")}), 400)
        _assert_error(c.post("/v1/streams", json={"source": str(DEMO), "fps": -1}), 400)
        _assert_error(c.post("/v1/streams", json={"source": str(DEMO), "bundle": str(tmp_path)}), 400)
        _assert_error(c.post("/v1/streams", json={"id": "bad id!", "source": str(DEMO)}), 400)
        assert "exists" in _assert_error(c.post("/v1/streams", json={"id": "ok", "source": str(DEMO)}), 409)
    # wrong and missing token
    with httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = anon.post("/v1/streams/ok/ask", json={"question": "hi"}, headers=headers)
            _assert_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
        _assert_error(anon.get("/metrics"), 401)
        assert anon.get("/healthz").json()["status"] == "ok"              # probes need no token
    with pytest.raises(openai.AuthenticationError):
        _openai(url, key="wrong").chat.completions.create(model="ok", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        _openai(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        _openai(url).chat.completions.create(model="ok", messages=[{"role": "user", "content": " "}])
    # ... and the server still serves: a good question is answered
    resp = _openai(url).chat.completions.create(model="ok", messages=[{"role": "user", "content": "what is there?"}],
                                                max_tokens=3)
    assert resp.choices[0].message.content and 1 <= resp.usage.completion_tokens <= 3
    with _client(url) as c:
        r = c.post("/v1/streams/ok/ask", json={"question": "and now?", "max_new_tokens": 2, "stream": False})
        assert r.status_code == 200 and r.json()["answer"] and r.json()["new_tokens"] <= 2
        assert c.get("/v1/streams/ok").json()["questions"]["answered"] == 2
        assert c.delete("/v1/streams/ok").status_code == 200


def test_non_loopback_bind_needs_a_token(capsys):
    from streamgraph.cli import main
    from streamgraph.errors import StreamgraphError

    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "t")
    for host in ("0.0.0.0", "192.168.1.4", "::", "example.org"):
        with pytest.raises(StreamgraphError, match="needs an API token"):
            check_bind(host, None)
    with pytest.raises(StreamgraphError, match="empty"):
        check_bind("0.0.0.0", " ")
    env = os.environ.pop("STREAMGRAPH_API_TOKEN", None)
    try:
        assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 1
    finally:
        if env is not None:
            os.environ["STREAMGRAPH_API_TOKEN"] = env
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --host 0.0.0.0") and "token" in err[0]
    assert parse_stream_arg("cam1=/videos/a.mp4") == ("cam1", "/videos/a.mp4")
    assert parse_stream_arg("rtsp://h/x?a=b") == (None, "rtsp://h/x?a=b")
    assert parse_stream_arg("/videos/a.mp4") == (None, "/videos/a.mp4")


def test_cli_serve_subprocess_answers_and_stops_on_sigterm(onnx_bundle, tmp_path):
    """The real command: `streamgraph serve BUNDLE --video ID=FILE` in a process where torch
    cannot be imported (the server is torch-free), asked through the openai client, stopped
    with SIGTERM (exit 0, records closed)."""
    env = {**os.environ, "STREAMGRAPH_API_TOKEN": TOKEN}
    argv = ["serve", str(onnx_bundle), "--video", f"door={DEMO}", "--port", "0", "--speed", "4",
            "--records", str(tmp_path / "rec"), "--log-level", "warning"]
    cmd = [sys.executable, "-c", "import sys; sys.modules['torch'] = None; from streamgraph.cli import main; "
                                 f"sys.exit(main({argv!r}))"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = {}
        reader = threading.Thread(target=lambda: line.setdefault("v", proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(TIMEOUT)
        assert "v" in line and line["v"].startswith("serving on http://127.0.0.1:"), (line, proc.poll())
        url = line["v"].split()[2]
        resp = _openai(url).chat.completions.create(model="door", messages=[{"role": "user", "content": "what?"}],
                                                    max_tokens=2)
        assert resp.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    recs = read_records(tmp_path / "rec" / "door" / RECORDS_FILE)
    assert [r["text"] for r in recs if r["kind"] == "question"] == ["what?"]
