"""The shipped StreamQA checkpoint through compiled ORT engines vs transformers' own forward.

Generates (or reuses) an evaluation suite from seeds never used in training (>= 1e9), runs
it through ``streamgraph eval``'s path (graphs/streamqa.yaml: full cache, no reducer, ORT with
its default intra-op threads = the machine's cores) and through ``LlavaOnevisionForConditionalGeneration`` (greedy, same
stream), and reports both accuracies and how often the two give the same answer.

    python bench/streamqa_parity.py --suite out/streamqa-eval --episodes 130
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="out/streamqa-eval")
    ap.add_argument("--episodes", type=int, default=130)
    ap.add_argument("--first-seed", type=int, default=1_000_000_000)
    ap.add_argument("--graph", default=str(ROOT / "graphs" / "streamqa.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "streamqa_parity.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from streamgraph.compiler.compile import compile_graph
    from streamgraph.streamqa.evaluate import evaluate_bundle, machine_info
    from streamgraph.streamqa.reference import reference_answers
    from streamgraph.streamqa.suite import load_suite, normalize_answer, write_suite

    suite_dir = Path(args.suite)
    if not (suite_dir / "suite.json").is_file():
        write_suite(suite_dir, range(args.first_seed, args.first_seed + args.episodes), name="streamqa-eval")
    suite = load_suite(suite_dir)
    res = compile_graph(args.graph)
    ckpt = Path(res.bundle.manifest["graph"]["model"]["hf"])
    if not ckpt.is_absolute():                  # relative to the graph file, as the compiler reads it
        ckpt = Path(args.graph).resolve().parent / ckpt
    t0 = time.perf_counter()
    items: list[dict] = []
    ort = evaluate_bundle(res.bundle.path, suite, items_out=items)
    t_ort = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_answers(ckpt, suite, max_new_tokens=res.bundle.plan.max_new_tokens)
    t_ref = time.perf_counter() - t0
    same = [normalize_answer(r["answer"]) == normalize_answer(ref[r["id"]]) for r in items]
    ref_ok = [normalize_answer(ref[r["id"]]) == normalize_answer(r["truth"]) for r in items]
    diff = [{"id": r["id"], "question": r["question"], "ort": r["answer"], "transformers": ref[r["id"]],
             "truth": r["truth"]} for r, s in zip(items, same) if not s]
    out = {"suite": str(suite_dir), "questions": len(items), "videos": len(suite.videos()),
           "seeds": f"[{args.first_seed}, {args.first_seed + args.episodes})",
           "ort_accuracy": ort["accuracy"], "ort_families": ort["families"],
           "transformers_accuracy": sum(ref_ok) / len(ref_ok), "agreement": sum(same) / len(same),
           "disagreements": diff, "ort_seconds": round(t_ort, 1), "transformers_seconds": round(t_ref, 1),
           "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": ort.get("intra_op_threads"),
           "machine": machine_info(), "pid": os.getpid()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(items)} questions / {out['videos']} videos: ORT {100 * ort['accuracy']:.1f}%, transformers "
          f"{100 * out['transformers_accuracy']:.1f}%, same answer {100 * out['agreement']:.1f}% "
          f"({len(diff)} differ) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
