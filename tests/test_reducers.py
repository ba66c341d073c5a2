"""Conformance of the token reducers against brute-force re-implementations of their reference
code (techniques.md §3.2 STC-Pruner, §4 TimeChat-Online DTD, §11.3 ToMe), written here
independently in numpy float64 with Python loops; the torch modules run in float64 too, so the
selections must agree exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamgraph.reducers import DifferentialTokenDrop, STCPruner, TokenMerging, build_reducer
from streamgraph.reducers.tome import merge_schedule

DT = torch.float64


def run_stream(module, frames: list[np.ndarray]):
    """Run a reducer over frames [N,C] (batch 1), threading its state; yields output dicts."""
    state = {}
    shapes = module.state_shapes(1, *frames[0].shape)
    for name in module.state:
        state[name] = torch.zeros(shapes[name][0], dtype=DT)
    names = ["tokens", "keep_mask", "source_index"] + [n for n, _ in module.extra_outputs]
    for f in frames:
        with torch.no_grad():
            out = module(torch.from_numpy(f)[None], *[state[s] for s in module.state])
        res = dict(zip(names, (o[0].numpy() for o in out[:len(names)])))
        for s, v in zip(module.state, out[len(names):]):
            state[s] = v
        yield res


def check_contract(res: dict, n: int):
    keep, idx = res["keep_mask"], res["source_index"]
    nv = int(keep.sum())
    assert keep[:nv].all() and not keep[nv:].any(), "valid tokens must be a prefix"
    assert np.all(np.diff(idx[:nv]) > 0), "kept source indices must be strictly increasing"
    assert idx.min() >= 0 and idx.max() < n
    return nv


def drifting_frames(rng, n_frames, n, c, change_frac=0.3, jitter=1e-3):
    """A stream where each frame changes a random subset of tokens by random amounts (and
    every token by a small ``jitter``, so no two similarities tie)."""
    f = rng.standard_normal((n, c))
    out = [f.copy()]
    for _ in range(n_frames - 1):
        f = f + jitter * rng.standard_normal((n, c))
        moved = rng.random(n) < change_frac
        scale = rng.uniform(0.05, 2.0, size=(n, 1))
        f[moved] += scale[moved] * rng.standard_normal((int(moved.sum()), c))
        out.append(f)
    return out


# --------------------------------------------------------------------------- DTD

def dtd_reference(frames, threshold, absolute=True):
    """TimeChat-Online ``token_drop`` (feature method) for one sample: kept token indices per
    frame. First frame kept whole; the reference for frame t is frame t-1's full map."""
    kept, prev = [], None
    for cur in frames:
        n = cur.shape[0]
        if prev is None:
            kept.append(list(range(n)))
        else:
            sims = []
            for p in range(n):  # F.cosine_similarity(prev, cur, dim=1), eps 1e-8 per norm
                a, b = prev[p], cur[p]
                sims.append(float(a @ b) / (max(math.sqrt(a @ a), 1e-8) * max(math.sqrt(b @ b), 1e-8)))
            sims = np.array(sims)
            if absolute:
                drop = {p for p in range(n) if sims[p] > threshold}
            else:
                k = int(n * threshold)
                drop = set(np.argsort(-sims, kind="stable")[:k].tolist())
            kept.append([p for p in range(n) if p not in drop])
            kept[-1] = (kept[-1], sims)
        prev = cur  # the full current frame, dropped tokens included
    return kept


@pytest.mark.parametrize("absolute,threshold,k", [(True, 0.9, 64), (True, 0.9, 12), (True, 0.0, 20),
                                                   (False, 0.5, 64), (False, 0.75, 10), (False, 0.25, 40)])
def test_dtd_matches_reference_capped_at_budget(absolute, threshold, k):
    rng = np.random.default_rng(0)
    n, c = 64, 16
    frames = drifting_frames(rng, 6, n, c)
    ref = dtd_reference(frames, threshold, absolute)
    mod = DifferentialTokenDrop(k, threshold, "absolute" if absolute else "relative")
    outs = list(run_stream(mod, frames))
    capped_some = False
    for t in range(1, len(frames)):
        kept, sims = ref[t]
        # static version: of the reference's kept tokens, the K least similar
        expect = sorted(sorted(kept, key=lambda p: sims[p])[:k])
        capped_some |= len(kept) > k
        nv = check_contract(outs[t], n)
        assert outs[t]["source_index"][:nv].tolist() == expect, t
        np.testing.assert_array_equal(outs[t]["tokens"][:nv], frames[t][expect])
    if k == n:  # an uncapped budget is exactly the reference
        for t in range(1, len(frames)):
            assert outs[t]["keep_mask"].sum() == len(ref[t][0])
    if k < 20 and threshold > 0.1:
        assert capped_some, "test data should exercise the budget cap"


def test_dtd_threshold_one_drops_nothing_even_for_identical_tokens():
    rng = np.random.default_rng(1)
    n, c = 48, 24
    f = rng.standard_normal((n, c)) * 1e3
    frames = [f, f.copy(), f * 0.5, drifting_frames(rng, 2, n, c)[1]]
    mod = DifferentialTokenDrop(n, 1.0, "absolute")
    mod32 = DifferentialTokenDrop(n, 1.0, "absolute")
    for res in list(run_stream(mod, frames))[1:]:
        assert res["keep_mask"].all() and res["source_index"].tolist() == list(range(n))
    # float32 too, where cosine of a token with itself can round above 1
    prev = torch.from_numpy(f.astype(np.float32))[None]
    tokens, keep, idx, _ = mod32(prev, prev.clone())
    assert keep.all()


def test_dtd_relative_keeps_fixed_count_and_compares_with_previous_full_frame():
    rng = np.random.default_rng(2)
    n, c = 40, 8
    frames = drifting_frames(rng, 5, n, c, change_frac=0.5)
    mod = DifferentialTokenDrop(n, 0.75, "relative")
    outs = list(run_stream(mod, frames))
    for res in outs[1:]:
        assert check_contract(res, n) == n - int(n * 0.75)
    # the state after each frame is that frame's full token map (not the kept tokens)
    state = torch.zeros(1, n, c, dtype=DT)
    for f in frames:
        *_, state = mod(torch.from_numpy(f)[None], state)
        np.testing.assert_array_equal(state[0].numpy(), f)


def test_dtd_rejects_out_of_range_threshold():
    with pytest.raises(ValueError, match="relative threshold"):
        DifferentialTokenDrop(8, -0.5, "relative")
    with pytest.raises(ValueError, match="absolute threshold"):
        DifferentialTokenDrop(8, 1.5, "absolute")


# --------------------------------------------------------------------------- STC-Pruner

class STCPrunerReference:
    """``STC_Pruner.compress`` (lern-to-write/STC model/prune.py) for one frame per call."""

    def __init__(self, k, strategy="gaussian", ratio=0.5, alpha=0.5):
        self.history = []
        self.k, self.strategy, self.ratio, self.alpha = k, strategy, ratio, alpha

    @staticmethod
    def _normalize(v):
        return v / max(np.sqrt(v @ v), 1e-12)

    @staticmethod
    def _g(x, a):
        d2 = float(((x - a) ** 2).sum())
        return sum(math.exp(-d2 / (2 * al)) for al in [2.0 ** e for e in range(-3, 2)])

    @staticmethod
    def _cos(a, b):
        return float(a @ b) / (max(math.sqrt(a @ a), 1e-8) * max(math.sqrt(b @ b), 1e-8))

    def compress(self, x):
        n, c = x.shape
        var = x.var(axis=0)  # unbiased=False
        d = max(1, int(c * self.ratio))
        ch = sorted(range(c), key=lambda j: var[j])[:d]  # topk(var, d, largest=False) order
        xs = x[:, ch]
        self.history.append(xs.mean(axis=0))
        memory = np.mean(np.stack(self.history), axis=0)  # may mix channel subsets (quirk)
        xn = np.stack([self._normalize(r) for r in xs])
        if self.strategy == "gaussian":
            frame = xn.mean(axis=0)
            mem = self._normalize(memory)
            score = [self._g(r, mem) + self._g(r, frame) for r in xn]
            order = sorted(range(n), key=lambda i: score[i])          # lowest first
        else:
            spatial, temporal = self._normalize(xs.mean(axis=0)), self._normalize(memory)
            score = [self.alpha * (1 - self._cos(r, temporal)) + (1 - self.alpha) * (1 - self._cos(r, spatial))
                     for r in xn]
            order = sorted(range(n), key=lambda i: -score[i])         # highest first
        return sorted(order[:self.k])


@pytest.mark.parametrize("strategy,k,ratio", [("gaussian", 16, 0.5), ("gaussian", 5, 0.25),
                                              ("dual_anchor", 16, 0.5), ("dual_anchor", 30, 1.0)])
def test_stc_pruner_matches_reference_over_a_stream(strategy, k, ratio):
    rng = np.random.default_rng(3)
    n, c = 49, 32
    # channels with different variances so the channel subset changes between frames
    frames = [f * rng.uniform(0.2, 3.0, size=(1, c)) for f in drifting_frames(rng, 6, n, c, 0.4)]
    ref = STCPrunerReference(k, strategy, ratio, alpha=0.3)
    mod = STCPruner(k, strategy, ratio, alpha=0.3)
    for t, res in enumerate(run_stream(mod, frames)):
        expect = ref.compress(frames[t])
        assert check_contract(res, n) == k
        assert res["source_index"].tolist() == expect, t
        np.testing.assert_array_equal(res["tokens"], frames[t][expect])   # unmodified rows


def test_stc_pruner_memory_state_is_running_mean_of_history():
    rng = np.random.default_rng(4)
    n, c = 16, 10
    mod = STCPruner(4, "gaussian", 0.5)
    d = mod.channels(c)
    s, cnt = torch.zeros(1, d, dtype=DT), torch.zeros(1, dtype=DT)
    means = []
    for _ in range(4):
        x = torch.from_numpy(rng.standard_normal((1, n, c)))
        *_, s, cnt = mod(x, s, cnt)
        var = x[0].var(0, unbiased=False)
        ch = torch.topk(var, d, largest=False).indices
        means.append(x[0][:, ch].mean(0))
    np.testing.assert_allclose((s / cnt[:, None])[0].numpy(), torch.stack(means).mean(0).numpy(), atol=1e-12)
    assert cnt.item() == 4


# --------------------------------------------------------------------------- ToMe

def tome_reference(x, k):
    """Repeated ToMe ``bipartite_soft_matching`` + ``merge_wavg`` rounds (no class token) on
    features ``x [N,C]`` until k tokens remain. Returns groups: list of (dst representative,
    member original indices), in the reference's output order."""
    groups = [(i, [i]) for i in range(x.shape[0])]

    def feat(g):
        return x[g[1]].mean(axis=0)

    while len(groups) > k:
        t = len(groups)
        r = min(t - k, t // 2)
        a, b = groups[0::2], groups[1::2]
        fa = [feat(g) / np.linalg.norm(feat(g)) for g in a]
        fb = [feat(g) / np.linalg.norm(feat(g)) for g in b]
        best = []
        for i, va in enumerate(fa):
            scores = [float(va @ vb) for vb in fb]
            j = int(np.argmax(scores))
            best.append((scores[j], i, j))
        order = sorted(best, key=lambda s: -s[0])         # descending best score
        merged, unmerged = order[:r], order[r:]
        b_members = [list(g[1]) for g in b]
        for _, i, j in merged:
            b_members[j] += a[i][1]
        groups = [a[i] for _, i, _ in unmerged] + [(b[j][0], b_members[j]) for j in range(len(b))]
    return groups


@pytest.mark.parametrize("n,k", [(64, 16), (64, 40), (49, 7), (50, 49), (32, 32)])
def test_tome_matches_reference_and_conserves_mass(n, k):
    rng = np.random.default_rng(5)
    c = 12
    # clustered tokens so merges are meaningful (and scores have no near-ties)
    centers = rng.standard_normal((6, c)) * 3
    x = centers[rng.integers(0, 6, n)] + rng.standard_normal((n, c))
    mod = TokenMerging(k)
    res = next(run_stream(mod, [x]))
    assert check_contract(res, n) == k                                      # merged count
    sizes = res["token_size"]
    assert sizes.sum() == n                                                  # sizes sum to N
    np.testing.assert_allclose((res["tokens"] * sizes[:, None]).sum(0), x.sum(0), rtol=1e-12, atol=1e-9)
    groups = {rep: members for rep, members in tome_reference(x, k)}
    assert sorted(groups) == res["source_index"].tolist()
    for row, rep in enumerate(res["source_index"]):
        members = groups[int(rep)]
        assert sizes[row] == len(members)
        np.testing.assert_allclose(res["tokens"][row], x[members].mean(0), rtol=1e-12, atol=1e-12)
    if k == n:
        np.testing.assert_array_equal(res["tokens"], x)


def test_tome_schedule_merges_at_most_half_per_round():
    assert merge_schedule(256, 16) == [128, 64, 32, 16]
    assert merge_schedule(256, 200) == [56]
    assert merge_schedule(7, 1) == [3, 2, 1]
    assert merge_schedule(5, 5) == []
    for n, k in [(256, 16), (196, 64), (7, 1), (100, 33)]:
        m = n
        for r in merge_schedule(n, k):
            assert 1 <= r <= m // 2
            m -= r
        assert m == k
    with pytest.raises(ValueError):
        merge_schedule(8, 9)


def test_build_reducer_buckets_and_errors():
    params = {"tokens_per_frame": [8, 4, 16], "threshold": 0.3, "mode": "absolute"}
    assert build_reducer("dtd", params).k == 16
    assert build_reducer("dtd", params, 4).k == 4
    assert build_reducer("none", {}) is None
    with pytest.raises(KeyError, match="not a reducer op"):
        build_reducer("pooling", {"tokens_per_frame": 4})
