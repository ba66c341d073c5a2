"""StreamQA suite directories: load_suite round trip, one-line located errors, a user's own
suite, answer normalisation, and the make-suite / eval CLI error paths (no compiling)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from streamgraph.cli import main
from streamgraph.streamqa.suite import SuiteError, load_suite, normalize_answer, write_suite, write_video

SEEDS = range(10**9, 10**9 + 2)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return write_suite(tmp_path_factory.mktemp("gen") / "s", SEEDS)


@pytest.fixture
def suite_copy(generated, tmp_path) -> Path:
    """A private, mutable copy of the generated suite."""
    return Path(shutil.copytree(generated, tmp_path / "s"))


def _rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines() if line.strip()]


def _write_rows(root: Path, rows) -> None:
    (root / "items.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _suite_error(path) -> str:
    with pytest.raises(SuiteError) as ei:
        load_suite(path)
    msg = str(ei.value)
    assert msg and "\n" not in msg, msg
    return msg


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("error: "), err
    return err


# ----------------------------------------------------------------------------- round trip
def test_load_round_trip(generated):
    from streamgraph.streamqa.scene import make_episode

    suite = load_suite(generated)
    eps = {f"videos/e{s}.mp4": make_episode(s) for s in SEEDS}
    assert suite.name == "s"
    assert len(suite.items) == sum(len(e.questions) for e in eps.values())
    assert suite.videos() == list(eps)
    assert set(suite.durations) == set(eps)
    for v, ep in eps.items():
        assert abs(suite.durations[v] - ep.n_frames / ep.params.fps) < 1e-6, v
    ids = [i.id for i in suite.items]
    assert len(ids) == len(set(ids))
    assert sorted(suite.lines.values()) == list(range(1, len(ids) + 1))
    groups = suite.by_video()
    assert set(groups) == set(eps)
    for v, items in groups.items():
        times = [i.ask_time for i in items]
        assert times == sorted(times)
        assert all(i.video == v for i in items)
        # the items are the episode's questions, answers included
        ep = eps[v]
        assert [(i.question, i.answer, i.family) for i in items] == \
            [(q.question, q.answer, q.family) for q in sorted(ep.questions, key=lambda q: q.ask_time)]
        for i in items:
            assert i.ask_time <= suite.durations[v]
            assert i.answer in i.choices
    assert suite.generator["seeds"] == [[SEEDS[0], SEEDS[-1]]]


def test_by_video_sorts_shuffled_items(suite_copy):
    rows = _rows(suite_copy)
    _write_rows(suite_copy, rows[::-1])
    suite = load_suite(suite_copy)
    assert [i.id for i in suite.items] == [r["id"] for r in rows[::-1]]        # file order kept
    for items in suite.by_video().values():
        assert [i.ask_time for i in items] == sorted(i.ask_time for i in items)
    assert suite.videos() == list(dict.fromkeys(r["video"] for r in rows[::-1]))


# ----------------------------------------------------------------------------- errors
def test_error_missing_dir(tmp_path):
    p = tmp_path / "nope"
    msg = _suite_error(p)
    assert str(p) in msg and "does not exist" in msg


def test_error_file_not_dir(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("x")
    msg = _suite_error(p)
    assert str(p) in msg and "not a directory" in msg


def test_error_missing_suite_json(suite_copy):
    (suite_copy / "suite.json").unlink()
    msg = _suite_error(suite_copy)
    assert "suite.json" in msg and "missing" in msg


def test_error_wrong_format(suite_copy):
    head = json.loads((suite_copy / "suite.json").read_text())
    head["format"] = "streamqa-suite/99"
    (suite_copy / "suite.json").write_text(json.dumps(head, indent=2))
    msg = _suite_error(suite_copy)
    assert "suite.json" in msg and "format" in msg and "streamqa-suite/99" in msg


def test_error_malformed_suite_json(suite_copy):
    (suite_copy / "suite.json").write_text('{"format": "streamqa-suite/1",\n "name": }\n')
    msg = _suite_error(suite_copy)
    assert "suite.json" in msg


def test_error_unknown_header_field(suite_copy):
    head = json.loads((suite_copy / "suite.json").read_text())
    head["colour"] = 1
    (suite_copy / "suite.json").write_text(json.dumps(head))
    msg = _suite_error(suite_copy)
    assert "suite.json" in msg and "colour" in msg


def test_error_empty_items(suite_copy):
    (suite_copy / "items.jsonl").write_text("\n\n")
    msg = _suite_error(suite_copy)
    assert "items.jsonl" in msg and "empty" in msg


def test_error_missing_items_file(suite_copy):
    (suite_copy / "items.jsonl").unlink()
    msg = _suite_error(suite_copy)
    assert "items.jsonl" in msg and "missing" in msg


def test_error_missing_video_names_line(suite_copy):
    rows = _rows(suite_copy)
    rows[1]["video"] = "videos/gone.mp4"
    _write_rows(suite_copy, rows)
    msg = _suite_error(suite_copy)
    assert f"{suite_copy / 'items.jsonl'}:2:" in msg and "videos/gone.mp4" in msg


def test_error_undecodable_video(suite_copy):
    rows = _rows(suite_copy)
    (suite_copy / "videos" / "junk.mp4").write_bytes(b"not a video at all" * 20)
    rows[2]["video"] = "videos/junk.mp4"
    _write_rows(suite_copy, rows)
    msg = _suite_error(suite_copy)
    assert "items.jsonl:3:" in msg and "junk.mp4" in msg


def test_error_ask_time_past_end(suite_copy):
    rows = _rows(suite_copy)
    n_frames = len(json.loads((suite_copy / "episodes" / f"e{SEEDS[0]}.json").read_text())["states"])
    end = n_frames / 2.0
    row = next(i for i, r in enumerate(rows) if r["video"] == f"videos/e{SEEDS[0]}.mp4")
    rows[row]["ask_time"] = end + 0.25
    _write_rows(suite_copy, rows)
    msg = _suite_error(suite_copy)
    assert f"items.jsonl:{row + 1}:" in msg and "ask_time" in msg and "past the end" in msg
    # exactly at the end is allowed (the last frame is shown until then)
    rows[row]["ask_time"] = end
    _write_rows(suite_copy, rows)
    load_suite(suite_copy)


def test_error_unknown_field(suite_copy):
    rows = _rows(suite_copy)
    rows[0]["colour"] = "red"
    _write_rows(suite_copy, rows)
    msg = _suite_error(suite_copy)
    assert "items.jsonl:1:" in msg and "unknown field" in msg and "colour" in msg


def test_error_malformed_json_line(suite_copy):
    lines = (suite_copy / "items.jsonl").read_text().splitlines()
    lines[3] = lines[3][:-5]
    (suite_copy / "items.jsonl").write_text("\n".join(lines) + "\n")
    msg = _suite_error(suite_copy)
    assert "items.jsonl:4:" in msg and "JSON" in msg


def test_error_item_not_object(suite_copy):
    rows = _rows(suite_copy)
    _write_rows(suite_copy, [rows[0], "[1, 2, 3]"])
    msg = _suite_error(suite_copy)
    assert "items.jsonl:2:" in msg


def test_error_duplicate_id(suite_copy):
    rows = _rows(suite_copy)
    rows[2]["id"] = rows[0]["id"]
    _write_rows(suite_copy, rows)
    msg = _suite_error(suite_copy)
    assert "items.jsonl:3:" in msg and rows[0]["id"] in msg and "line 1" in msg


def test_error_missing_required_field(suite_copy):
    rows = _rows(suite_copy)
    del rows[1]["answer"]
    _write_rows(suite_copy, rows)
    msg = _suite_error(suite_copy)
    assert "items.jsonl:2:" in msg and "answer" in msg


@pytest.mark.parametrize("value", ["-0.5", "NaN", "Infinity", "-Infinity", "1e400"])
def test_error_bad_ask_time(suite_copy, value):
    lines = (suite_copy / "items.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["ask_time"] = 123456.0
    lines[1] = json.dumps(row).replace("123456.0", value)
    assert value in lines[1]
    (suite_copy / "items.jsonl").write_text("\n".join(lines) + "\n")
    msg = _suite_error(suite_copy)
    assert "items.jsonl:2:" in msg and "ask_time" in msg


@pytest.mark.parametrize("value", ["-1.0", "NaN", "Infinity"])
def test_error_bad_evidence_time(suite_copy, value):
    lines = (suite_copy / "items.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["evidence_time"] = 654321.0
    lines[0] = json.dumps(row).replace("654321.0", value)
    (suite_copy / "items.jsonl").write_text("\n".join(lines) + "\n")
    msg = _suite_error(suite_copy)
    assert "items.jsonl:1:" in msg and "evidence_time" in msg


# ----------------------------------------------------------------------------- user suite
def test_user_suite_without_optional_fields(tmp_path):
    root = tmp_path / "mine"
    (root / "clips").mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    write_video(root / "clips" / "a.mp4", frames, 4.0)
    (root / "suite.json").write_text(json.dumps({"format": "streamqa-suite/1", "name": "mine"}))
    rows = [{"video": "clips/a.mp4", "question": "What is it?", "ask_time": 1.2, "answer": "Noise."},
            {"video": "clips/a.mp4", "question": "And now?", "ask_time": 0.5, "answer": "noise"}]
    (root / "items.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    suite = load_suite(root)
    assert suite.name == "mine" and suite.generator is None
    assert [i.id for i in suite.items] == ["line-1", "line-3"]
    assert suite.lines == {"line-1": 1, "line-3": 3}
    assert all(i.family is None and i.evidence_time is None and i.choices is None for i in suite.items)
    assert abs(suite.durations["clips/a.mp4"] - 5 / 4.0) < 1e-6
    assert [i.id for i in suite.by_video()["clips/a.mp4"]] == ["line-3", "line-1"]
    # the user's video decodes back to (nearly) the frames written
    from streamgraph.runtime.sources import video

    back = np.stack([f.image for f in video(root / "clips" / "a.mp4")])
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 3
    # ask_time past 1.25 s is rejected for this video too
    rows[0]["ask_time"] = 1.5
    (root / "items.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert "past the end" in _suite_error(root)


def test_user_id_collides_with_default(tmp_path, generated):
    """An explicit id equal to a default ``line-N`` id is a duplicate, not silently merged."""
    root = Path(shutil.copytree(generated, tmp_path / "s"))
    rows = _rows(root)
    del rows[0]["id"]
    rows[1]["id"] = "line-1"
    _write_rows(root, rows)
    msg = _suite_error(root)
    assert "items.jsonl:2:" in msg and "line-1" in msg


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize("raw, norm", [
    (" Red.", "red"), ("TOP-LEFT", "top-left"), ("top-left", "top-left"), ("  3 ", "3"),
    ("Bottom  Right.\n", "bottom right"), ("circle", "circle"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


# ----------------------------------------------------------------------------- CLI
def test_cli_make_suite(tmp_path, capsys):
    from streamgraph.streamqa.scene import make_episode

    d = tmp_path / "cli-suite"
    assert main(["make-suite", str(d), "--first-seed", "1000000000", "--episodes", "2"]) == 0
    assert capsys.readouterr().err.strip() == ""
    suite = load_suite(d)
    assert suite.name == "cli-suite"
    assert len(suite.videos()) == 2
    assert len(suite.items) == sum(len(make_episode(s).questions) for s in SEEDS)


@pytest.mark.parametrize("extra, words", [
    (["--episodes", "0"], "--episodes"),
    (["--episodes", "1", "--first-seed", "-5"], "--first-seed"),
    (["--episodes", "1", "--min-frames", "9", "--max-frames", "4"], "min_frames"),
])
def test_cli_make_suite_bad_args(tmp_path, capsys, extra, words):
    d = tmp_path / "bad"
    assert main(["make-suite", str(d)] + extra) == 1
    err = _error_line(capsys)
    assert words in err
    assert not (d / "items.jsonl").exists()


def test_cli_eval_missing_graph(generated, capsys):
    assert main(["eval", "graphs/nonexistent.yaml", "--suite", str(generated)]) == 1
    err = _error_line(capsys)
    assert "graphs/nonexistent.yaml" in err and "does not exist" in err


def test_cli_eval_nothing_to_evaluate(tmp_path, capsys):
    assert main(["eval", "--suite", str(tmp_path / "nope")]) == 1
    err = _error_line(capsys)
    assert "nothing to evaluate" in err
