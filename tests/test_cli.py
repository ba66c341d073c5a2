"""The CLI end to end: a real video under deadlines, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

from streamgraph.cli import main
from tests.conftest import EXAMPLE, VTEST, graph_text, write_graph

needs_vtest = pytest.mark.skipif(not VTEST.exists(), reason="shared/data/vtest.avi not present")


def _brute_force_sampled(path: Path, fps: float) -> int:
    """Count frames a grid-aligned sampler must yield, from every decoded timestamp."""
    with av.open(str(path)) as c:
        times = [float(f.time) for f in c.decode(video=0)]
    t0, k, n = times[0], 0, 0
    for t in (t - t0 for t in times):
        if t >= k / fps - 1e-6:
            n += 1
            k = int(t * fps + 1e-6) + 1
    return n


@needs_vtest
def test_run_vtest_accounts_for_every_frame_and_answers(onnx_bundle, tmp_path, capsys):
    rc = main(["run", str(onnx_bundle), "--video", str(VTEST), "--ask", "What is the person doing?",
               "--at", "30", "--report", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "A:" in out and "Q @ 30.0s" in out
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    s, meta = rep["summary"], rep["meta"]
    expected = _brute_force_sampled(VTEST, 2.0)
    assert expected == 159
    assert s["sampled"] == len(rep["frames"]) == expected
    assert s["processed"] + s["dropped"] == s["sampled"]
    assert [f["index"] for f in rep["frames"]] == list(range(expected))
    q = rep["questions"][0]
    assert q["asked_at"] == pytest.approx(30.0) and q["new_tokens"] >= 1 and q["ttft_ms"] > 0
    plan_kv = json.loads((onnx_bundle / "manifest.json").read_text())["plan"]["kv"]["bytes"]
    assert meta["kv_bytes_planned"] == meta["kv_bytes_allocated"] == s["kv_bytes"] == plan_kv
    assert meta["kv_buffer_address_constant"] is True
    for f in rep["frames"]:
        if f["decision"] == "run":
            assert set(f["stage_ms"]) == {"preprocess", "encode", "reduce", "prefill"}
            assert f["deadline"] == pytest.approx(f["capture"] + 0.25)
            assert f["deadline_met"] == (f["end"] <= f["deadline"])
    for stage in ("end_to_end", "encode", "prefill"):
        assert s["latency_ms"][stage]["p50"] <= s["latency_ms"][stage]["p99"]


def test_run_graph_file_with_default_demo_clip(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = write_graph(tmp_path, name="cli-sample")
    assert main(["run", str(g), "--max-frames", "5", "--ask", "hi"]) == 0
    out = capsys.readouterr().out
    assert "compiled: build/cli-sample" in out and "streamqa_demo" in out and "sampled 5" in out
    # a preset model says in one line that its answers are not meaningful
    assert sum("random weights" in line for line in out.splitlines()) == 1
    # second run: the bundle is up to date (same lock key), no rebuild
    assert main(["run", str(g), "--max-frames", "2"]) == 0
    assert "up to date: build/cli-sample" in capsys.readouterr().out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("error: "), err
    return err


def test_malformed_yaml(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nname: x\nnodes: {encoder: {op: vision_encoder}\n")
    assert main(["validate", str(p)]) == 1
    err = _error_line(capsys)
    assert f"{p}:" in err and "yaml" in err.lower() or "expected" in err


def test_unknown_op(tmp_path, capsys):
    p = tmp_path / "g.yaml"
    p.write_text(graph_text().replace("op: topk_saliency", "op: topk_salience"))
    assert main(["compile", str(p)]) == 1
    err = _error_line(capsys)
    assert f"{p}:7:" in err and "nodes.pruner.op" in err and "unknown op 'topk_salience'" in err


def test_cycle(tmp_path, capsys):
    p = tmp_path / "g.yaml"
    p.write_text(graph_text().replace("{op: vision_encoder}", "{op: topk_saliency, input: pruner, tokens_per_frame: 4}"))
    assert main(["validate", str(p)]) == 1
    err = _error_line(capsys)
    assert "cycle" in err and "pruner" in err and f"{p}:" in err


def test_budget_too_small(tmp_path, capsys):
    p = write_graph(tmp_path, cache="{op: full, capacity_tokens: 200000}", budget=64)
    assert main(["compile", str(p), "-o", str(tmp_path / "b")]) == 1
    err = _error_line(capsys)
    assert "budget.memory_mb" in err and "MiB" in err and "kv_cache" in err and f"{p}:" in err
    assert not (tmp_path / "b").exists()


def test_missing_video(onnx_bundle, tmp_path, capsys):
    assert main(["run", str(onnx_bundle), "--video", str(tmp_path / "nope.mp4")]) == 1
    err = _error_line(capsys)
    assert "nope.mp4" in err and ("not found" in err or "does not exist" in err)


def test_unreadable_video(onnx_bundle, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_text("this is not a video\n")
    assert main(["run", str(onnx_bundle), "--video", str(bad)]) == 1
    err = _error_line(capsys)
    assert "bad.mp4" in err


def test_missing_graph_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in _error_line(capsys)


def test_full_cache_capacity_error_keeps_report(tmp_path, capsys):
    g = write_graph(tmp_path, name="small", cache="{op: full, capacity_tokens: 200}")
    from streamgraph.compiler.compile import compile_graph

    b = compile_graph(g, tmp_path / "small", target="onnx").bundle.path
    rc = main(["run", str(b), "--max-frames", "40", "--report", str(tmp_path / "rep")])
    assert rc == 1
    err = _error_line(capsys)
    assert "KV cache full" in err and "200 slots" in err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["summary"]["processed"] >= 1                 # what ran before the error is kept


def test_console_script_one_line_error(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(graph_text().replace("frame_deadline_ms: 250", "frame_deadline_ms: -5"))
    exe = Path(sys.executable).with_name("streamgraph")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "streamgraph.cli"]
    out = subprocess.run(cmd + ["validate", str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "slo.frame_deadline_ms" in out.stderr and "Traceback" not in out.stderr


def test_validate_and_inspect_example(onnx_bundle, capsys):
    assert main(["validate", str(EXAMPLE)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["inspect", str(onnx_bundle)]) == 0
    out = capsys.readouterr().out
    assert "decoder_step" in out and "kv_cache" in out


def test_run_realtime_delivers_frames_at_capture_times(onnx_bundle, tmp_path, capsys):
    import time

    t0 = time.perf_counter()
    assert main(["run", str(onnx_bundle), "--realtime", "--fps", "10", "--max-frames", "6",
                 "--report", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - t0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["meta"]["clock"] == "WallClock"
    starts = [f["start"] for f in rep["frames"] if f["decision"] == "run"]
    captures = [f["capture"] for f in rep["frames"] if f["decision"] == "run"]
    assert all(s >= c - 1e-3 for s, c in zip(starts, captures))   # nothing starts before it is captured
    assert elapsed >= 0.5                                           # 6 frames at 10 fps span 0.5 s
    assert (tmp_path / "latency.png").is_file()


def test_run_two_streams_share_one_executor(onnx_bundle, tmp_path, capsys):
    from streamgraph.runtime.sources import sample_clip

    clip = str(sample_clip())
    assert main(["run", str(onnx_bundle), "--video", clip, "--video", clip, "--max-frames", "4",
                 "--ask", "hi", "--at", "1", "--report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stream 0:" in out and "stream 1:" in out and "EDF across streams" in out
    reps = [json.loads((tmp_path / f"stream-{i}" / "report.json").read_text()) for i in (0, 1)]
    assert all(r["summary"]["sampled"] == 4 for r in reps)
    # one executor: the two streams' run intervals never overlap
    spans = sorted((f["start"], f["end"]) for r in reps for f in r["frames"] if f["decision"] == "run")
    assert all(a_end <= b_start + 1e-9 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert len(reps[0]["questions"]) == 1 and len(reps[1]["questions"]) == 0
