"""``streamgraph validate | compile | inspect | run | serve | cluster | capacity | eval | make-suite | schema``.

Every user error ends in one line ``error: ...`` on stderr naming the problem and where,
and a non-zero exit (1 for bad input, 2 for bad usage, 3 for an internal error).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streamgraph.backends import BACKENDS
from streamgraph.errors import StreamgraphError

MiB = 1024 * 1024


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _is_graph_file(p: Path) -> bool:
    return p.suffix.lower() in (".yaml", ".yml")


# ---------------------------------------------------------------------------- commands
def cmd_validate(args) -> int:
    from streamgraph.compiler.compile import check_graph

    g = check_graph(args.graph, build_weights=False)   # meta device: shapes and bytes, no weights
    plan = g.plan
    _console().print(
        f"ok: {args.graph}: graph '{g.spec.name}' — {len(g.spec.nodes)} nodes, "
        f"{plan.encoder_tokens} -> {plan.tokens_per_frame} tokens/frame, cache {plan.cache['op']} "
        f"({plan.cache['capacity']} slots, KV {plan.kv.bytes / MiB:.2f} MiB), plan total "
        f"{plan.memory.total_bytes / MiB:.2f} MiB of {plan.memory.budget_bytes / MiB:.0f} MiB")
    return 0


def _compile(graph: str, out: str | None, force: bool, console) -> "object":
    from streamgraph.compiler.compile import compile_graph

    with console.status("compiling...") as status:
        res = compile_graph(graph, out, force=force,
                            progress=lambda name: status.update(f"exporting engine {name} (torch.onnx dynamo)..."))
    what = "compiled" if res.rebuilt else "up to date"
    console.print(f"{what}: {res.bundle.path} (lock {res.bundle.lock_key[:12]})")
    return res.bundle


def cmd_compile(args) -> int:
    console = _console()
    bundle = _compile(args.graph, args.output, args.force, console)
    _print_plan(bundle, console)
    return 0


def _print_plan(bundle, console) -> None:
    from rich.table import Table

    plan = bundle.plan
    t = Table(title=f"engines of {bundle.name}")
    for col in ("engine", "inputs", "outputs", "T", "weights"):
        t.add_column(col)
    fmt = lambda specs: "\n".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in specs)  # noqa: E731
    for e in plan.engines.values():
        t.add_row(e.name, fmt(e.inputs), fmt(e.outputs), str(e.dims.get("T", "-")),
                  f"{e.weights_bytes / MiB:.2f} MiB")
    console.print(t)
    m = Table(title="memory plan")
    m.add_column("part")
    m.add_column("bytes", justify="right")
    m.add_column("MiB", justify="right")
    for name, val in plan.memory.table():
        m.add_row(name, f"{val:,}", f"{val / MiB:.2f}")
    console.print(m)
    c = plan.cache
    console.print(f"cache policy: {c['op']} {c['params']} — {c['capacity']} slots; "
                  f"kv_cache{plan.kv.shape} {plan.kv.dtype} = {plan.kv.bytes:,} bytes")
    if c.get("regions"):
        r = Table(title=f"KV buffer regions ({c['op']})")
        for col in ("region", "slots", "range", "bytes"):
            r.add_column(col, justify="left" if col == "region" else "right")
        for reg in c["regions"]:
            r.add_row(reg["name"], str(reg["slots"]), f"[{reg['start']}, {reg['start'] + reg['slots']})",
                      f"{reg['bytes']:,}")
        if c.get("host_bytes"):
            r.add_row("host store (RAM)", "-", "-", f"{c['host_bytes']:,}")
        console.print(r)


def cmd_inspect(args) -> int:
    from streamgraph.compiler.bundle import Bundle

    console = _console()
    path = Path(args.target)
    if path.is_file() and _is_graph_file(path):
        from streamgraph.compiler.compile import check_graph

        g = check_graph(path, build_weights=False)
        console.print(f"graph {g.spec.name} (not compiled): plan below")

        from types import SimpleNamespace

        _print_plan(SimpleNamespace(name=g.spec.name, plan=g.plan), console)
        return 0
    bundle = Bundle.load(path)
    if args.json:
        print(json.dumps(bundle.manifest, indent=2))
        return 0
    man = bundle.manifest
    console.print(f"bundle {bundle.name} at {bundle.path}\n  lock key {bundle.lock_key}\n"
                  f"  target {man['target']}, tools {man['tools']}\n  slo {man['slo']}")
    _print_plan(bundle, console)
    return 0


def cmd_schema(args) -> int:
    from streamgraph.compiler.spec import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


MAX_CLI_FPS = 1000.0          # --fps upper bound (frames per second)


class _Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler of ``run`` (not an Exception, so no
    ``except Exception`` swallows it)."""


def _run_questions(args) -> list[tuple[float, str]]:
    """(time, text) of every --ask, paired in order with --at (no --at: all at 0 s)."""
    import math

    asks, ats = args.ask or [], args.at or []
    for text in asks:
        if not text.strip():
            raise StreamgraphError("--ask: the question is empty")
    if ats and not asks:
        raise StreamgraphError("--at needs --ask TEXT")
    if ats and len(ats) != len(asks):
        raise StreamgraphError(f"give one --at per --ask, in the same order ({len(asks)} --ask, {len(ats)} --at), "
                               f"or no --at to ask them all at 0 s")
    for t in ats:
        if not math.isfinite(t) or t < 0:
            raise StreamgraphError(f"--at must be a finite number of seconds >= 0, got {t:g}")
    return list(zip(ats or [0.0] * len(asks), asks))


def _check_run_numbers(args) -> None:
    import math

    if args.fps is not None and not (math.isfinite(args.fps) and 0 < args.fps <= MAX_CLI_FPS):
        raise StreamgraphError(f"--fps must be a number of frames per second in (0, {MAX_CLI_FPS:g}], "
                               f"got {args.fps:g}")
    if not (math.isfinite(args.speed) and args.speed > 0):
        raise StreamgraphError(f"--speed must be a finite number > 0, got {args.speed:g}")
    if args.max_frames is not None and args.max_frames < 1:
        raise StreamgraphError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.history < 1:
        raise StreamgraphError(f"--history must be >= 1, got {args.history}")


def cmd_run(args) -> int:
    import copy
    import logging
    import signal
    import threading

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from streamgraph.runtime import live, sources
    from streamgraph.runtime.stream import WallClock
    from streamgraph.runtime.metrics import RECORDS_FILE, check_report_dir
    from streamgraph.runtime.stream import Question, StreamRunner
    from streamgraph.runtime.session import Engines

    console = _console()
    asked = _run_questions(args)                    # bad input is refused before anything runs
    _check_run_numbers(args)
    target = Path(args.target)
    named = _run_sources(args, target)              # --source/--video, else the graph's stream.source
    n_streams = len(named) if named else 1
    report_dirs: list[Path] = []
    if args.report:                                 # an unwritable --report fails now, not at the end
        base = check_report_dir(args.report)
        report_dirs = [check_report_dir(base / f"stream-{i}") for i in range(n_streams)] if n_streams > 1 else [base]
    if target.is_file() and _is_graph_file(target):
        bundle_dir = _compile(str(target), None, False, console).path
    else:
        bundle_dir = target
    demo = None
    if named:
        videos = named                              # strings: a URL is not a path
    else:                                           # the shipped StreamQA episode and its questions
        from streamgraph.streamqa.suite import load_suite

        demo = load_suite(sources.streamqa_demo())
        videos = [demo.path / demo.items[0].video]
    sessions, streams, srcs = [], [], []
    engines = Engines.load(bundle_dir, args.backend)   # engines loaded once, shared by every stream
    for video_path in videos:                       # one session (own KV buffer and state) per stream;
        # no clock given: the runner runs them all on one clock (simulated for files, wall for live)
        session = engines.session(overload=args.overload, history=args.history)
        fps = args.fps or session.bundle.manifest["stream"]["fps"]
        # FFmpeg resizes while decoding for the presets; checkpoints get their own processor's
        # antialiased resize in the session's preprocessing, from the native frame size
        size = tuple(session.plan.image_size) if session.plan.resample == "ffmpeg_bilinear" else None
        src = live.open_source(video_path, fps=fps, size=size, max_frames=args.max_frames,
                                  **_live_options(session.bundle.manifest["stream"].get("live"), args))
        if sessions:                                # same engines: calibrated once
            session.scheduler.costs = copy.deepcopy(sessions[0].scheduler.costs)
        else:
            session.calibrate()
        sessions.append(session)
        streams.append((session, src))
        srcs.append(src)
        console.print(f"stream {len(sessions) - 1}: {_source_name(video_path)} at {fps:g} fps through {session.bundle.name} "
                      f"({session.backend.name}, overload={session.scheduler.overload}, "
                      f"deadline {session.scheduler.frame_deadline * 1000:.0f} ms, budgets {session.budgets})")
        model = session.bundle.manifest.get("graph", {}).get("model") or {}
        if model.get("preset") and len(sessions) == 1:
            console.print(f"note: model preset {model['preset']!r} has random weights (seed {model.get('seed', 0)}): "
                          f"shapes, memory and latency are real, the answers are not meaningful")
    if args.realtime:
        wall = WallClock()                          # stream time starts after calibration
        for session in sessions:
            session.clock = wall
    if any(getattr(src, "live", False) for src in srcs):
        console.print("live: real time on the wall clock, newest frame first (capture never waits for the model)")
    else:
        console.print("real time: frames delivered at their capture times" if args.realtime else
                      "as fast as possible, deadlines in stream time" + (", EDF across streams (fair under overload)" if len(sessions) > 1 else ""))
    truth: dict[int, str] = {}
    if asked:
        questions = [Question(at=t, text=text) for t, text in asked]
    elif demo is not None:
        questions = [Question(at=it.ask_time, text=it.question) for it in demo.items]
        truth = {id(q): it.answer for q, it in zip(questions, demo.items)}
    else:
        questions = []
    scored: list[bool] = []
    counts = {"run": 0, "drop": 0, "error": 0, "miss": 0}
    progress = Progress(TextColumn("[bold]frames"), BarColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=console, disable=not console.is_terminal or args.verbose)

    def on_frame(stream, rec) -> None:
        counts[rec.decision if rec.decision in counts else "drop"] += 1
        counts["miss"] += rec.deadline_met is False
        progress.update(task, advance=1, description=f"{counts['run']} run, {counts['drop']} dropped, "
                                                      f"{counts['miss']} missed, t={rec.capture:.1f}s")
        if args.verbose:
            lat = f"{rec.latency_ms:7.1f} ms" if rec.latency_ms is not None else "   -      "
            console.print(f"[{stream}] frame {rec.index:4d} t={rec.capture:6.2f}s {rec.decision:5s} "
                          f"budget={rec.budget:<4d} {lat} slots={rec.slots_in_use} {rec.overran or ''} {rec.reason}",
                          markup=False)
        elif rec.decision == "error":
            console.print(f"[{stream}] frame {rec.index} error in the {rec.failed_stage} stage: {rec.reason} "
                          f"(frame not committed; the stream goes on)", markup=False)

    def on_answer(q, rec) -> None:
        progress.console.print(f"Q @ {rec.asked_at:.1f}s: {q.text}", markup=False)
        if q.error:
            progress.console.print(f"A: failed: {q.error} (answer so far {q.answer!r})", markup=False)
            return
        line = f"[bold]A:[/bold] {q.answer!r}  (TTFT {rec.ttft_ms:.1f} ms, {rec.new_tokens} tokens)"
        if id(q) in truth:
            from streamgraph.streamqa.suite import normalize_answer

            ok = normalize_answer(q.answer) == normalize_answer(truth[id(q)])
            scored.append(ok)
            line += f"  truth: {truth[id(q)]!r} " + ("[green]correct[/green]" if ok else "[red]wrong[/red]")
        progress.console.print(line)

    # warnings of the sources (a truncated video) as one line each on stderr
    warn = logging.StreamHandler(sys.stderr)
    warn.setFormatter(logging.Formatter("warning: %(message)s"))
    warn.setLevel(logging.WARNING)
    src_log = logging.getLogger("streamgraph.runtime.sources")
    src_log.addHandler(warn)
    runner = StreamRunner(streams, questions=questions, speed=args.speed, on_frame=on_frame, on_answer=on_answer)
    for session, directory in zip(sessions, report_dirs):
        session.write_records(directory / RECORDS_FILE)     # every record on disk as it finishes

    def on_sigterm(signum, frame):
        raise _Terminated()

    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, on_sigterm)
    error: BaseException | None = None
    try:
        with progress:
            task = progress.add_task("", total=None)
            while runner.step():
                pass
    except BaseException as e:                      # any way out keeps what was measured
        error = e
    finally:
        runner.close(error)
        for src in srcs:                            # stop the capture threads of live sources
            if getattr(src, "live", False):
                src.close(timeout=2.0)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        src_log.removeHandler(warn)
    if scored:
        console.print(f"answers: {sum(scored)}/{len(scored)} correct (exact match against the episode's scene state)")
    saved, save_errors = [], []
    for i, session in enumerate(sessions):
        session.close_records()
        report = session.report()
        report.summary["max_queue"] = runner.max_queue[i]
        stats = srcs[i].decode_stats
        if stats is not None:
            report.meta["source"] = {"path": _source_name(videos[i]), **stats}
        if len(sessions) > 1:
            console.print(f"[bold]stream {i}[/bold] ({_source_name(videos[i])})", markup=False)
        _print_summary(report, console)
        if report_dirs:
            try:
                path = report.save(report_dirs[i])
            except StreamgraphError as e:
                save_errors.append(str(e))
                continue
            saved.append(path)
            console.print(f"report: {path}" + (f" (+ {path.parent / 'latency.png'})"
                                                if (path.parent / "latency.png").exists() else ""), markup=False)
    if error is None:
        if save_errors:
            raise StreamgraphError("; ".join(save_errors))
        return 0
    kept = _kept_note(sessions, saved, save_errors)
    if isinstance(error, _Terminated):
        print(f"error: terminated (SIGTERM){kept}", file=sys.stderr)
        return 143
    if isinstance(error, KeyboardInterrupt):
        print(f"error: interrupted{kept}", file=sys.stderr)
        return 130
    if isinstance(error, StreamgraphError):
        raise StreamgraphError(f"{_where(sessions, error)}{_one_line(error)}{kept}") from error
    raise error                                      # a bug: internal error (rc 3), report kept


def _run_sources(args, target: Path) -> list[str]:
    """The sources ``run`` streams, as strings (a URL is not a path): ``--source``/``--video``
    as given, else the graph's ``stream.source`` (a relative path relative to the graph file;
    for a bundle, to the current directory), else none (the bundled demo). Refuses
    ``--speed`` with a live source (it cannot be replayed faster)."""
    from streamgraph.runtime import live

    named = list(args.video or [])
    if not named:
        raw = None
        if target.is_file() and _is_graph_file(target):
            from streamgraph.compiler.spec import load_spec

            spec = load_spec(target)
            raw = spec.stream.source
            resolve = spec.resolve_path
        else:                                       # a bundle: its manifest is verified when loaded
            try:
                raw = json.loads((target / "manifest.json").read_text())["graph"]["stream"].get("source")
            except Exception:
                raw = None
            resolve = lambda p: Path(p).expanduser()  # noqa: E731
        raw = [raw] if isinstance(raw, str) else [r for r in (raw or []) if isinstance(r, str)]
        named = [r if live.classify(r) in ("url", "stdin") else str(resolve(r)) for r in raw]
    n = args.reconnect_attempts
    if n is not None and not 0 <= n <= 1_000_000:
        raise StreamgraphError(f"--reconnect-attempts must be in [0, 1000000], got {n}")
    for name in named:
        if live.is_live(name) and args.speed != 1.0:
            raise StreamgraphError(f"--speed {args.speed:g}: {live.display_name(name)} is a live source, "
                                   "which cannot be replayed faster or slower")
    return named


def _live_options(section: dict | None, args) -> dict:
    """Keyword arguments of :func:`streamgraph.runtime.live.live` from a bundle's
    ``stream.live`` section and ``--reconnect-attempts``."""
    from streamgraph.runtime.live import live_options

    return live_options(section, args.reconnect_attempts)


def _source_name(source) -> str:
    from streamgraph.runtime.live import display_name

    return display_name(str(source))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _where(sessions, error) -> str:
    """``frame 9 (encode stage): `` for an error that stopped a frame, naming the stream when
    there are several."""
    for i, s in enumerate(sessions):
        rec = s.frames[-1] if s.frames else None
        if rec is not None and rec.decision == "error" and rec.error_type == type(error).__name__:
            stream = f"stream {i}, " if len(sessions) > 1 else ""
            stage = f" ({rec.failed_stage} stage)" if rec.failed_stage else ""
            return f"{stream}frame {rec.index}{stage}: "
    return ""


def _kept_note(sessions, saved, save_errors) -> str:
    n = sum(s.stats.sampled for s in sessions)
    if saved:
        where = ", ".join(str(p.parent) for p in saved)
        note = f"; the records of all {n} frames sampled are kept in {where} (report.json, records.jsonl)"
    else:
        note = ""
    if save_errors:
        note += "; " + "; ".join(save_errors)
    return note


def _print_summary(report, console) -> None:
    from rich.table import Table

    s = report.summary
    misses_by = s.get("misses_by_stage") or {}
    by = (" (overran: " + ", ".join(f"{k} {v}" for k, v in sorted(misses_by.items())) + ")") if misses_by else ""
    errs = f", errors {s['errors']} ({s['nonfinite']} NaN/Inf)" if s.get("errors") else ""
    console.print(f"frames: sampled {s['sampled']}, processed {s['processed']}, dropped {s['dropped']}{errs}, "
                  f"deadline misses {s['deadline_misses']}{by}, max queue {s.get('max_queue', '-')}; achieved {s['achieved_fps'] or 0:.2f} fps "
                  f"(compute-bound {s['compute_fps'] or 0:.1f} fps); KV buffer {s['kv_bytes']:,} bytes")
    src = report.meta.get("source") or {}
    if src.get("live"):
        gap = f" (without frames {src['gap_s']:.2f} s in all, longest {src['max_gap_s']:.2f} s)" if src["reconnects"] else ""
        console.print(f"source: {src['path']}: decoded {src['decoded']}, delivered {src['delivered']}, skipped by "
                      f"capture {src['skipped_by_capture']}, not sampled {src['not_sampled']}; disconnects "
                      f"{src['disconnects']}, reconnects {src['reconnects']}{gap}", markup=False)
    if src.get("truncated"):
        console.print(f"source: {src['frames_decoded']} of the {src['frames_header']} frames its header states "
                      f"decoded (truncated or damaged file)", markup=False)
    t = Table(title="latency per frame (ms)")
    for col in ("stage", "p50", "p95", "p99", "max"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for stage, p in s["latency_ms"].items():
        if p["p50"] is None:
            continue
        t.add_row(stage, *(f"{p[k]:.2f}" for k in ("p50", "p95", "p99", "max")))
    console.print(t)


def _csv(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if cast is int and "/" in part:          # a bucket list: 4/8/16
            out.append([int(x) for x in part.split("/")])
            continue
        try:
            out.append(cast(part))
        except ValueError:
            raise StreamgraphError(f"cannot read {part!r} as {cast.__name__}") from None
    return out


def cmd_eval(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from streamgraph.streamqa import evaluate as ev
    from streamgraph.streamqa.suite import load_suite

    console = _console()
    variants = []
    suite_dir = args.suite
    if args.sweep:
        sweep, sv, _ = ev.expand_sweep(args.sweep)
        variants += sv
        if suite_dir is None and sweep.get("suite"):
            suite_dir = str(Path(args.sweep).parent / sweep["suite"])
    axes = {k: v for k, v in (("reducer", _csv(args.reducer)), ("budget", _csv(args.budget, int)),
                              ("cache", _csv(args.cache)), ("overload", _csv(args.overload)),
                              ("deadline", _csv(args.deadline, float)),
                              ("load", [args.load] if args.load is not None else None)) if v}
    for graph in args.graphs:
        base = ev.base_document(graph)
        if axes:
            variants += ev.expand_axes(base, axes)
        else:
            v = ev.Variant(base.get("name", Path(graph).stem), base, None, {})
            variants.append(v)
    if not variants:
        raise StreamgraphError("nothing to evaluate: give graph files and/or --sweep FILE")
    if suite_dir is None:
        raise StreamgraphError("--suite DIR is required (or a sweep file with suite:)")
    if args.load is not None and not args.load > 0:
        raise StreamgraphError(f"--load must be > 0, got {args.load}")
    suite = load_suite(suite_dir)
    out = Path(args.out)
    console.print(f"suite {suite.name}: {len(suite.items)} questions over {len(suite.videos())} videos; "
                  f"{len(variants)} graph variant(s) -> {out}")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not console.is_terminal)
    tasks = {}

    def on_event(kind, data):
        if kind == "start":
            tasks["cur"] = progress.add_task(f"[{data['index'] + 1}/{data['total']}] {data['name']}", total=None)
        elif kind == "progress":
            progress.update(tasks["cur"], completed=data["done"], total=data["total"])
        elif kind == "done":
            progress.console.print(f"{data['name']}: {100 * data['accuracy']:.1f}% of {data['n']} "
                                   f"({data['seconds']:.0f} s)")
        elif kind == "error":
            progress.console.print(f"[red]{data['name']}: failed: {data['error']}[/red]")

    interrupted = False
    with progress:
        try:
            results = ev.run_variants(variants, suite, out, build_root=args.build_dir, backend=args.backend,
                                      on_event=on_event)
        except KeyboardInterrupt:
            interrupted = True
            results = json.loads((out / "results.json").read_text())["results"]
    from rich.console import Console

    wide = console if console.is_terminal else Console(highlight=False, width=200)
    wide.print(ev.results_table(results, title=f"StreamQA: {suite.name}"))
    plots = ev.plot_results(results, out)
    console.print(f"results: {out / 'results.json'}" + "".join(f", {p}" for p in plots))
    if interrupted:
        print("error: interrupted; the results so far are saved", file=sys.stderr)
        return 130
    return 1 if any("error" in r for r in results) and args.strict else 0


def cmd_serve(args) -> int:
    import math

    from streamgraph import serve

    console = _console()
    token = serve.token_from_env(args.token)
    serve.check_bind(args.host, token)              # refused before anything loads
    if args.fps is not None and not (math.isfinite(args.fps) and 0 < args.fps <= MAX_CLI_FPS):
        raise StreamgraphError(f"--fps must be a number of frames per second in (0, {MAX_CLI_FPS:g}], got {args.fps:g}")
    if not (math.isfinite(args.speed) and args.speed > 0):
        raise StreamgraphError(f"--speed must be a finite number > 0, got {args.speed:g}")
    for name in ("history", "max_streams", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise StreamgraphError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise StreamgraphError(f"--port must be in [0, 65535], got {args.port}")
    target = args.target
    videos = list(args.video or [])
    if not videos and target is not None:          # the sources the graph names (stream.source), as `run`
        from types import SimpleNamespace

        videos = _run_sources(SimpleNamespace(video=None, reconnect_attempts=None, speed=args.speed), Path(target))
    if target is not None and Path(target).is_file() and _is_graph_file(Path(target)):
        target = str(_compile(target, None, False, console).path)
    if videos and target is None:
        raise StreamgraphError("--video needs a TARGET (graph .yaml or bundle directory) to run the streams on")

    def ready(url, streams):
        console.print(f"serving on {url} ({'token required' if token else 'no token: loopback only'}); "
                      f"{len(streams)} stream(s): " + (", ".join(f"{s.id} <- {s.cfg.source}" for s in streams) or "-")
                      + f"; OpenAI base_url {url}/v1, /metrics, /healthz", markup=False, soft_wrap=True)

    return serve.run_server(target=target, videos=videos, host=args.host, port=args.port, token=token,
                            fps=args.fps, speed=args.speed, loop=args.loop, overload=args.overload,
                            backend=args.backend, records=args.records, history=args.history,
                            max_streams=args.max_streams, max_body_bytes=args.max_body_bytes,
                            log_level=args.log_level, on_ready=ready)


def cmd_cluster(args) -> int:
    import math

    from streamgraph.cluster.cli import run_cluster

    for name in ("actors", "threads"):
        if getattr(args, name) < 1:
            raise StreamgraphError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.fps is not None and not (math.isfinite(args.fps) and 0 < args.fps <= MAX_CLI_FPS):
        raise StreamgraphError(f"--fps must be a number of frames per second in (0, {MAX_CLI_FPS:g}], got {args.fps:g}")
    target = Path(args.target)
    if not target.exists():
        raise StreamgraphError(f"{target}: no such graph file or bundle directory")
    bundle = str(_compile(target, None, False, _console()).path) if target.is_file() else str(target)
    return run_cluster(bundle, address=args.address, actors=args.actors, threads=args.threads, fps=args.fps,
                       placement=args.placement, reserve_actors=args.reserve_actors,
                       probe_seconds=args.probe_seconds, memory_gb=args.memory_gb, videos=list(args.video or []),
                       host=args.host, port=args.port, token=args.token)


def cmd_make_suite(args) -> int:
    from streamgraph.streamqa.scene import EpisodeParams
    from streamgraph.streamqa.suite import write_suite

    if args.episodes < 1:
        raise StreamgraphError(f"--episodes must be >= 1, got {args.episodes}")
    if args.first_seed < 0:
        raise StreamgraphError(f"--first-seed must be >= 0, got {args.first_seed}")
    params = EpisodeParams(min_frames=args.min_frames, max_frames=args.max_frames)
    seeds = range(args.first_seed, args.first_seed + args.episodes)
    path = write_suite(args.directory, seeds, params, name=args.name)
    from streamgraph.streamqa.suite import load_suite

    suite = load_suite(path)
    _console().print(f"wrote {path}: {len(suite.items)} questions over {len(suite.videos())} videos "
                     f"(seeds {seeds.start}..{seeds.stop - 1})")
    return 0


def cmd_capacity(args) -> int:
    from streamgraph.runtime import capacity

    try:                                            # bad numbers are refused before anything runs
        capacity.check_numbers(fps=args.fps, threads=args.threads, memory_gb=args.memory_gb,
                               probe_frames=args.probe_frames, miss_rate=args.miss_rate,
                               probe_seconds=args.probe_seconds, max_fps=MAX_CLI_FPS)
    except ValueError as e:
        raise StreamgraphError(str(e)) from None
    console = _console()
    target = Path(args.target)
    if target.is_file() and _is_graph_file(target):
        bundle_dir = _compile(str(target), None, False, console).path
    elif not target.exists():
        raise StreamgraphError(f"{target}: no such graph file (.yaml) or bundle directory")
    else:
        bundle_dir = target
    with console.status("measuring...") as status:
        ans = capacity.estimate(bundle_dir, fps=args.fps, threads=args.threads, memory_gb=args.memory_gb,
                                probe_frames=args.probe_frames, probe_seconds=args.probe_seconds,
                                miss_rate=args.miss_rate, video=args.video,
                                overload=args.overload, progress=lambda msg: status.update(msg + "..."))
    if args.json:
        print(json.dumps(ans.to_dict(), indent=2))
        return 0
    _print_capacity(ans, console)
    return 0


def _print_capacity(ans, console) -> None:
    cpu, mem, m = ans.cpu, ans.memory, ans.machine
    load = f", load {m['loadavg_before'][0]:.2f}" if m.get("loadavg_before") else ""
    console.print(f"capacity of {ans.name}: identical streams at {ans.fps:g} fps, deadline {ans.deadline_ms:g} ms, "
                  f"on this machine ({m['cpus']} CPUs, {m['backend']} {m['threads']} threads{load})", markup=False, soft_wrap=True)
    pct = 100 * ans.miss_rate
    if ans.binds == "memory":
        nxt = mem["streams"] + 1
        why = (f"memory binds: {nxt} stream{'s' if nxt > 1 else ''} would need {(mem['shared_bytes'] + (mem['streams'] + 1) * mem['per_stream_bytes']) / MiB:,.1f} MiB "
               f"of {mem['available_bytes'] / MiB:,.1f} MiB")
    elif ans.binds == "CPU time" and cpu.binds in ("deadline", "frame period"):
        nxt = cpu.streams + 1
        why = (f"CPU time binds ({cpu.binds}): with {nxt} streams {100 * cpu.fail_fraction_next:.1f}% of frames would be "
               f"late, dropped or degraded"
               if cpu.binds == "deadline" else
               f"CPU time binds (frame period): a burst of {nxt} frames outlasts the {1000 / ans.fps:g} ms period "
               f"{100 * cpu.period_exceed_next:.1f}% of the time")
    else:
        why = ans.binds
    console.print(f"  answer: {ans.streams} streams — {why}", markup=False, soft_wrap=True)
    f = ans.costs_ms["frame"]
    stages = ", ".join(f"{k} {v['p99']:.2f}" for k, v in ans.costs_ms.items() if k != "frame")
    console.print(f"  frame cost ({ans.probe['frames']} probe frames over {ans.probe['sessions']} streams at budget "
                  f"{ans.probe['budget']}): mean {f['mean']:.2f} ms, "
                  f"p50 {f['p50']:.2f}, p99 {f['p99']:.2f}, max {f['max']:.2f} ms (p99 by stage: {stages})", markup=False, soft_wrap=True)
    if cpu.streams:
        console.print(f"  CPU time: {cpu.streams} streams: p99 latency {cpu.p99_latency_ms:.1f} ms of {ans.deadline_ms:g}, "
                      f"{100 * cpu.fail_fraction:.2f}% of frames late, dropped or degraded, runner overhead {cpu.overhead_ms:.2f} ms/frame, "
                      f"utilisation {cpu.utilization:.2f}"
                      + (f" ({cpu.binds})" if cpu.binds not in ("deadline", "frame period") else ""), markup=False, soft_wrap=True)
    else:
        console.print(f"  CPU time: not even one stream meets the deadline ({cpu.binds})", markup=False, soft_wrap=True)
    ps = mem["plan_per_stream"]
    console.print(f"  memory: {mem['streams']:,} streams in {mem['available_bytes'] / MiB:,.1f} MiB"
                  f"{'' if mem['memory_gb'] is not None else ' available'}: {mem['shared_bytes'] / MiB:,.1f} MiB once "
                  f"(runtime, engines) + {mem['per_stream_bytes'] / MiB:,.2f} MiB per stream (plan: KV "
                  f"{ps['kv_cache'] / MiB:.2f} MiB, state {(ps['reducer_state'] + ps['encoder_refs']) / MiB:.2f} MiB, "
                  f"host store {ps['host_store'] / MiB:.2f} MiB)", markup=False, soft_wrap=True)
    console.print(f"  model: streams in phase share one executor, earliest deadline first; the k-th frame of a burst "
                  f"ends after k frame costs (runs of probe frames) + k x runner overhead, the {ans.probe['overload']} "
                  f"policy's decisions replayed; n streams fit when at most {pct:g}% of frames are late, dropped or "
                  f"degraded and a burst ends within the frame period; questions are not included (docs/live.md, "
                  f"Capacity)", markup=False, soft_wrap=True)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from streamgraph.runtime.scheduler import OVERLOAD_POLICIES

    p = argparse.ArgumentParser(prog="streamgraph", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a graph file: spec, graph, shapes, memory plan")
    v.add_argument("graph")
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("compile", help="compile a graph file into a bundle of ONNX engines")
    c.add_argument("graph")
    c.add_argument("-o", "--output", help="bundle directory (default build/<name>)")
    c.add_argument("--force", action="store_true", help="rebuild even if the lock key matches")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", help="show a bundle's (or graph's) engines, shapes and memory plan")
    i.add_argument("target")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="stream a video through a bundle (or graph, compiled on the fly)")
    r.add_argument("target", help="graph .yaml or bundle directory")
    r.add_argument("--video", action="append",
                   help="video file (default: the graph's stream.source, else the StreamQA demo episode shipped with "
                        "streamgraph, whose questions are asked with their true answers); repeat for several "
                        "streams sharing one executor, earliest deadline first")
    r.add_argument("--source", action="append", dest="video", metavar="SOURCE",
                   help="a live source or a file: rtsp://, rtmp://, http(s)://, tcp://, udp://... URL, V4L2 device "
                        "(/dev/video0), named pipe, '-' (stdin) or a video path; repeat for several streams (with "
                        "--video, in the order given). Live sources run on the wall clock, newest frame first")
    r.add_argument("--reconnect-attempts", type=int, metavar="N",
                   help="failed tries in a row before a live source gives up (default: the graph's "
                        "stream.live.attempts, 5)")
    r.add_argument("--fps", type=float, help="sampling fps in (0, 1000] (default: the graph's stream.fps)")
    r.add_argument("--ask", action="append",
                   help="question to ask about the stream; repeat for several (asked in order)")
    r.add_argument("--at", type=float, action="append",
                   help="stream time (s) at which to ask: one per --ask, paired in order (default: all at 0)")
    r.add_argument("--report", help="directory for report.json and records.jsonl (every record, written as "
                                    "the run goes); checked for writing before the run starts")
    r.add_argument("--history", type=int, default=1024,
                   help="records of each kind kept in memory and in report.json (the summary and "
                        "records.jsonl cover the whole run; default 1024)")
    r.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS))
    r.add_argument("--overload", choices=OVERLOAD_POLICIES,
                   help="override the graph's slo.overload")
    r.add_argument("--speed", type=float, default=1.0,
                   help="replay the source this many times faster than captured (offered load x speed)")
    r.add_argument("--max-frames", type=int, help="stop after this many sampled frames")
    r.add_argument("--realtime", action="store_true",
                   help="deliver frames at their capture times (default: as fast as possible, deadlines in stream time)")
    r.add_argument("-v", "--verbose", action="store_true", help="print one line per frame")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="answer a StreamQA-format suite through the runtime and score each graph")
    e.add_argument("graphs", nargs="*", help="graph .yaml files (each expanded over the axis options below)")
    e.add_argument("--suite", help="suite directory (suite.json + items.jsonl + videos)")
    e.add_argument("--sweep", help="sweep file: a base graph and groups of axes (see docs/accuracy.md)")
    e.add_argument("--reducer", help="comma-separated reducers to sweep (none, topk_saliency, dtd, ...)")
    e.add_argument("--budget", help="comma-separated token budgets; 4/8/16 is one bucket list")
    e.add_argument("--cache", help="comma-separated cache policies (with their default parameters)")
    e.add_argument("--overload", help="comma-separated overload policies")
    e.add_argument("--deadline", help="comma-separated frame deadlines (ms) to sweep (slo.frame_deadline_ms)")
    e.add_argument("--load", type=float, help="replay at this multiple of the measured capacity (e.g. 2)")
    e.add_argument("--out", default="out/eval", help="results directory (results.json, plots, items/)")
    e.add_argument("--build-dir", default="build", help="where variant bundles are compiled")
    e.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    e.add_argument("--strict", action="store_true", help="exit 1 if any variant failed")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("make-suite", help="generate a StreamQA suite (videos + questions) from seeds")
    m.add_argument("directory")
    m.add_argument("--first-seed", type=int, default=1_000_000_000,
                   help="first episode seed (evaluation seeds are >= 1e9; training draws from [0, 1e9))")
    m.add_argument("--episodes", type=int, default=130)
    m.add_argument("--min-frames", type=int, default=6)
    m.add_argument("--max-frames", type=int, default=12)
    m.add_argument("--name", help="suite name (default: the directory name)")
    m.set_defaults(func=cmd_make_suite)

    sv = sub.add_parser("serve", help="serve streams over HTTP: add/remove streams, ask (SSE), OpenAI-compatible "
                                      "chat completions, Prometheus /metrics (docs/live.md)")
    sv.add_argument("target", nargs="?", help="graph .yaml or bundle directory: the default of streams added "
                                              "without one, and of --video")
    sv.add_argument("--video", "--source", action="append", dest="video", metavar="[ID=]SOURCE",
                    help="start a stream at launch: a video file (replayed at its capture rate) or a live source "
                         "(URL, /dev/videoN, FIFO); repeat for several; ID names it (default s1, s2, ...); "
                         "default: the sources the graph names (stream.source)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                                                        "address needs --token)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--token", help="API token clients must send as 'Authorization: Bearer TOKEN' "
                                    "(default $STREAMGRAPH_API_TOKEN); required off loopback")
    sv.add_argument("--fps", type=float, help="sampling fps of the --video streams (default: the graph's)")
    sv.add_argument("--speed", type=float, default=1.0, help="replay --video files this many times faster")
    sv.add_argument("--loop", action="store_true", help="replay --video files forever")
    sv.add_argument("--overload", choices=OVERLOAD_POLICIES,
                    help="override the graph's slo.overload for the --video streams")
    sv.add_argument("--records", help="directory where each stream appends its records to <id>/records.jsonl")
    sv.add_argument("--history", type=int, default=1024, help="records of each kind kept in memory per stream")
    sv.add_argument("--max-streams", type=int, default=8, help="streams served at once at most (default 8)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20,
                    help="largest request body accepted, bytes (default 1 MiB; larger: 413)")
    sv.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS))
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (access log at info)")
    sv.set_defaults(func=cmd_serve)

    cl = sub.add_parser("cluster", help="streams over StreamWorker actors on a Ray cluster: placement from each "
                                        "actor's measured capacity, admission control, failover, /metrics "
                                        "(docs/cluster.md; needs the ray extra)")
    cl.add_argument("target", help="graph .yaml (compiled first) or bundle directory, at the same path on every node")
    cl.add_argument("--address", default="local",
                    help="Ray cluster: 'local' starts one on this machine (default), 'auto' or HOST:PORT joins one")
    cl.add_argument("--actors", type=int, default=4, help="StreamWorker actors (one per node or device; default 4)")
    cl.add_argument("--threads", type=int, default=1, help="intra-op threads (and Ray CPUs) per actor (default 1)")
    cl.add_argument("--fps", type=float, help="frames per second of every stream (default: the graph's)")
    cl.add_argument("--placement", default="plan", choices=["plan", "round_robin"],
                    help="plan: by each actor's planned capacity (default); round_robin: in turn")
    cl.add_argument("--reserve-actors", type=int, default=0,
                    help="keep the slots of this many actors free so their streams can fail over (N+k)")
    cl.add_argument("--probe-seconds", type=float, default=3.0, help="each actor measures its frame costs this long")
    cl.add_argument("--memory-gb", type=float, help="memory budget per actor, declared to Ray (default: the node's)")
    cl.add_argument("--video", "--source", action="append", dest="video", metavar="[ID=]SOURCE",
                    help="admit a stream at launch: 'synthetic[:SEED]', a video file (replayed as a camera) or a "
                         "live URL/device/pipe; repeat for several")
    cl.add_argument("--host", default="127.0.0.1", help="address of the HTTP endpoint (off loopback needs --token)")
    cl.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    cl.add_argument("--token", help="API token (default $STREAMGRAPH_API_TOKEN); required off loopback")
    cl.set_defaults(func=cmd_cluster)

    cp = sub.add_parser("capacity", help="predict how many identical streams this machine serves within the "
                                         "deadline, and which resource binds (CPU time or memory)")
    cp.add_argument("target", help="graph .yaml (compiled on the fly) or bundle directory")
    cp.add_argument("--fps", type=float, help="frames per second of every stream, in (0, 1000] "
                                              "(default: the graph's stream.fps)")
    cp.add_argument("--threads", type=int, help="intra-op threads of the engines (default: the machine's cores)")
    cp.add_argument("--memory-gb", type=float, help="GiB the streams may use (default: memory available now)")
    cp.add_argument("--probe-frames", type=int, default=48,
                    help="frames run to measure the cost distribution (default 48)")
    cp.add_argument("--probe-seconds", type=float, default=3.0,
                    help="run the probe frames again and again for at least this long, so the costs cover the "
                         "machine's slow phases too (default 3 s)")
    cp.add_argument("--miss-rate", type=float, default=0.01,
                    help="share of frames allowed to end late, be dropped or degraded (default 0.01: p99)")
    cp.add_argument("--video", help="measure costs on the first frames of this video (default: a synthetic clip)")
    cp.add_argument("--overload", choices=OVERLOAD_POLICIES,
                    help="the overload policy the streams will run (default: the graph's slo.overload)")
    cp.add_argument("--json", action="store_true", help="print every figure as JSON")
    cp.set_defaults(func=cmd_capacity)

    s = sub.add_parser("schema", help="print the JSON Schema of graph files")
    s.add_argument("-o", "--output")
    s.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StreamgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # pragma: no cover - last resort, never a bare traceback
        if args.debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
