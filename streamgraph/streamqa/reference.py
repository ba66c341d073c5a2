"""transformers' own answers to a suite: the parity reference of ``streamgraph eval``
(needs torch + transformers; never imported by the runtime).

For each video, the stream a streamgraph Session builds with the ``full`` cache policy and
every frame run (:func:`streamgraph.streamqa.train.episode_stream`: chat-template prefix,
each question's new frames as LLaVA-OneVision video features closed by ``image_newline``,
the question, the answer, the end of the turn) is run through
``LlavaOnevisionForConditionalGeneration`` — its ``get_video_features`` and its language
model — and answered greedily, each answer fed back before the next question, exactly as
the runtime does with its own answers. Frames are the suite video's frames decoded by PyAV
and preprocessed by the checkpoint's processor settings.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def load_reference_model(ckpt_dir: str | Path):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(str(ckpt_dir)).eval()


def _pixels(ckpt, images: list[np.ndarray]):
    import torch

    from streamgraph.runtime.pipeline import preprocess_frame

    p = ckpt.preprocessor
    return torch.from_numpy(np.concatenate([
        preprocess_frame(im, p["size"], p["image_mean"], p["image_std"], p["resample"], p["rescale_factor"])
        for im in images]))


def reference_answers(ckpt_dir: str | Path, suite, max_new_tokens: int = 8, model=None,
                      videos: list[str] | None = None, fps: float = 2.0) -> dict[str, str]:
    """``{item id: transformers' greedy answer}`` for every item of ``suite`` (or of
    ``videos``), questions of a video asked in ``ask_time`` order on one growing stream;
    frames sampled at ``fps`` (the graph's ``stream.fps``)."""
    import torch
    from tokenizers import Tokenizer

    from streamgraph.models.hf import open_checkpoint, prompt_format
    from streamgraph.runtime import sources
    from streamgraph.streamqa.scene import last_frame_before

    ckpt = open_checkpoint(ckpt_dir)
    fmt = prompt_format(ckpt)
    tok = Tokenizer.from_file(str(ckpt.tokenizer_file))
    stop = set(fmt["stop_token_ids"])
    model = model or load_reference_model(ckpt_dir)
    emb = model.model.get_input_embeddings()

    def encode(text):
        return tok.encode(text, add_special_tokens=False).ids

    def text_embeds(ids):
        return emb(torch.tensor(ids, dtype=torch.long))

    out: dict[str, str] = {}
    groups = suite.by_video()
    for video in videos or list(groups):
        its = groups[video]
        frames = list(sources.video(suite.path / video, fps=fps))
        with torch.no_grad():
            seq = [text_embeds(encode(fmt["prefix"]))]
            shown = 0
            for it in its:
                upto = last_frame_before(it.ask_time, fps, len(frames))
                seg = frames[shown:upto + 1]
                if seg:
                    pix = _pixels(ckpt, [f.image for f in seg])
                    feats = model.model.get_video_features(pix[None], vision_feature_layer=-1,
                                                           vision_feature_select_strategy="full").pooler_output[0]
                    seq.append(feats)                     # frames' tokens, then image_newline
                shown = max(shown, upto + 1)
                seq.append(text_embeds(encode(f"{fmt['before_question']}{it.question}{fmt['after_question']}")))
                answer: list[int] = []
                while len(answer) < max_new_tokens:
                    x = torch.cat(seq)[None]
                    h = model.model.language_model(inputs_embeds=x).last_hidden_state[:, -1]
                    nxt = int(model.lm_head(h).argmax(-1))
                    if nxt in stop:
                        break
                    answer.append(nxt)
                    seq.append(text_embeds([nxt]))
                out[it.id] = tok.decode(answer)
                seq.append(text_embeds(encode(fmt["after_answer"])))
    return out
