"""Measure ``streamgraph serve`` on this machine: N looped camera-rate streams, questions from
concurrent OpenAI clients, figures from the clients and from /metrics.

    .venv/bin/python bench/serve.py --streams 1 2 4 --rounds 5 [--bundle DIR] [--out out/bench-serve.json]

Each stream replays the bundled StreamQA demo episode at its capture rate (2 fps, looped)
through the StreamQA checkpoint (graphs/streamqa.yaml, compiled to build/ when no --bundle is
given). After a warm-up, each round asks one question per stream at once (one client thread
per stream, streaming chat completions) and measures client-side time to the first content
chunk and to the end; /metrics then gives the server-side TTFT (arrival -> first token),
frames run/dropped and deadline misses. Everything runs on loopback; the server stops at the
end of each configuration.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = ["Which shape appeared first?", "Where is the triangle now?", "What color was the triangle?",
             "How many shapes have appeared?"]


def _pct(values, q):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _metric_sums(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("stream", "le"))
            if s.name.endswith("_bucket") or s.name.endswith("_created"):
                continue
            out[key] = out.get(key, 0.0) + s.value
    return out


def run_config(bundle: str, n_streams: int, rounds: int, warmup_s: float, max_tokens: int) -> dict:
    import httpx
    import openai

    from streamgraph.runtime.sources import streamqa_demo
    from streamgraph.serve import ServerThread, create_app

    video = str(streamqa_demo() / "videos" / "e1000900020.mp4")
    token = "bench"
    app = create_app(token=token, default_bundle=bundle, max_streams=max(8, n_streams))
    with ServerThread(app, log_level="error") as srv:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=srv.url, headers=headers, timeout=120, trust_env=False) as c:
            t0 = time.perf_counter()
            for i in range(n_streams):
                r = c.post("/v1/streams", json={"id": f"cam{i}", "source": video, "loop": True})
                r.raise_for_status()
            add_s = time.perf_counter() - t0
            time.sleep(warmup_s)
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=token, max_retries=0, timeout=120)

            def ask(i: int, q: str) -> dict:
                t = time.perf_counter()
                first = None
                text = []
                for ch in client.chat.completions.create(model=f"cam{i}", messages=[{"role": "user", "content": q}],
                                                         max_tokens=max_tokens, stream=True):
                    if ch.choices and ch.choices[0].delta.content:
                        first = first or time.perf_counter()
                        text.append(ch.choices[0].delta.content)
                end = time.perf_counter()
                return {"ttft_ms": 1000 * ((first or end) - t), "total_ms": 1000 * (end - t), "answer": "".join(text)}

            results = []
            with ThreadPoolExecutor(n_streams) as pool:
                for r in range(rounds):
                    q = QUESTIONS[r % len(QUESTIONS)]
                    results += list(pool.map(lambda i: ask(i, q), range(n_streams)))
                    time.sleep(0.5)
            m = _metric_sums(c.get("/metrics").text)
            streams = c.get("/v1/streams").json()["streams"]
    ttft = [r["ttft_ms"] for r in results]
    total = [r["total_ms"] for r in results]
    run = m.get("streamgraph_frames_total,decision=run", 0)
    drop = m.get("streamgraph_frames_total,decision=drop", 0)
    misses = sum(v for k, v in m.items() if k.startswith("streamgraph_deadline_misses_total"))
    return {"streams": n_streams, "questions": len(results), "add_streams_s": round(add_s, 3),
            "client_ttft_ms": {"p50": _pct(ttft, 0.5), "p95": _pct(ttft, 0.95), "max": max(ttft)},
            "client_total_ms": {"p50": _pct(total, 0.5), "max": max(total)},
            "server_ttft_ms_mean": 1000 * m["streamgraph_ttft_seconds_sum"] / max(1, m["streamgraph_ttft_seconds_count"]),
            "ttft_misses": m.get("streamgraph_ttft_misses_total", 0),
            "frames_run": run, "frames_dropped": drop, "deadline_misses": misses,
            "frame_latency_ms_mean": 1000 * m["streamgraph_frame_latency_seconds_sum"]
            / max(1, m["streamgraph_frame_latency_seconds_count"]),
            "kv_bytes_total": m.get("streamgraph_kv_bytes", 0),
            "answers": sorted({r["answer"] for r in results}), "states": sorted({s["state"] for s in streams})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of streaming before the first question")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--bundle", help="compiled bundle (default: graphs/streamqa.yaml compiled to build/)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    bundle = args.bundle
    if bundle is None:
        from streamgraph.compiler.compile import compile_graph

        bundle = str(compile_graph(REPO / "graphs" / "streamqa.yaml", None).bundle.path)
    rows = []
    for n in args.streams:
        row = run_config(bundle, n, args.rounds, args.warmup, args.max_tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'streams':>7} {'questions':>9} {'client TTFT p50/p95/max ms':>28} {'server TTFT mean ms':>20} "
          f"{'frames run/drop':>16} {'misses':>6} {'frame e2e ms':>12}")
    for r in rows:
        t = r["client_ttft_ms"]
        print(f"{r['streams']:>7} {r['questions']:>9} {t['p50']:>10.1f}/{t['p95']:>7.1f}/{t['max']:>7.1f}   "
              f"{r['server_ttft_ms_mean']:>20.1f} {int(r['frames_run']):>8}/{int(r['frames_dropped']):<7} "
              f"{int(r['deadline_misses']):>6} {r['frame_latency_ms_mean']:>12.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
