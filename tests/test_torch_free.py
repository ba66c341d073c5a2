"""The runtime and the onnxruntime backend import and run a compiled bundle without torch."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_runtime_runs_bundle_with_torch_unimportable(onnx_bundle, tmp_path):
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None          # any `import torch` now raises ImportError
        try:
            import torch
            raise SystemExit("torch is still importable")
        except ImportError:
            pass
        import streamgraph
        from streamgraph.runtime import Session, sources
        import streamgraph.backends.onnxruntime
        s = streamgraph.Session.open({str(onnx_bundle)!r}, "onnxruntime", overload="none")
        n = 0
        for f in sources.synthetic(6, fps=2, size=(64, 64)):
            rec = s.push_frame(f)
            n += rec.decision == "run"
        answer = "".join(s.ask("What moves?"))
        rep = s.report().save({str(tmp_path)!r})
        leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        leaked = [m for m in leaked if sys.modules[m] is not None]
        print(json.dumps({{"frames": n, "answer_tokens": s.questions[0].new_tokens,
                           "leaked": leaked, "kv": s.kv.nbytes}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["frames"] == 6 and res["answer_tokens"] >= 1 and res["leaked"] == []
    assert res["kv"] == json.loads((onnx_bundle / "manifest.json").read_text())["plan"]["kv"]["bytes"]
    assert (tmp_path / "report.json").is_file()
