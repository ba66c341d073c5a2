"""``streamgraph eval``: answer a suite through the real runtime and score it (torch-free at
run time; variants are compiled with the normal compile path).

Each video of the suite is one stream: a fresh :class:`~streamgraph.runtime.session.Session`
over the graph's compiled engines (one backend shared by all streams of a graph), frames
sampled at the graph's ``stream.fps`` and fed by :class:`~streamgraph.runtime.stream.StreamRunner`
under the graph's overload policy, and the items of that video asked at their ``ask_time``
(questions are served ahead of later frames, so an answer sees exactly the frames captured
before it). An answer is correct when it equals the item's answer after
:func:`~streamgraph.streamqa.suite.normalize_answer`.

The scheduler's cost model is calibrated once per bundle (``Session.calibrate`` on a scratch
session, medians of 5) and each stream starts from a copy of it.

Per graph: accuracy overall, per question family and per evidence-age bucket; visual tokens
per processed frame; KV bytes (the plan's, i.e. the buffer); per-frame latency p50/p99 (ms,
capture to end, queueing included, stream time); TTFT p50/p99; frames sampled, processed,
dropped and degraded (run below the largest budget).

**Overload mode** (``load = X``): the variant's capacity is measured first (``Session.calibrate``
of every stage at the largest budget, median of 5: ``capacity_fps = 1 / frame cost``), then the
suite is replayed ``speed = X * capacity_fps / stream.fps`` times faster than captured, with
question times, frame deadlines and TTFT deadlines divided by the same ``speed`` — the same
stream, offered at X times what the executor can do, with the SLO unchanged in frame periods.

**Sweeps** expand one graph into variants (:func:`expand_sweep`): a sweep file lists groups of
axes (``reducer``, ``budget``, ``cache``, ``overload``, ``deadline`` in ms, ``load``); each
group is a cross product. In overload mode the deadline keeps its meaning in frame periods, so
it must exceed one frame's cost at that load (e.g. 4 frame periods at 2x) or every frame is
late before it starts. A variant that fails to compile is reported and the sweep goes on; Ctrl-C keeps every
result measured so far (``results.json`` is rewritten after each variant).
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from streamgraph.errors import StreamgraphError
from streamgraph.streamqa.suite import Suite, normalize_answer

#: Evidence-age buckets (seconds): [lo, hi).
AGE_BUCKETS = ((0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.5), (4.5, math.inf))
REDUCER_DEFAULTS: dict[str, dict] = {"dtd": {"positions": "compact"}}
_AXES = ("reducer", "budget", "cache", "overload", "deadline", "load")


class SweepError(StreamgraphError):
    """A sweep file or sweep option is malformed; one line naming the file and field."""


#: Records kept per evaluated video: every frame and question of a StreamQA video (the
#: frame-latency and TTFT figures are computed over all of them, not the runtime's default
#: rolling window of the most recent records).
EVAL_HISTORY = 1 << 20

def _bucket_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}s" if math.isfinite(hi) else f">={lo:g}s"


def age_bucket(age: float) -> str:
    """Label of the :data:`AGE_BUCKETS` bucket holding ``age`` seconds."""
    for lo, hi in AGE_BUCKETS:
        if lo <= age < hi:
            return _bucket_label(lo, hi)
    return "<0s"


# ----------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One graph of a sweep: ``name``, the graph document, and ``load`` (None = real time)."""

    name: str
    doc: dict
    load: float | None = None
    axes: dict = field(default_factory=dict)


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SweepError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise SweepError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: must hold a mapping")
    return data


def base_document(graph: str | Path) -> dict:
    """The graph file as a dict, with a relative ``model.hf`` made absolute (variants are
    written elsewhere). Raises SweepError for a missing or unreadable file."""
    path = Path(graph)
    if not path.is_file():
        raise SweepError(f"{path}: graph file does not exist")
    doc = _load_yaml(path)
    hf = (doc.get("model") or {}).get("hf")
    if isinstance(hf, str) and not Path(hf).expanduser().is_absolute():
        doc["model"]["hf"] = str((path.parent / hf).resolve())
    return doc


def _nodes_by_kind(doc: dict) -> tuple[str | None, str | None, str | None, str | None]:
    """(encoder node, reducer node, cache node, decoder node) names of a graph document."""
    from streamgraph.compiler.spec import OPS  # the full registry: spec imports the plugin packages

    enc = red = cache = dec = None
    for name, node in (doc.get("nodes") or {}).items():
        info = OPS.get((node or {}).get("op"))
        if info is None:
            continue
        if info.kind == "cache":
            cache = name
        elif info.kind == "decoder":
            dec = name
        elif info.kind == "encoder":
            enc = name
        elif info.kind == "reducer":
            red = name
    return enc, red, cache, dec


def make_variant(base: dict, *, reducer: str | None = None, budget=None, cache: str | None = None,
                 cache_params: dict | None = None, overload: str | None = None, load: float | None = None,
                 reducer_params: dict | None = None, deadline: float | None = None) -> Variant:
    """A copy of graph document ``base`` with its reducer (``"none"`` removes it), token
    budget (an int or a list of buckets), cache policy, overload policy and frame deadline
    (``slo.frame_deadline_ms``) replaced.
    Raises SweepError when the base graph has no decoder/cache/encoder node to change."""
    doc = copy.deepcopy(base)
    nodes = doc.setdefault("nodes", {})
    enc, red, cache_node, dec = _nodes_by_kind(doc)
    if dec is None or enc is None or cache_node is None:
        raise SweepError("the base graph needs a vision_encoder, a cache policy and a decoder node")
    axes: dict = {}
    if reducer is not None:
        axes["reducer"] = reducer
        if red is not None and red in nodes:
            old = nodes.pop(red)
            prev_budget = old.get("tokens_per_frame")
        else:
            prev_budget = None
        src = enc
        if reducer != "none":
            node = {"op": reducer, "input": enc, **REDUCER_DEFAULTS.get(reducer, {}), **(reducer_params or {})}
            if reducer != "pool":
                node["tokens_per_frame"] = budget if budget is not None else prev_budget
                if node["tokens_per_frame"] is None:
                    raise SweepError(f"reducer {reducer}: no budget given and the base graph has none")
            nodes["reducer"] = node
            src = "reducer"
        inputs = nodes[dec].get("input") or []
        nodes[dec]["input"] = [src if x in (enc, red) else x for x in inputs]
    elif budget is not None:
        if red is None:
            raise SweepError("a budget needs a reducer: the base graph has none")
        nodes[red]["tokens_per_frame"] = budget
    if budget is not None:
        axes["budget"] = budget
    if cache is not None:
        axes["cache"] = cache
        nodes[cache_node] = {"op": cache, **(cache_params or {})}
    if overload is not None:
        axes["overload"] = overload
        doc.setdefault("slo", {})["overload"] = overload
    if deadline is not None:
        axes["deadline"] = deadline
        doc.setdefault("slo", {})["frame_deadline_ms"] = deadline
    if load is not None:
        axes["load"] = load
    parts = []
    for k in _AXES:
        if k in axes:
            v = axes[k]
            v = "-".join(str(x) for x in v) if isinstance(v, list) else v
            parts.append(f"{v}x" if k == "load" else f"{v:g}ms" if k == "deadline" else str(v))
    name = "_".join(parts) or "base"
    doc["name"] = f"{base.get('name', 'graph')}--{name}"[:120]
    return Variant(name, doc, load, axes)




def expand_sweep(path: str | Path) -> tuple[dict, list[Variant], dict]:
    """Read a sweep file::

        graph: ../graphs/streamqa.yaml         # base graph (relative to this file)
        suite: ../out/streamqa-eval            # optional default suite
        cache_params: {sink_window: {sink_tokens: 4, window_tokens: 96}, ...}
        groups:                                # each group: the cross product of its axes
          - {reducer: [none], cache: [full, sink_window]}
          - {reducer: [topk_saliency, dtd], budget: [4, 8, 12]}
          - {reducer: [topk_saliency], budget: [[4, 8, 16]], overload: [drop_late, degrade], load: [2.0]}

    Returns (the sweep mapping, the variants, the base document). Raises SweepError (file and
    field) for an unknown axis, an empty group or a missing graph."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file does not exist")
    sweep = _load_yaml(path)
    unknown = set(sweep) - {"graph", "suite", "cache_params", "reducer_params", "groups", "name"}
    if unknown:
        raise SweepError(f"{path}: {sorted(unknown)[0]}: unknown field (known: graph, suite, cache_params, "
                         f"reducer_params, groups, name)")
    if "graph" not in sweep:
        raise SweepError(f"{path}: graph: missing (the base graph file)")
    base = base_document(path.parent / sweep["graph"])
    groups = sweep.get("groups")
    if not isinstance(groups, list) or not groups:
        raise SweepError(f"{path}: groups: need a non-empty list of axis groups")
    variants = []
    for gi, group in enumerate(groups):
        if not isinstance(group, dict) or not group:
            raise SweepError(f"{path}: groups[{gi}]: need a mapping of axis -> list of values")
        for k, v in group.items():
            if k not in _AXES:
                raise SweepError(f"{path}: groups[{gi}].{k}: unknown axis (known: {', '.join(_AXES)})")
            if not isinstance(v, list) or not v:
                raise SweepError(f"{path}: groups[{gi}].{k}: need a non-empty list")
        variants += expand_axes(base, group, sweep.get("cache_params") or {}, sweep.get("reducer_params") or {})
    return sweep, _dedupe(variants), base


def expand_axes(base: dict, axes: dict, cache_params: dict | None = None,
                reducer_params: dict | None = None) -> list[Variant]:
    """The cross product of ``axes`` (axis -> list of values) over graph document ``base``."""
    keys = [k for k in _AXES if k in axes]
    out = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        kw = dict(zip(keys, combo))
        cache = kw.get("cache")
        red = kw.get("reducer")
        out.append(make_variant(base, reducer=red, budget=kw.get("budget"), cache=cache,
                                cache_params=(cache_params or {}).get(cache) if cache else None,
                                overload=kw.get("overload"), load=kw.get("load"), deadline=kw.get("deadline"),
                                reducer_params=(reducer_params or {}).get(red) if red else None))
    return out


def _dedupe(variants: list[Variant]) -> list[Variant]:
    seen, out = set(), []
    for v in variants:
        if v.name not in seen:
            seen.add(v.name)
            out.append(v)
    return out


def write_variant(v: Variant, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / f"{v.name}.yaml"
    p.write_text(yaml.safe_dump(v.doc, sort_keys=False))
    return p


# ----------------------------------------------------------------------------- one graph
def _pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def calibrate_bundle(bundle, backend, repeats: int = 5):
    """``(cost model, budgets)`` of ``bundle`` on ``backend``: the scheduler's per-stage,
    per-budget costs in seconds from ``Session.calibrate`` on a scratch session (medians of
    ``repeats`` probes), and the ascending token-budget buckets. Measured once per bundle;
    every stream of an evaluation starts from a copy of the costs."""
    from streamgraph.runtime.session import Session

    s = Session(bundle, backend)
    s.calibrate(repeats=repeats)
    return s.scheduler.costs, s.budgets


def capacity_of(costs, budgets) -> float:
    """Frames per second the executor sustains at the largest of ``budgets``."""
    cost = costs.predict_frame(budgets[-1])
    return 1.0 / max(cost or 1e-6, 1e-6)


def evaluate_bundle(bundle_dir: str | Path, suite: Suite, *, load: float | None = None,
                    backend: str = "onnxruntime", progress: Callable[[int, int], None] | None = None,
                    items_out: list | None = None, capacity_fps: float | None = None) -> dict:
    """Run every episode of ``suite`` through the bundle at ``bundle_dir`` and score it.

    Returns the result dict (see the module docstring). ``items_out`` (a list) receives one
    dict per answered item as it happens, so an interrupted run keeps what it answered.
    ``capacity_fps`` (overload mode) skips the capacity measurement, so variants that differ
    only in their overload policy are offered exactly the same load.
    Raises BundleError/BackendUnavailableError for a bundle that cannot run, SourceError
    for a video that cannot be decoded."""
    from streamgraph.backends import open_backend
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.runtime import sources
    from streamgraph.runtime.stream import SimulatedClock
    from streamgraph.runtime.stream import Question, StreamRunner
    from streamgraph.runtime.session import Session

    bundle = Bundle.load(bundle_dir)
    be = open_backend(backend, bundle)
    fps = float(bundle.manifest["stream"]["fps"])
    costs, budgets = calibrate_bundle(bundle, be)
    speed, capacity = 1.0, None
    if load is not None:
        capacity = capacity_fps or capacity_of(costs, budgets)
        speed = load * capacity / fps
    items = items_out if items_out is not None else []
    frames_all, ttfts = [], []
    groups = suite.by_video()
    t0 = time.perf_counter()
    for vi, (video, its) in enumerate(groups.items()):
        session = Session(bundle, be, clock=SimulatedClock(), history=EVAL_HISTORY)
        if speed != 1.0:
            session.scheduler.frame_deadline /= speed
            session.scheduler.ttft /= speed
        session.scheduler.costs = copy.deepcopy(costs)
        size = tuple(session.plan.image_size) if session.plan.resample == "ffmpeg_bilinear" else None
        src = sources.video(suite.path / video, fps=fps, size=size)
        qs = [Question(at=it.ask_time / speed, text=it.question) for it in its]
        runner = StreamRunner([(session, src)], questions=qs, speed=speed)
        runner.run()
        recs = {(r.asked_at, r.text): r for r in session.questions}
        for it, q in zip(its, qs):
            rec = recs.get((q.at, q.text))
            ttft = rec.ttft_ms * speed if rec and rec.ttft_ms is not None else None
            if ttft is not None:
                ttfts.append(ttft)
            age = (it.ask_time - it.evidence_time) if it.evidence_time is not None else None
            items.append({"id": it.id, "video": video, "family": it.family, "question": it.question,
                          "answer": q.answer, "truth": it.answer,
                          "correct": normalize_answer(q.answer) == normalize_answer(it.answer),
                          "evidence_age_s": age, "ttft_ms": ttft})
        if session.stats.sampled > len(session.frames):
            raise ValueError(f"{video}: more than {EVAL_HISTORY} frames in one video: "
                             "latency figures would cover only the last ones")
        frames_all += session.frames
        if progress:
            progress(vi + 1, len(groups))
    res = summarize_items(items, frames_all, ttfts, bundle, budgets, speed, capacity, load,
                          time.perf_counter() - t0)
    res["intra_op_threads"] = getattr(be, "threads", None)
    return res


def summarize_items(items, frames, ttfts, bundle, budgets, speed, capacity, load, seconds) -> dict:
    def acc(rows):
        return {"accuracy": float(np.mean([r["correct"] for r in rows])) if rows else None, "n": len(rows)}

    fams: dict[str, list] = {}
    ages: dict[str, list] = {}
    for r in items:
        fams.setdefault(r["family"] or "-", []).append(r)
        if r["evidence_age_s"] is not None:
            ages.setdefault(age_bucket(r["evidence_age_s"]), []).append(r)
    order = [_bucket_label(lo, hi) for lo, hi in AGE_BUCKETS]
    run = [f for f in frames if f.decision == "run"]
    top = max(budgets) if budgets and budgets[0] is not None else None
    lat = [f.latency_ms * speed for f in run if f.latency_ms is not None]
    plan = bundle.plan
    return {
        **acc(items), "correct": int(sum(r["correct"] for r in items)),
        "families": {k: acc(v) for k, v in sorted(fams.items())},
        "evidence_age": {k: acc(ages[k]) for k in order if k in ages},
        "tokens_per_frame": float(np.mean([f.tokens_kept for f in run])) if run else None,
        "encoder_tokens": plan.encoder_tokens, "budgets": budgets,
        "kv_bytes": plan.kv.bytes, "kv_slots": plan.cache["capacity"], "cache": plan.cache["op"],
        "frame_latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99)},
        "ttft_ms": {"p50": _pct(ttfts, 50), "p99": _pct(ttfts, 99)},
        "frames": {"sampled": len(frames), "processed": len(run),
                   "dropped": sum(f.decision == "drop" for f in frames),
                   "degraded": sum(1 for f in run if top is not None and f.budget and f.budget < top)},
        "load": load, "speed": speed, "capacity_fps": capacity, "seconds": round(seconds, 2),
        "note": "latencies in stream ms at capture speed (divided back by the replay speed)" if speed != 1 else "",
    }


# ----------------------------------------------------------------------------- sweeps
def _save_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def run_variants(variants: list[Variant], suite: Suite, out: str | Path, *, build_root: str | Path = "build",
                 backend: str = "onnxruntime", on_event: Callable[[str, dict], None] | None = None) -> list[dict]:
    """Compile and evaluate every variant; write ``OUT/results.json`` (all results so far, after
    each variant), ``OUT/variants/*.yaml`` and ``OUT/items/<variant>.jsonl``. A variant that
    fails to compile or run is recorded with its one-line ``error`` and the sweep goes on. On
    KeyboardInterrupt the partial variant is saved (``"partial": true``) before re-raising.
    ``on_event(kind, data)``: ``"start"``, ``"progress"`` (``done``/``total`` videos),
    ``"done"`` and ``"error"`` (progress bars)."""
    from streamgraph.compiler.compile import compile_graph

    out = Path(out)
    (out / "items").mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    meta = {"suite": str(suite.path), "suite_name": suite.name, "items": len(suite.items),
            "videos": len(suite.videos()), "backend": backend, "machine": machine_info()}

    def save():
        _save_json(out / "results.json", {"meta": meta, "results": results})

    ev = on_event or (lambda kind, data: None)
    capacities: dict[str, float] = {}       # engines -> capacity measured by the first overload variant
    for i, v in enumerate(variants):
        graph_file = write_variant(v, out / "variants")
        entry = {"name": v.name, "graph": str(graph_file), "axes": v.axes}
        ev("start", {"index": i, "total": len(variants), "name": v.name})
        items: list[dict] = []
        engines = json.dumps({k: x for k, x in v.axes.items() if k not in ("overload", "deadline", "load")},
                             sort_keys=True)
        try:
            res = compile_graph(graph_file, Path(build_root) / v.doc["name"])
            entry.update(evaluate_bundle(res.bundle.path, suite, load=v.load, backend=backend, items_out=items,
                                         progress=lambda d, t: ev("progress", {"done": d, "total": t}),
                                         capacity_fps=capacities.get(engines) if v.load else None))
            if v.load and entry.get("capacity_fps"):
                capacities.setdefault(engines, entry["capacity_fps"])
            ev("done", entry)
        except KeyboardInterrupt:
            entry.update(partial=True, answered=len(items),
                         accuracy=float(np.mean([r["correct"] for r in items])) if items else None)
            results.append(entry)
            _write_items(out, v.name, items)
            save()
            raise
        except StreamgraphError as e:
            entry["error"] = " ".join(str(e).split())
            ev("error", entry)
        except Exception as e:  # an engine or exporter failure: report the variant, go on
            entry["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
            ev("error", entry)
        results.append(entry)
        _write_items(out, v.name, items)
        save()
    return results


def _write_items(out: Path, name: str, items: list[dict]) -> None:
    (out / "items" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def machine_info() -> dict:
    import os
    import platform

    import onnxruntime

    return {"cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "onnxruntime": onnxruntime.__version__}


# ----------------------------------------------------------------------------- report
def results_table(results: list[dict], title: str = "StreamQA"):
    """A rich Table of results (accuracy, per family, cost)."""
    from rich.table import Table

    fams = sorted({f for r in results for f in (r.get("families") or {})})
    t = Table(title=title)
    for col in ["variant", "acc", *fams, "tok/frame", "KV KiB", "p50 ms", "p99 ms", "TTFT p50", "drop", "degr"]:
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in results:
        if "error" in r:
            t.add_row(r["name"], "[red]error[/red]", *([""] * (len(fams) + 7)))
            continue
        f = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
        fr = r.get("frames", {})
        t.add_row(r["name"] + (" (partial)" if r.get("partial") else ""), pct(r.get("accuracy")),
                  *(pct((r.get("families") or {}).get(x, {}).get("accuracy")) for x in fams),
                  f(r.get("tokens_per_frame")), f((r.get("kv_bytes") or 0) / 1024, 0),
                  f((r.get("frame_latency_ms") or {}).get("p50"), 2), f((r.get("frame_latency_ms") or {}).get("p99"), 2),
                  f((r.get("ttft_ms") or {}).get("p50"), 2), str(fr.get("dropped", "-")), str(fr.get("degraded", "-")))
    return t


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, accuracy) no other point beats on both (lower latency,
    higher accuracy), sorted by latency."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_results(results: list[dict], out: str | Path) -> list[Path]:
    """``pareto.png`` (accuracy vs per-frame p50 latency, Pareto front; variants run in real
    time only, since an overload run's latency is mostly queueing) and
    ``evidence_age.png`` (accuracy vs evidence age, one line per cache policy variant).
    Returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out)
    ok = [r for r in results if "error" not in r and r.get("accuracy") is not None
          and (r.get("frame_latency_ms") or {}).get("p50") is not None]
    written = []
    real_time = [r for r in ok if r.get("load") is None]     # overload runs' latency is queueing
    if real_time:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        pts = [(r["frame_latency_ms"]["p50"], 100 * r["accuracy"]) for r in real_time]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18)
        for r, p in zip(real_time, pts):
            ax.annotate(r["name"], p, fontsize=6, xytext=(3, 2), textcoords="offset points")
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "r-", lw=1, label="Pareto front")
        ax.set_xlabel("per-frame latency p50 (ms, capture to end)")
        ax.set_ylabel("StreamQA exact match (%)")
        ax.set_title("accuracy vs per-frame latency")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=130)
        plt.close(fig)
        written.append(out / "pareto.png")
    caches = [r for r in ok if "cache" in r.get("axes", {}) and r.get("evidence_age")]
    baseline = [r for r in ok if set(r.get("axes", {})) <= {"reducer"} and r.get("axes", {}).get("reducer") in
                (None, "none") and r.get("evidence_age") and r.get("load") is None]
    if caches:
        caches = baseline[:1] + caches
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in caches:
            keys = list(r["evidence_age"])
            ax.plot(range(len(keys)), [100 * r["evidence_age"][k]["accuracy"] for k in keys], marker="o",
                    label=f"{r['name'] if r.get('axes', {}).get('cache') else r['cache'] + ' (baseline)'} "
                          f"({r['kv_bytes'] / 1024:.0f} KiB)")
            ax.set_xticks(range(len(keys)), keys)
        ax.set_xlabel("evidence age (ask time - evidence time)")
        ax.set_ylabel("exact match (%)")
        ax.set_title("accuracy vs evidence age per cache policy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "evidence_age.png", dpi=130)
        plt.close(fig)
        written.append(out / "evidence_age.png")
    return written
