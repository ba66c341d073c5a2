"""Plot of a run: per-frame latency against the deadline, decisions marked (matplotlib).

matplotlib is optional (extra ``plots``); without it :func:`plot_latency` returns None.
"""
from __future__ import annotations

from pathlib import Path


def plot_latency(report, path: str | Path) -> Path | None:
    """Write a PNG of end-to-end latency (ms) per frame vs capture time (s), with the
    deadline, degraded frames, misses (labelled with the stage that overran) and drops.
    Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    frames = report.frames
    deadline_ms = report.meta.get("frame_deadline_ms")
    full = max((f.budget for f in frames if f.decision == "run"), default=0)
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    groups = {
        "met (full budget)": ([f for f in frames if f.decision == "run" and f.deadline_met and f.budget == full], "o", "tab:green"),
        "met (degraded)": ([f for f in frames if f.decision == "run" and f.deadline_met and f.budget < full], "o", "tab:orange"),
        "missed": ([f for f in frames if f.decision == "run" and not f.deadline_met], "x", "tab:red"),
    }
    for label, (fs, marker, color) in groups.items():
        if fs:
            ax.scatter([f.capture for f in fs], [f.latency_ms for f in fs], s=10, marker=marker, color=color,
                       label=f"{label} ({len(fs)})")
    drops = [f for f in frames if f.decision == "drop"]
    if drops:
        ax.scatter([f.capture for f in drops], [0] * len(drops), s=14, marker="|", color="0.4",
                   label=f"dropped ({len(drops)})")
    if deadline_ms:
        ax.axhline(deadline_ms, color="k", lw=1, ls="--", label=f"deadline {deadline_ms:.0f} ms")
    for q in report.questions:
        ax.axvline(q.asked_at, color="tab:purple", lw=1, ls=":")
    overran = {}
    for f in frames:
        if f.decision == "run" and not f.deadline_met and f.overran:
            overran[f.overran] = overran.get(f.overran, 0) + 1
    title = f"{report.meta.get('name', '')} — overload={report.meta.get('overload')}"
    if overran:
        title += " — misses by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(overran.items()))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("capture time (s)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
