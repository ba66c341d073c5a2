"""Markdown tables of a StreamQA sweep (``streamgraph eval --sweep``) for docs/accuracy.md.

    python bench/streamqa_report.py bench/results/streamqa_sweep/results.json

Prints: reducers x budgets (accuracy, share of full accuracy, token drop, latency) with the
largest drop that keeps >= 95% of full accuracy per reducer; cache policies (KV bytes vs full,
backward-tracing accuracy relative to full); overload policies at 2x capacity (accuracy per
family, frames dropped/degraded).
"""
from __future__ import annotations

import json
import sys

BACKWARD = ("backward", "longrange")


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def fam(r, f):
    return (r.get("families") or {}).get(f, {}).get("accuracy")


def pooled(r, fams):
    n = sum((r.get("families") or {}).get(f, {}).get("n", 0) for f in fams)
    c = sum((r.get("families") or {}).get(f, {}).get("n", 0) * (fam(r, f) or 0) for f in fams)
    return c / n if n else None


def main(path: str) -> int:
    data = json.load(open(path))
    rs = [r for r in data["results"] if "error" not in r and not r.get("partial")]
    errors = [r for r in data["results"] if "error" in r]
    base = next(r for r in rs if r["name"] == "none")
    full_acc, n_tok = base["accuracy"], base["encoder_tokens"]
    m = data["meta"]
    print(f"Suite `{m['suite_name']}`: {m['items']} questions over {m['videos']} videos; machine "
          f"{m['machine']['cpu_count']} cores, load average {m['machine']['loadavg']}, ORT "
          f"{m['machine']['onnxruntime']} ({base.get('intra_op_threads', m['machine'].get('ort_intra_op_threads'))} "
          f"intra-op threads). Baseline `none` (full cache, "
          f"{n_tok} tokens/frame): **{pct(full_acc)}**.\n")

    print("### Reducers x budgets (full cache)\n")
    print("| reducer | budget | tokens/frame | token drop | exact match | % of full | realtime | position | counting | backward | longrange | frame p50 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    reducers = [r for r in rs if r["axes"].get("reducer") not in (None, "none") and "cache" not in r["axes"]
                and "load" not in r["axes"]]
    best: dict[str, tuple] = {}
    for r in sorted(reducers, key=lambda r: (r["axes"]["reducer"], r["tokens_per_frame"] or 0)):
        red = r["axes"]["reducer"]
        drop = 1 - (r["tokens_per_frame"] or 0) / n_tok
        rel = r["accuracy"] / full_acc
        cur = best.get(red, (None,))[0]
        if rel >= 0.95 and (cur is None or drop > cur):
            best[red] = (drop, r["axes"].get("budget", "-"), rel)
        best.setdefault(red, (None, None, None))
        print(f"| {red} | {r['axes'].get('budget', '-')} | {r['tokens_per_frame']:.1f} | {100 * drop:.0f}% | "
              f"{pct(r['accuracy'])} | {100 * rel:.0f}% | " + " | ".join(pct(fam(r, f)) for f in
              ("realtime", "position", "counting", "backward", "longrange")) +
              f" | {r['frame_latency_ms']['p50']:.2f} |")
    print("\n**Largest token drop keeping >= 95% of full accuracy:**\n")
    print("| reducer | largest drop | at budget | % of full |")
    print("|---|---|---|---|")
    for red, (drop, b, rel) in sorted(best.items(), key=lambda kv: -(kv[1][0] or -1)):
        if drop is None:
            print(f"| {red} | none of the budgets | - | - |")
        else:
            print(f"| {red} | {100 * drop:.0f}% | {b} | {100 * rel:.0f}% |")

    print("\n### Cache policies at 25% of full's KV bytes (no reducer)\n")
    print("| policy | KV bytes | vs full | exact match | backward tracing (backward + longrange) | vs full | realtime | position | counting |")
    print("|---|---|---|---|---|---|---|---|---|")
    bt_full = pooled(base, BACKWARD)
    print(f"| full | {base['kv_bytes']:,} | 100% | {pct(base['accuracy'])} | {pct(bt_full)} | 100% | "
          f"{pct(fam(base, 'realtime'))} | {pct(fam(base, 'position'))} | {pct(fam(base, 'counting'))} |")
    for r in [r for r in rs if "cache" in r["axes"]]:
        bt = pooled(r, BACKWARD)
        print(f"| {r['axes']['cache']} | {r['kv_bytes']:,} | {100 * r['kv_bytes'] / base['kv_bytes']:.0f}% | "
              f"{pct(r['accuracy'])} | {pct(bt)} | {100 * bt / bt_full:.0f}% | {pct(fam(r, 'realtime'))} | "
              f"{pct(fam(r, 'position'))} | {pct(fam(r, 'counting'))} |")

    over = [r for r in rs if r["axes"].get("load")]
    if over:
        print(f"\n### Overload at {over[0]['axes']['load']:g}x the measured capacity "
              f"(topk_saliency, budget buckets {over[0]['budgets']})\n")
        print("| overload | exact match | counting | backward tracing | realtime | position | processed | dropped | degraded | capacity fps | replay speed |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in over:
            f = r["frames"]
            print(f"| {r['axes'].get('overload')} | {pct(r['accuracy'])} | {pct(fam(r, 'counting'))} | "
                  f"{pct(pooled(r, BACKWARD))} | {pct(fam(r, 'realtime'))} | {pct(fam(r, 'position'))} | "
                  f"{f['processed']}/{f['sampled']} | {f['dropped']} | {f['degraded']} | {r['capacity_fps']:.0f} | "
                  f"{r['speed']:.0f}x |")
    if errors:
        print("\nVariants that failed: " + "; ".join(f"`{r['name']}`: {r['error']}" for r in errors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/streamqa_sweep/results.json"))
