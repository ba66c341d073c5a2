"""The StreamQA training script: a step-scheduled run is bit-reproducible from its seed, and
what it writes is a checkpoint the normal compile path opens (the full 28-minute run is a
script, see docs/accuracy.md)."""
from __future__ import annotations

import hashlib
import json


def _run(out):
    from streamgraph.streamqa.train import main

    assert main(["--out", str(out), "--schedule", "steps", "--max-steps", "3", "--batch", "2", "--val", "2",
                 "--eval-every", "100", "--start-frames", "3"]) == 0
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_step_schedule_is_reproducible_and_loadable(tmp_path):
    from streamgraph.models.hf import open_checkpoint, prompt_format
    from streamgraph.streamqa.train import VISION

    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert a == b
    meta = json.loads((tmp_path / "a" / "training.json").read_text())
    assert meta["steps"] == 3 and meta["threads"] == 1 and meta["schedule"] == "steps"
    ckpt = open_checkpoint(tmp_path / "a")
    assert ckpt.cfg.vision.image_size == (VISION["image_size"],) * 2 and ckpt.cfg.encoder_tokens == 16
    fmt = prompt_format(ckpt)
    assert fmt["after_answer"].startswith("<|im_end|>") and fmt["stop_token_ids"]
