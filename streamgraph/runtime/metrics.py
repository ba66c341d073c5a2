"""Per-frame and per-question records, the run summary, and report.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class FrameRecord:
    """One sampled frame. Times are stream seconds; ``stage_ms`` in milliseconds."""

    index: int
    capture: float
    deadline: float
    decision: str                    # "run" | "drop" | "error" (the run stopped on this frame)
    start: float | None = None
    end: float | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    tokens_kept: int = 0
    budget: int = 0                  # token budget K the frame ran at
    encoder: str = ""                # encoder path: full | refresh | reuse | skip (stc_cacher)
    slots_in_use: int = 0            # KV slots holding tokens after the frame
    deadline_met: bool | None = None
    overran: str | None = None       # stage that overran, for a miss or a drop
    reason: str = ""
    queue_len: int = 0               # frames pending (this one included) when it was decided

    @property
    def latency_ms(self) -> float | None:
        return None if self.end is None else 1000.0 * (self.end - self.capture)


@dataclass
class QuestionRecord:
    """One question: TTFT is from ``asked_at`` to the first generated token (ms)."""

    text: str
    asked_at: float
    deadline: float
    prompt_tokens: int = 0
    ttft_ms: float | None = None
    decode_ms: list[float] = field(default_factory=list)
    answer: str = ""
    new_tokens: int = 0
    ttft_met: bool | None = None
    slots_in_use: int = 0


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


def summarize(frames: list[FrameRecord], questions: list[QuestionRecord], kv_bytes: int) -> dict:
    """Counts, per-stage and end-to-end latency percentiles (ms), achieved fps, KV bytes."""
    run = [f for f in frames if f.decision == "run"]
    dropped = [f for f in frames if f.decision == "drop"]
    stages = sorted({s for f in run for s in f.stage_ms})
    per_stage = {s: percentiles([f.stage_ms[s] for f in run if s in f.stage_ms]) for s in stages}
    e2e = percentiles([f.latency_ms for f in run if f.latency_ms is not None])
    span = (max(f.end for f in run) - min(f.capture for f in frames)) if run else 0.0
    busy = sum(sum(f.stage_ms.values()) for f in run) / 1000.0
    return {
        "sampled": len(frames),
        "processed": len(run),
        "dropped": len(dropped),
        "errors": sum(1 for f in frames if f.decision == "error"),
        "deadline_misses": sum(1 for f in run if f.deadline_met is False),
        "deadline_met": sum(1 for f in run if f.deadline_met),
        "latency_ms": {"end_to_end": e2e, **per_stage},
        "achieved_fps": (len(run) / span) if span > 0 else None,
        "compute_fps": (len(run) / busy) if busy > 0 else None,
        "kv_bytes": kv_bytes,
        "questions": len(questions),
        "ttft_ms": [q.ttft_ms for q in questions],
    }


@dataclass
class Report:
    """Everything a run produced; :meth:`save` writes ``report.json`` into a directory."""

    meta: dict
    frames: list[FrameRecord]
    questions: list[QuestionRecord]
    summary: dict

    def to_dict(self) -> dict:
        return {"meta": self.meta, "summary": self.summary,
                "frames": [asdict(f) for f in self.frames],
                "questions": [asdict(q) for q in self.questions]}

    def save(self, directory: str | Path, plot: bool = True) -> Path:
        """Write ``report.json`` (and, with matplotlib installed and ``plot``, ``latency.png``)
        into ``directory`` (created if needed); returns the JSON's path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "report.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        if plot:
            from streamgraph.runtime.plot import plot_latency

            plot_latency(self, d / "latency.png")
        return path
