"""Hugging Face LLaVA-OneVision checkpoints: loader, compiled engines and sessions vs transformers.

The reference is transformers' own ``LlavaOnevisionForConditionalGeneration`` (eager
attention) run on the token sequence a streamgraph session processes: the prompt pieces
rendered from the checkpoint's chat template, ``<video>`` placeholders where the frames go
(transformers scatters its video features — pooled frame tokens plus ``image_newline`` — into
them) and the answer tokens the session decoded.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from streamgraph.errors import BundleError, StreamgraphError  # noqa: E402
from streamgraph.models import hf  # noqa: E402
from streamgraph.runtime.pipeline import preprocess_frame  # noqa: E402
from streamgraph.runtime.session import Session  # noqa: E402
from tests.conftest import HF_TEXT, HF_TOKENS_PER_FRAME, frames, write_hf_checkpoint, write_hf_graph  # noqa: E402

K = HF_TOKENS_PER_FRAME


def _pixels(session: Session, frame_list) -> torch.Tensor:
    p = session.plan
    return torch.from_numpy(np.concatenate([
        preprocess_frame(f.image, p.image_size, p.image_mean, p.image_std, p.resample, p.rescale_factor)
        for f in frame_list]))


def _hf_logits(model, ids: list[int], videos: list[torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values_videos=torch.stack(videos))
    return out.logits[0].numpy()


def _stream(session: Session, clips, questions):
    """Frames of clip i, then question i; returns the ids of the whole stream as transformers
    sees them (video placeholders included)."""
    fmt, vid = session._format, session.bundle.manifest["prompt"]["video_token_id"]
    ids = session._encode(fmt["prefix"])
    for clip, q in zip(clips, questions):
        for f in clip:
            session.push_frame(f)
        "".join(session.ask(q))
        ids += [vid] * (len(clip) * K + 1)
        ids += session._encode(fmt["before_question"] + q + fmt["after_question"])
        ids += session._answer_ids + session._encode(fmt["after_answer"])
    return ids


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_session_logits_match_transformers(hf_checkpoint, hf_onnx_bundle, backend):
    """Prefix, every frame, the video-closing image_newline, question prefill, token-by-token
    decode and the turn resume, over two user turns: logits of the ORT engines and of the eager
    torch modules agree with transformers within 1e-4."""
    _, ref_model = hf_checkpoint
    clip_a, clip_b = frames(3, size=(48, 64), seed=1), frames(3, size=(48, 64), seed=2)
    s = Session.open(hf_onnx_bundle, backend, overload="none", trace=True)
    ids = _stream(s, [clip_a, clip_b], ["What moves?", "And now?"])
    ref = _hf_logits(ref_model, ids, [_pixels(s, clip_a), _pixels(s, clip_b)])
    kinds = [t["kind"] for t in s.trace]
    assert kinds.count("frame") == 6 and kinds.count("video_end") == 2 and kinds.count("decode") >= 6
    pos, worst = 0, 0.0
    for step in s.trace:
        pos += step["n_valid"]
        err = float(np.abs(step["logits"] - ref[pos - 1]).max())
        worst = max(worst, err)
        assert err < 1e-4, f"{step['kind']} step ending at token {pos}: max |logits diff| {err:.3g}"
        if step["kind"] == "decode":       # the session's greedy choice is transformers' too
            assert int(np.argmax(ref[pos - 1])) == int(np.argmax(step["logits"]))
    assert pos == len(ids)
    assert ref.std() > 0.3                 # logits are O(1): 1e-4 is a tight bound
    # the comparison has teeth: the same stream with the two clips swapped is far off
    swapped = _hf_logits(ref_model, ids, [_pixels(s, clip_b), _pixels(s, clip_a)])
    first_q = next(i for i, t in enumerate(s.trace) if t["kind"] == "question")
    q_pos = sum(t["n_valid"] for t in s.trace[:first_q + 1])
    assert np.abs(s.trace[first_q]["logits"] - swapped[q_pos - 1]).max() > 1e-2


def test_encoder_features_match_get_video_features(hf_checkpoint, hf_onnx_bundle):
    """Per frame, the eager encoder module and the ORT vision_encoder engine emit exactly
    transformers' video features (hidden_states[-2] -> projector -> 2x2 bilinear pooling);
    the video-closing embedding is transformers' image_newline."""
    from streamgraph.backends.onnxruntime import OnnxRuntimeBackend
    from streamgraph.compiler.bundle import Bundle

    path, ref_model = hf_checkpoint
    px = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_model.model.get_video_features(px[None]).pooler_output[0]      # [4*K + 1, C]
        ours = hf.load_model(hf.open_checkpoint(path))
        eager = ours.vision_encoder()(px)
    assert eager.shape == (4, K, 64)
    np.testing.assert_allclose(eager.reshape(-1, 64).numpy(), ref[:-1].numpy(), atol=1e-5, rtol=0)
    ort = OnnxRuntimeBackend(Bundle.load(hf_onnx_bundle))
    for i in range(4):
        got = ort.run("vision_encoder", {"pixel_values": px[i:i + 1].numpy()})["visual_tokens"][0]
        np.testing.assert_allclose(got, ref[i * K:(i + 1) * K].numpy(), atol=1e-5, rtol=0)
    newline = np.load(hf_onnx_bundle / "image_newline.npy")
    np.testing.assert_array_equal(newline, ref[-1].numpy())
    assert np.abs(newline).max() > 0.05                          # perturbed, not the zero init


def _copy_aux(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if not p.name.endswith(".safetensors") and p.name != hf.INDEX_FILE:
            shutil.copy(p, dst / p.name)


def test_sharded_and_legacy_layouts_load_identically(hf_checkpoint, tmp_path):
    """A sharded save_pretrained, the hub's transformers-4 layout (vision_tower.vision_model.*)
    and transformers-5 module names (model.*, lm_head.*) load to the same tensors, and those
    are transformers' own parameters."""
    from safetensors.torch import load_file, save_file

    path, ref_model = hf_checkpoint
    saved = load_file(str(path / "model.safetensors"))
    # what transformers 5.23's save_pretrained writes here
    assert {k.split(".")[0] for k in saved} == {"vision_tower", "multi_modal_projector", "image_newline",
                                                 "language_model"}
    assert any(k.startswith("language_model.model.") for k in saved) and "language_model.lm_head.weight" in saved

    sharded = tmp_path / "sharded"
    ref_model.save_pretrained(sharded, max_shard_size="60KB")
    _copy_aux(path, sharded)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 3 and (sharded / hf.INDEX_FILE).is_file()

    def rewrite(name, rename):
        d = tmp_path / name
        _copy_aux(path, d)
        save_file({rename(k): v for k, v in saved.items()}, str(d / "model.safetensors"))
        return d

    hub = rewrite("hub", lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    v5 = rewrite("v5", lambda k: "lm_head.weight" if k == "language_model.lm_head.weight"
                 else "model." + k.replace("language_model.model.", "language_model.", 1))
    base = hf.load_model(hf.open_checkpoint(path)).state_dict()
    for d in (sharded, hub, v5):
        ckpt = hf.open_checkpoint(d)
        sd = hf.load_model(ckpt).state_dict()
        assert sd.keys() == base.keys()
        for k in base:
            assert torch.equal(sd[k], base[k]), (d.name, k)
    assert hf.open_checkpoint(sharded).files[1] == hf.INDEX_FILE
    hf_params = dict(ref_model.named_parameters())
    pairs = {"language_model.layers.1.self_attn.k_proj.bias": "model.language_model.layers.1.self_attn.k_proj.bias",
             "vision_tower.encoder.layers.1.layer_norm2.weight": "model.vision_tower.encoder.layers.1.layer_norm2.weight",
             "multi_modal_projector.linear_1.bias": "model.multi_modal_projector.linear_1.bias",
             "lm_head.weight": "lm_head.weight", "image_newline": "model.image_newline"}
    for ours, theirs in pairs.items():
        assert torch.equal(base[ours], hf_params[theirs].detach()), ours
    # vision_feature_layer=-2 of 3 layers: the last SigLIP layer is never built nor loaded
    assert not any(k.startswith("vision_tower.encoder.layers.2.") for k in base)


def test_tied_bf16_checkpoint_with_template_in_tokenizer_config(tmp_path):
    """Tied embeddings (no lm_head in the file), bf16 tensors, the chat template inside
    tokenizer_config.json: eager decoder logits equal transformers'."""
    from streamgraph.kv import FullCache, KVBuffer

    d = tmp_path / "tied"
    text = dict(HF_TEXT, tie_word_embeddings=True)
    write_hf_checkpoint(d, text=text, dtype="bfloat16", template_file="tokenizer_config.json",
                        vision_feature_layer=-1, return_model=False)
    ref_model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager").eval()
    ckpt = hf.open_checkpoint(d)
    assert ckpt.cfg.text.tie_word_embeddings and ckpt.chat_template_file == "tokenizer_config.json"
    model = hf.load_model(ckpt)
    assert model.lm_head.weight is model.language_model.embed_tokens.weight
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits[0]
        x = ckpt.cfg.text
        kv = KVBuffer([x.num_hidden_layers, 2, 1, x.num_key_value_heads, 16, x.head_dim])
        pol, step = FullCache(16), model.decoder_step()
        emb = model.language_model.embed_tokens(ids)
        for a, b in [(0, 8)] + [(i, i + 1) for i in range(8, 12)]:
            plan = pol.plan_step(b - a, b - a)
            logits, new_kv, *_ = step(emb[:, a:b], torch.from_numpy(plan.positions[None]),
                                     torch.ones(1, b - a, dtype=torch.bool), torch.from_numpy(kv.data),
                                     torch.from_numpy(plan.cache_positions[None]),
                                     torch.from_numpy(plan.cache_valid[None]))
            kv.write(new_kv.numpy(), plan.write_slots)
            pol.commit(plan)
            assert (logits[0] - ref[b - 1]).abs().max() < 1e-4


def test_prompt_format_is_what_apply_chat_template_renders(hf_checkpoint):
    """The session's prompt pieces concatenate to transformers' apply_chat_template output for
    a video question (with the generation prompt) and for the turn that follows an answer, and
    tokenize to the same ids. (This template renders a past assistant turn as ``assistant \n``
    but prompts generation with ``assistant\n``; a session keeps what it actually fed, as
    ``generate`` with a KV cache would.)"""
    path, _ = hf_checkpoint
    ckpt = hf.open_checkpoint(path)
    fmt = hf.prompt_format(ckpt)
    tok = transformers.AutoTokenizer.from_pretrained(path)

    def user(q):
        return {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}

    first = tok.apply_chat_template([user("What moves?")], tokenize=False, add_generation_prompt=True)
    assert first == fmt["prefix"] + "<video>" + fmt["before_question"] + "What moves?" + fmt["after_question"]
    conv = [user("What moves?"), {"role": "assistant", "content": [{"type": "text", "text": "a car"}]},
            user("Where?")]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    after = text[text.index("a car") + len("a car"):]
    assert after == fmt["after_answer"] + "<video>" + fmt["before_question"] + "Where?" + fmt["after_question"]
    assert fmt["prefix"] == "<|im_start|>user " and fmt["after_answer"].startswith("<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in fmt["stop_token_ids"]
    from tokenizers import Tokenizer

    rt = Tokenizer.from_file(str(path / "tokenizer.json"))
    pieces = [fmt["prefix"], "<video>", fmt["before_question"] + "What moves?" + fmt["after_question"]]
    piecewise = sum((rt.encode(p, add_special_tokens=False).ids for p in pieces), [])
    whole = tok(fmt["prefix"] + "<video>" + fmt["before_question"] + "What moves?" + fmt["after_question"],
                add_special_tokens=False)["input_ids"]
    assert piecewise == whole


def test_float16_engines_run_on_onnxruntime_cpu(hf_checkpoint, tmp_path):
    """float16 vision encoder and decoder step exported from the checkpoint run on ONNX
    Runtime's CPU provider and stay close to transformers' float32 logits."""
    import onnxruntime as ort

    from streamgraph.compiler.lower import engine_weight_bytes, export_engine
    from streamgraph.compiler.plan import make_plan

    path, ref_model = hf_checkpoint
    ckpt = hf.open_checkpoint(path)
    model = hf.load_model(ckpt, dtype="float16")
    assert model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    plan = make_plan(cfg=ckpt.cfg, reducer=None, tokens_per_frame=K, cache={"op": "full", "params": {"capacity_tokens": 32}},
                     prefill_chunk_tokens=16, max_new_tokens=1, budget_mb=64,
                     engine_weight_bytes=engine_weight_bytes(model, None), dtype="float16")
    assert plan.kv.dtype == "float16" and plan.kv.bytes == 2 * 2 * 2 * 32 * 16 * 2
    mods = {"vision_encoder": model.vision_encoder(), "decoder_step": model.decoder_step()}
    sess = {}
    for name, m in mods.items():
        export_engine(m, plan.engines[name], tmp_path)
        sess[name] = ort.InferenceSession(str(tmp_path / plan.engines[name].file), providers=["CPUExecutionProvider"])
    px = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    feats = sess["vision_encoder"].run(None, {"pixel_values": px.numpy().astype(np.float16)})[0]
    assert feats.dtype == np.float16
    ids = [3, 4, 5] + [ckpt.video_token_id] * (K + 1) + [6, 7]
    with torch.no_grad():
        ref_feats = ref_model.model.get_video_features(px[None]).pooler_output[0]
        ref = ref_model(input_ids=torch.tensor([ids]), pixel_values_videos=px[None]).logits[0].numpy()
        emb = model.language_model.embed_tokens(torch.tensor([ids])).numpy()
    np.testing.assert_allclose(feats[0].astype(np.float32), ref_feats[:-1].numpy(), atol=2e-2, rtol=0)
    emb[0, 3:3 + K] = feats[0]
    emb[0, 3 + K] = model.image_newline.detach().numpy()
    t = len(ids)
    logits = sess["decoder_step"].run(None, {
        "inputs_embeds": emb, "positions": np.arange(t)[None], "token_valid": np.ones((1, t), bool),
        "kv_cache": np.zeros(plan.kv.shape, np.float16), "cache_positions": np.zeros((1, 32), np.int64),
        "cache_valid": np.zeros((1, 32), bool), "window_valid": np.zeros((1, 32), bool),
        "streaming_heads": np.zeros((plan.kv.shape[0], plan.kv.shape[3]), bool)})[0]
    assert logits.dtype == np.float32
    err = np.abs(logits[0] - ref[-1]).max()
    assert err < 2e-2 * max(1.0, np.abs(ref[-1]).max()), err


def test_bundle_hashes_external_data_and_checkpoint_drives_the_lock_key(hf_checkpoint, hf_onnx_bundle, tmp_path):
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.compiler.compile import compile_graph

    man = json.loads((hf_onnx_bundle / "manifest.json").read_text())
    data_files = [f for f in man["files"] if f.endswith(".onnx.data")]
    assert len(data_files) == 3 and "weights.safetensors" not in man["files"]
    assert man["prompt"]["video_end_embedding"] == "image_newline.npy"
    assert man["plan"]["resample"] == "bicubic_aa" and man["plan"]["encoder_grid"] == [3, 3]
    copy = tmp_path / "copy"
    shutil.copytree(hf_onnx_bundle, copy)
    blob = bytearray((copy / data_files[0]).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (copy / data_files[0]).write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="sha256 does not match"):
        Bundle.load(copy)

    # lock key: a torch-target bundle of a private copy of the checkpoint
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[0], ckpt)
    graph = write_hf_graph(tmp_path, ckpt.name, name="lk")
    out = tmp_path / "b"
    first = compile_graph(graph, out, target="torch")
    assert first.rebuilt and not compile_graph(graph, out, target="torch").rebuilt
    assert set(first.bundle.manifest["model"]["checkpoint"]["files"]) >= {
        "config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "video_preprocessor_config.json"}
    Session.open(out, "torch")                                       # reference reads the checkpoint
    w = ckpt / "model.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-3] ^= 0x01                                                 # one weight changes
    w.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="changed since the bundle was compiled"):
        Session.open(out, "torch")
    again = compile_graph(graph, out, target="torch")
    assert again.rebuilt and again.bundle.lock_key != first.bundle.lock_key
    (ckpt / "chat_template.jinja").write_text((ckpt / "chat_template.jinja").read_text() + "\n")
    assert compile_graph(graph, out, target="torch").rebuilt


def _broken(src, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def test_checkpoint_errors_are_one_line_and_precise(hf_checkpoint, tmp_path):
    src = hf_checkpoint[0]

    def err(d, cls=hf.CheckpointError):
        with pytest.raises(cls) as info:
            hf.load_model(hf.open_checkpoint(d), device="meta")
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(str(d))
        return msg

    assert "does not exist" in err(tmp_path / "nowhere")
    d = _broken(src, tmp_path, "noconfig")
    (d / "config.json").unlink()
    assert "config.json missing" in err(d)
    d = _broken(src, tmp_path, "pickle")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    msg = err(d, hf.PickleWeightsError)
    assert "pytorch_model.bin" in msg and "safetensors only" in msg
    for name, edit, cls, text in [
        ("llava", lambda c: c.update(model_type="llava"), hf.UnsupportedModelError,
         "unsupported model_type 'llava' in config.json (supported: llava_onevision with vision "
         "siglip_vision_model and text qwen2)"),
        ("llama", lambda c: c["text_config"].update(model_type="llama"), hf.UnsupportedModelError,
         "text_config.model_type is 'llama'"),
        ("select", lambda c: c.update(vision_feature_select_strategy="default"), hf.UnsupportedModelError,
         "needs the full patch grid"),
        ("rope", lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
         hf.UnsupportedModelError, "RoPE type 'yarn'"),
        ("shape", lambda c: c["text_config"].update(intermediate_size=96), hf.CheckpointError,
         "mlp.down_proj.weight' has shape [64, 128] but config.json implies [64, 96]"),
        ("vocab", lambda c: c["text_config"].update(vocab_size=200), hf.CheckpointError,
         "tokenizer has token id 260 but the model's vocab_size is 200"),
    ]:
        d = _broken(src, tmp_path, name)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        assert text in err(d, cls), name
    d = _broken(src, tmp_path, "notok")
    (d / "tokenizer.json").unlink()
    assert "tokenizer.json missing" in err(d)
    d = _broken(src, tmp_path, "notemplate")
    (d / "chat_template.jinja").unlink()
    assert "no chat template" in err(d)
    d = tmp_path / "shardmissing"
    hf_checkpoint[1].save_pretrained(d, max_shard_size="60KB")
    _copy_aux(src, d)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert f"lists 1 missing shard(s): {victim.name}" in err(d)
    assert issubclass(hf.CheckpointError, StreamgraphError)


def test_cli_reports_checkpoint_errors_located_in_the_graph(hf_checkpoint, tmp_path, capsys):
    from streamgraph.cli import main

    d = _broken(hf_checkpoint[0], tmp_path, "pk")
    (d / "model.safetensors").rename(d / "model.pt")
    graph = write_hf_graph(tmp_path, d.name, name="pk")
    assert main(["validate", str(graph)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {graph}:3:13: model.hf: {d}: only pickle weights found (model.pt)")
    assert "\n" not in err
    ok = write_hf_graph(tmp_path, hf_checkpoint[0], name="ok", extra="")
    bad_size = ok.read_text().replace("stream: {fps: 2}", "stream: {fps: 2, frame_size: [64, 64]}")
    ok.write_text(bad_size)
    assert main(["validate", str(ok)]) == 1
    assert ("stream.frame_size: the checkpoint's vision tower takes 40x40 frames (video_preprocessor_config.json)"
            in capsys.readouterr().err)


# ------------------------------------------------------------------ real sizes, no weights
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                     image_size=384, patch_size=14, vision_use_head=False)


def _sparse_checkpoint(path, vision: dict, text: dict, shards: int = 4):
    """A checkpoint whose safetensors files have the real headers (tensor names and shapes
    from transformers' own model built on the meta device, bf16) and sparse, never-written data:
    it takes no disk space and cannot be loaded — only planned. Returns the {name: shape}."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    from streamgraph.models.hf_random import QWEN2_SPECIAL_IDS, write_aux_files

    path.mkdir(parents=True)
    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text),
                               image_token_index=QWEN2_SPECIAL_IDS["<image>"],
                               video_token_index=QWEN2_SPECIAL_IDS["<video>"])
    cfg.save_pretrained(path)
    with torch.device("meta"):
        model = transformers.LlavaOnevisionForConditionalGeneration(cfg)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    names = list(shapes)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for n in part:
            size = 2 * int(np.prod(shapes[n]))
            header[n] = {"dtype": "BF16", "shape": shapes[n], "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[n] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            f.truncate(8 + len(blob) + offset)                     # sparse: no data written
    (path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_aux_files(path, image_size=vision["image_size"], special_ids=QWEN2_SPECIAL_IDS)
    return shapes


def test_validate_plans_a_7b_checkpoint_on_the_meta_device(tmp_path, capsys):
    """`streamgraph validate` of LLaVA-OneVision-7B shapes reads only safetensors headers: the
    plan's weight bytes are transformers' parameter count (minus what LLaVA-OV never runs) in
    float16, and the process does not grow by anything near the 16 GB of weights."""
    import resource

    from streamgraph.cli import main
    from streamgraph.compiler.compile import check_graph

    shapes = _sparse_checkpoint(tmp_path / "llava-ov-7b", SIGLIP_SO400M, QWEN2_7B)
    graph = tmp_path / "g7b.yaml"
    graph.write_text(write_hf_graph(tmp_path, "llava-ov-7b", name="g7b", extra=", dtype: float16").read_text()
                     .replace("{op: full, capacity_tokens: 256}", "{op: sink_window, sink_tokens: 16, window_tokens: 8176}")
                     .replace("memory_mb: 512", "memory_mb: 24000"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checked = check_graph(graph, build_weights=False)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    plan = checked.plan
    unused = [n for n in shapes if n.endswith("image_newline") or ".post_layernorm." in n]
    n_params = sum(int(np.prod(s)) for n, s in shapes.items() if n not in unused)
    buffers = 729 * 8 + 64 * 4                 # SigLIP position_ids (int64), RoPE inv_freq (fp32)
    assert plan.memory.weights_bytes == 2 * n_params + buffers                # 15.9 GB in fp16
    assert 7.9e9 < n_params < 8.1e9
    assert plan.encoder_tokens == 196 and plan.encoder_grid == [14, 14] and plan.image_size == [384, 384]
    assert plan.kv.shape == [28, 2, 1, 4, 8192, 128] and plan.kv.bytes == 28 * 2 * 4 * 8192 * 128 * 2
    assert next(p for p in checked.model.parameters()).is_meta
    assert grown_mb < 1000, f"validate grew the process by {grown_mb:.0f} MiB"
    assert main(["validate", str(graph)]) == 0
    out = " ".join(capsys.readouterr().out.split())        # rich wraps at the terminal width
    assert "196 -> 196 tokens/frame" in out and "sink_window (8192 slots, KV 448.00 MiB)" in out
    graph.write_text(graph.read_text().replace("memory_mb: 24000", "memory_mb: 8000"))
    assert main(["validate", str(graph)]) == 1
    assert "budget.memory_mb: plan needs" in capsys.readouterr().err


def test_example_graph_validates_against_a_checkpoint_at_its_path(hf_checkpoint, tmp_path):
    """graphs/llava_onevision_hf.yaml, with a (tiny) checkpoint where it expects one."""
    from tests.conftest import REPO
    from streamgraph.compiler.compile import check_graph

    example = REPO / "graphs" / "llava_onevision_hf.yaml"
    graph = tmp_path / "graphs" / example.name
    graph.parent.mkdir()
    graph.write_text(example.read_text())
    with pytest.raises(hf.CheckpointError, match=rf"{graph}:\d+:\d+: model.hf: .*checkpoint directory does not exist"):
        check_graph(graph, build_weights=False)
    shutil.copytree(hf_checkpoint[0], tmp_path / "checkpoints" / "llava-onevision-qwen2-0.5b-ov-hf")
    checked = check_graph(graph, build_weights=False)
    assert checked.plan.encoder_tokens == K and checked.plan.cache["capacity"] == 4100


def test_hf_bundle_runs_with_torch_unimportable(hf_onnx_bundle):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None
        from streamgraph.runtime import Session, sources
        s = Session.open({str(hf_onnx_bundle)!r}, overload="none", trace=True)
        for f in sources.synthetic(3, fps=2, size=(48, 64)):
            s.push_frame(f)
        answer = "".join(s.ask("What moves?"))
        leaked = [m for m in sys.modules if (m == "torch" or m.startswith("torch.")) and sys.modules[m] is not None]
        print(json.dumps({{"kinds": [t["kind"] for t in s.trace], "tokens": s.questions[0].new_tokens,
                           "leaked": leaked}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["leaked"] == [] and res["tokens"] >= 1
    assert res["kinds"].count("frame") == 3 and res["kinds"].count("video_end") == 1


def _save_processor(src, dst, layout: str):
    """The tiny checkpoint at ``dst`` with its processor saved by transformers 5.23 itself:
    ``nested`` = ``LlavaOnevisionProcessor.save_pretrained`` (one ``processor_config.json``
    with ``image_processor`` and ``video_processor`` nested in it, no preprocessor files);
    ``nested_image`` = the same file holding only ``image_processor`` (a processor saved
    without a video processor); ``separate`` = each processor's own ``save_pretrained``
    (``preprocessor_config.json`` + ``video_preprocessor_config.json``). The image and the video
    processor get different settings, so the test sees which one was read."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    _copy_aux(src, dst)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja"):
        (dst / name).unlink()
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    size = {"height": 40, "width": 40}
    image = LlavaOnevisionImageProcessorPil(size=size, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4],
                                            resample=2)
    video = LlavaOnevisionVideoProcessor(size=size, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.25, 0.35],
                                         resample=3, rescale_factor=1 / 127.5)
    if layout == "separate":
        image.save_pretrained(dst)
        video.save_pretrained(dst)
        (dst / "chat_template.jinja").write_text((src / "chat_template.jinja").read_text())
        return
    tok = PreTrainedTokenizerFast.from_pretrained(src)

    class Processor(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, name, arg):
            # transformers looks the video processor class up in a registry that is a stub
            # without torchvision; the object is transformers' own LlavaOnevisionVideoProcessor
            if name == "video_processor" and isinstance(arg, BaseVideoProcessor):
                return BaseVideoProcessor
            return super().check_argument_for_proper_class(name, arg)

    Processor.__name__ = "LlavaOnevisionProcessor"
    Processor(image_processor=image, tokenizer=tok, video_processor=video,
              chat_template=(src / "chat_template.jinja").read_text()).save_pretrained(dst)
    assert not (dst / "preprocessor_config.json").exists() and not (dst / "video_preprocessor_config.json").exists()
    if layout == "nested_image":
        cfg = json.loads((dst / "processor_config.json").read_text())
        del cfg["video_processor"]
        (dst / "processor_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("layout", ["nested", "nested_image", "separate"])
def test_processor_saved_in_either_layout_loads_transformers_settings(hf_checkpoint, tmp_path, layout):
    from transformers import LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    d = tmp_path / layout
    _save_processor(hf_checkpoint[0], d, layout)
    ckpt = hf.open_checkpoint(d)
    # the reference: what transformers' own processor loads from that directory (the video
    # processor where there are video settings, else the image processor)
    ref_cls = LlavaOnevisionImageProcessorPil if layout == "nested_image" else LlavaOnevisionVideoProcessor
    ref = ref_cls.from_pretrained(d)
    cfg = ckpt.cfg
    assert cfg.vision.image_size == (ref.size.height, ref.size.width)
    assert list(cfg.image_mean) == pytest.approx(list(ref.image_mean), abs=0)
    assert list(cfg.image_std) == pytest.approx(list(ref.image_std), abs=0)
    assert cfg.rescale_factor == ref.rescale_factor
    assert cfg.resample == {2: "bilinear_aa", 3: "bicubic_aa"}[int(ref.resample)]
    assert ckpt.preprocessor_file.split(" ")[0] in ckpt.files            # hashed into the lock key
    assert (list(cfg.image_mean) == [0.4, 0.5, 0.6]) == (layout == "nested_image")
