"""StreamQA scene generator: determinism, answers against an independent recount of the scene
state, timing invariants, pixels that agree with the state, and the state's own invariants.

The oracles below deliberately re-derive every answer from ``episode.states`` alone (they do
not call ``seen_shapes``/``_find`` or anything else from scene.py except the constant tables).
"""
from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest

from streamgraph.streamqa.scene import (
    CELLS, COLOURS, FAMILIES, LONGRANGE_MIN_AGE_S, SHAPES, VOCABULARY, EpisodeParams, make_episode,
)

SEEDS = range(10**9, 10**9 + 300)
#: the vocabulary kind each family answers from
KIND = {"realtime": "color", "position": "position", "counting": "count", "backward": "shape",
        "longrange": "color"}
FIXED_TEXT = {"counting": "How many different shapes have appeared so far?",
              "backward": "Which shape appeared first?"}
TEXT_RE = {"realtime": re.compile(r"^What color is the (\w+) now\?$"),
           "position": re.compile(r"^Where is the (\w+) now\?$"),
           "longrange": re.compile(r"^What color was the (\w+) at the start\?$")}


@pytest.fixture(scope="module")
def episodes():
    return [make_episode(s) for s in SEEDS]


# ----------------------------------------------------------------------------- oracles
def _shape_of(q) -> str:
    m = TEXT_RE[q.family].match(q.question)
    assert m, f"unexpected {q.family} question text {q.question!r}"
    assert m.group(1) in SHAPES, q.question
    return m.group(1)


def _objects_with_shape(state, shape):
    return [o for o in state if o.shape == shape]


def _only(state, shape):
    objs = _objects_with_shape(state, shape)
    assert len(objs) == 1, f"{len(objs)} objects of shape {shape} in {state}"
    return objs[0]


def oracle_answer(states, q) -> str:
    """The answer of ``q`` recomputed from the scene states (frames 0..after_frame)."""
    k = q.after_frame
    if q.family == "realtime":
        return _only(states[k], _shape_of(q)).colour
    if q.family == "position":
        o = _only(states[k], _shape_of(q))
        return ("top-left", "top-right", "bottom-left", "bottom-right")[o.cell]
    if q.family == "counting":
        assert q.question == FIXED_TEXT["counting"]
        return str(len({o.shape for f in range(k + 1) for o in states[f]}))
    if q.family == "backward":
        assert q.question == FIXED_TEXT["backward"]
        assert len(states[0]) == 1
        return states[0][0].shape
    if q.family == "longrange":
        shape = _shape_of(q)
        assert len(states[0]) == 1 and states[0][0].shape == shape, (q.question, states[0])
        first = states[0][0]
        now = _objects_with_shape(states[k], shape)
        assert not any(o.colour == first.colour for o in now), \
            f"longrange question at frame {k} but the {shape} is still {first.colour}"
        return first.colour
    raise AssertionError(f"unknown family {q.family!r}")


def oracle_evidence_frame(states, q) -> int:
    """Frame index of the evidence a question needs."""
    k = q.after_frame
    if q.family in ("realtime", "position"):
        return k
    if q.family == "counting":
        last = {}
        for f in range(k + 1):
            for o in states[f]:
                last[o.shape] = f
        return min(last.values())
    return 0        # backward, longrange: frame 0


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_episode():
    for seed in (10**9, 10**9 + 7, 3):
        a, b = make_episode(seed), make_episode(seed)
        assert a.states == b.states
        assert a.questions == b.questions
        assert a.n_frames == b.n_frames
        fa, fb = a.frames(), b.frames()
        assert fa.dtype == np.uint8 and fa.shape == (a.n_frames, 48, 48, 3)
        assert np.array_equal(fa, fb)
        assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())


def test_different_seeds_differ():
    eps = [make_episode(s) for s in range(10**9, 10**9 + 20)]
    sigs = {json.dumps(e.to_dict()["states"]) + json.dumps(e.to_dict()["questions"]) for e in eps}
    assert len(sigs) == len(eps)
    a, b = eps[0], eps[1]
    n = min(a.n_frames, b.n_frames)
    assert not np.array_equal(a.frames()[:n], b.frames()[:n])


def test_write_suite_is_reproducible(tmp_path):
    from streamgraph.runtime.sources import video
    from streamgraph.streamqa.suite import write_suite

    seeds = range(10**9, 10**9 + 2)
    a = write_suite(tmp_path / "a" / "s", seeds)
    b = write_suite(tmp_path / "b" / "s", seeds)
    for rel in ("items.jsonl", "suite.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    eps_a = sorted(p.name for p in (a / "episodes").glob("*.json"))
    assert eps_a == sorted(p.name for p in (b / "episodes").glob("*.json"))
    assert eps_a == [f"e{s}.json" for s in seeds]
    for name in eps_a:
        assert (a / "episodes" / name).read_bytes() == (b / "episodes" / name).read_bytes(), name
    for s in seeds:
        ep = make_episode(s)
        fa = [f for f in video(a / "videos" / f"e{s}.mp4")]
        fb = np.stack([f.image for f in video(b / "videos" / f"e{s}.mp4")])
        ia = np.stack([f.image for f in fa])
        assert np.array_equal(ia, fb)
        # the video is the episode: one decoded frame per scene frame at k / fps, pixels
        # within colour-conversion rounding of the rendered frame
        assert len(fa) == ep.n_frames
        assert [f.timestamp for f in fa] == pytest.approx([k / ep.params.fps for k in range(ep.n_frames)])
        assert np.abs(ia.astype(int) - ep.frames().astype(int)).max() <= 2
        # the stored episode is the generated one
        d = json.loads((a / "episodes" / f"e{s}.json").read_text())
        assert d["seed"] == s
        assert [[(o["shape"], o["colour"], o["cell"]) for o in st] for st in d["states"]] == \
            [[(o.shape, o.colour, o.cell) for o in st] for st in ep.states]


def test_negative_seed_rejected():
    with pytest.raises(ValueError):
        make_episode(-1)


# ----------------------------------------------------------------------------- answers
def test_answers_match_independent_recount(episodes):
    seen = collections.Counter()
    for ep in episodes:
        assert len(ep.questions) == ep.params.questions    # >= 5 question slots in 6+ frames
        for q in ep.questions:
            where = f"seed {ep.seed} {q.family} {q.question!r} after frame {q.after_frame}"
            assert 0 <= q.after_frame < ep.n_frames, where
            assert q.answer == oracle_answer(ep.states, q), where
            assert q.answer in VOCABULARY[KIND[q.family]], where
            assert list(q.choices) == list(VOCABULARY[KIND[q.family]]), where
            fps = ep.params.fps
            assert q.evidence_time == pytest.approx(oracle_evidence_frame(ep.states, q) / fps), where
            if q.family == "longrange":
                assert q.ask_time - q.evidence_time >= LONGRANGE_MIN_AGE_S, where
            seen[q.family] += 1
    assert set(seen) == set(FAMILIES), seen
    # every answer kind's vocabulary is the closed set the docs name
    assert VOCABULARY["color"] == tuple(COLOURS) and VOCABULARY["position"] == CELLS
    assert VOCABULARY["count"] == ("1", "2", "3", "4") and VOCABULARY["shape"] == SHAPES


def test_answers_are_not_constant(episodes):
    """A generator that always answered the same thing per family would pass a lazy oracle."""
    answers = collections.defaultdict(set)
    for ep in episodes:
        for q in ep.questions:
            answers[q.family].add(q.answer)
    assert answers["realtime"] == set(COLOURS)
    assert answers["position"] == set(CELLS)
    assert answers["backward"] == set(SHAPES)
    assert len(answers["counting"]) >= 3 and len(answers["longrange"]) >= 3


def test_families_restricted():
    fam = ("counting", "backward")
    for s in range(10**9, 10**9 + 30):
        ep = make_episode(s, EpisodeParams(families=fam))
        assert ep.questions and {q.family for q in ep.questions} <= set(fam)
        for q in ep.questions:
            assert q.answer == oracle_answer(ep.states, q)


# ----------------------------------------------------------------------------- timing
def test_timing_invariants(episodes):
    for ep in episodes:
        fps, n = ep.params.fps, ep.n_frames
        assert ep.params.min_frames <= n <= ep.params.max_frames
        times = [q.ask_time for q in ep.questions]
        assert times == sorted(times), ep.seed
        frames = [q.after_frame for q in ep.questions]
        assert len(frames) == len(set(frames)), f"seed {ep.seed}: two questions after one frame"
        for q in ep.questions:
            k = q.after_frame
            assert k / fps < q.ask_time < (k + 1) / fps, (ep.seed, q)
            assert q.ask_time <= n / fps, (ep.seed, q)
            assert 0 <= q.evidence_time <= q.ask_time, (ep.seed, q)
            assert ep.timestamp(k) == pytest.approx(k / fps)


# ----------------------------------------------------------------------------- pixels
def test_pixels_agree_with_state(episodes):
    checked = 0
    for ep in episodes[:120]:
        size = ep.params.size
        half = size // 2
        for q in ep.questions:
            if q.family not in ("realtime", "position"):
                continue
            shape = _shape_of(q)
            o = _only(ep.states[q.after_frame], shape)
            if q.family == "realtime":
                colour, cell = q.answer, o.cell
            else:
                colour, cell = o.colour, CELLS.index(q.answer)
            r, c = cell // 2, cell % 2
            img = ep.frame(q.after_frame)
            quad = img[r * half:(r + 1) * half, c * half:(c + 1) * half].reshape(-1, 3)
            is_colour = np.all(quad == np.array(COLOURS[colour], np.uint8), axis=1)
            where = f"seed {ep.seed} frame {q.after_frame} {q.question!r}"
            assert is_colour.sum() >= 30, where
            # one object per cell: the rest of the quadrant is background noise only
            assert np.all(quad[~is_colour] <= ep.params.noise), where
            checked += 1
    assert checked >= 100


def test_empty_cells_are_background(episodes):
    for ep in episodes[:40]:
        half = ep.params.size // 2
        for k, state in enumerate(ep.states):
            img = ep.frame(k)
            occupied = {o.cell for o in state}
            for cell in range(4):
                r, c = cell // 2, cell % 2
                quad = img[r * half:(r + 1) * half, c * half:(c + 1) * half]
                if cell in occupied:
                    assert quad.max() > ep.params.noise, (ep.seed, k, cell)
                else:
                    assert quad.max() <= ep.params.noise, (ep.seed, k, cell)


# ----------------------------------------------------------------------------- params
@pytest.mark.parametrize("kw", [
    {"size": 44}, {"size": 8}, {"size": 0}, {"min_frames": 1}, {"min_frames": 8, "max_frames": 7},
    {"fps": 0.0}, {"fps": -2.0}, {"fps": float("nan")}, {"families": ("bogus",)},
    {"families": ("realtime", "nope")}, {"families": ()},
])
def test_episode_params_validation(kw):
    with pytest.raises(ValueError):
        EpisodeParams(**kw)


def test_episode_params_valid_edges():
    EpisodeParams(size=16, min_frames=2, max_frames=2, families=("counting",))
    ep = make_episode(10**9, EpisodeParams(size=16, min_frames=2, max_frames=2))
    assert ep.n_frames == 2 and ep.frame(0).shape == (16, 16, 3)
    assert len(ep.questions) == 1                      # one slot (frame 1) only


# ----------------------------------------------------------------------------- states
def _diff_count(prev, cur) -> int:
    """Number of events between two states; asserts each event is a legal one."""
    a = {o.shape: o for o in prev}
    b = {o.shape: o for o in cur}
    events = len(a.keys() ^ b.keys())
    for s in a.keys() & b.keys():
        x, y = a[s], b[s]
        if x == y:
            continue
        events += 1
        moved = x.cell != y.cell
        recoloured = x.colour != y.colour
        assert moved != recoloured, f"{x} -> {y} is neither a move nor a recolour"
        if recoloured:
            assert (x.dy, x.dx) == (y.dy, y.dx), f"{x} -> {y}: recolour moved it"
    return events


def test_state_invariants(episodes):
    kinds = collections.Counter()
    for ep in episodes:
        assert len(ep.states[0]) == 1, ep.seed
        jit = max(1, ep.params.size // 24)
        for k, state in enumerate(ep.states):
            shapes = [o.shape for o in state]
            cells = [o.cell for o in state]
            assert len(shapes) == len(set(shapes)), (ep.seed, k, state)
            assert len(cells) == len(set(cells)), (ep.seed, k, state)
            for o in state:
                assert o.shape in SHAPES and o.colour in COLOURS and 0 <= o.cell < 4
                assert abs(o.dy) <= jit and abs(o.dx) <= jit
            if k:
                prev = ep.states[k - 1]
                n = _diff_count(prev, state)
                assert n <= 1, f"seed {ep.seed} frame {k}: {n} events"
                if n == 0:
                    kinds["none"] += 1
                elif len(state) > len(prev):
                    kinds["appear"] += 1
                elif len(state) < len(prev):
                    kinds["disappear"] += 1
                else:
                    kinds["change"] += 1
            # at least one object always on screen (disappear needs two)
            assert len(state) >= 1
    assert set(kinds) == {"none", "appear", "disappear", "change"}, kinds
