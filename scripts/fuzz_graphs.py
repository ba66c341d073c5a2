#!/usr/bin/env python
"""Fuzz ``streamgraph validate`` with mutated graph files.

Every case starts from a valid graph document (the files in ``graphs/`` and seeds that cover
every op), applies one to four random mutations, writes the result to a file and runs the
exact code path of ``streamgraph validate`` on it (:func:`streamgraph.compiler.compile.
check_graph` with ``build_weights=False``: spec -> graph -> plan, no export). Each case ends
in one of:

- ``valid``: the mutated file is a valid graph;
- ``located``: a :class:`~streamgraph.errors.StreamgraphError` whose message is one printable
  line starting ``FILE:LINE:COL: `` (FILE the graph file);
- ``unlocated``: a StreamgraphError without ``LINE:COL`` or with more than one line;
- ``internal``: any other exception (what the CLI would print as ``internal error``), or a
  worker that died;
- ``hang``: no answer within ``--timeout`` seconds.

Mutations (:func:`make_case`): on the document tree, delete a key, replace a value by an
extreme one (huge, negative, NaN, infinity, zero, float, boolean, string, null, list,
mapping), perturb a number, wrap or unwrap a value (wrong nesting), rename a key (random
unicode, reserved or too long names), add an unknown key, change an op or a reference, copy
or swap subtrees; on the text, duplicate or delete a line (duplicate keys), YAML anchors and
aliases (an alias bomb too), merge keys, tags, very deep nesting, an empty or non-mapping
document, several documents, control and random unicode characters, binary bytes, invalid
UTF-8 and truncation.

Long mode (the issue's campaign; a JSON summary with counts and every failing case)::

    python scripts/fuzz_graphs.py --cases 10000 --seed 0 --out fuzz-summary.json

Cases run in a worker process (restarted after a hang or a crash), so a hang inside C code
is caught too. ``tests/test_fuzz_graph.py`` drives the same mutations with hypothesis, in
process, for a bounded number of examples.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KINDS = ("valid", "located", "unlocated", "internal", "hang")

# --------------------------------------------------------------------------- seeds

_TINY = """\
version: 1
name: {name}
model: {{preset: tiny, seed: 0}}
stream: {{fps: 2, frame_size: [64, 64]}}
nodes:
  encoder: {encoder}
  reducer: {reducer}
  cache:   {cache}
  llm:     {{op: decoder, input: [reducer, query], cache: cache, max_new_tokens: 8, prefill_chunk_tokens: 32}}
slo: {{frame_deadline_ms: 250, ttft_ms: 500, overload: {overload}}}
budget: {{memory_mb: 512}}
"""

_EXTRA_SEEDS = {
    "dtd-rekv": _TINY.format(
        name="dtd-rekv", encoder="{op: stc_cacher, update_ratio: 0.25, refresh_every: 2, skip_threshold: 0.01}",
        reducer="{op: dtd, input: encoder, tokens_per_frame: [8, 16], threshold: 0.9, mode: absolute, "
                "positions: keep}",
        cache="{op: rekv, init_tokens: 16, local_tokens: 128, topk: 4, question_tokens: 64, store_mb: 1.5}",
        overload="degrade"),
    "tome-carrier": _TINY.format(
        name="tome-carrier", encoder="{op: vision_encoder, input: frames}",
        reducer="{op: tome, input: encoder, tokens_per_frame: 16, positions: keep}",
        cache="{op: carrier, sink_tokens: 32, carriers: 16, question_tokens: 64}", overload="latest_only"),
    "stc-streamingvlm": _TINY.format(
        name="stc-streamingvlm", encoder="{op: vision_encoder}",
        reducer="{op: stc_pruner, input: encoder, tokens_per_frame: [8, 16, 32], scoring: dual_anchor, "
                "channel_keep_ratio: 0.5, alpha: 0.3}",
        cache="{op: streaming_vlm, sink_tokens: 32, text_window_tokens: 64, vision_window_seconds: 2.5}",
        overload="fifo"),
    "pool-full": _TINY.format(
        name="pool-full", encoder="{op: vision_encoder}", reducer="{op: pool, input: encoder}",
        cache="{op: full, capacity_tokens: 256}", overload="drop_late"),
    "none-sinkwindow": _TINY.format(
        name="none-sinkwindow", encoder="{op: vision_encoder}", reducer="{op: none, input: encoder}",
        cache="{op: sink_window, sink_tokens: 4, window_tokens: 128}", overload="none"),
    "rekv-blocks": _TINY.format(
        name="rekv-blocks", encoder="{op: vision_encoder}",
        reducer="{op: topk_saliency, input: encoder, tokens_per_frame: 16, positions: keep}",
        cache="{op: rekv, block_tokens: 8, store_blocks: 32, local_tokens: 64}", overload="drop_late"),
    "streamingvlm-frames": _TINY.format(
        name="svlm-frames", encoder="{op: vision_encoder}",
        reducer="{op: dtd, input: encoder, tokens_per_frame: 8, mode: relative, threshold: 0.5}",
        cache="{op: streaming_vlm, vision_window_frames: 4}", overload="drop_late"),
    "block-style": """\
version: 1
name: block-style
model:
  preset: small
  seed: 7
  dtype: float16
stream:
  fps: 0.5
  frame_size:
    - 224
    - 224
nodes:
  encoder:
    op: vision_encoder
    input: frames
  pruner:
    op: topk_saliency
    input: encoder
    tokens_per_frame:
      - 32
      - 64
    positions: compact
  cache: &cache
    op: sink_window
    sink_tokens: 4
    window_tokens: 512
  llm:
    op: decoder
    input:
      - pruner
      - query
    cache: cache
    max_new_tokens: 16
    prefill_chunk_tokens: 64
slo:
  frame_deadline_ms: 400
  ttft_ms: 1000.5
  overload: degrade
budget:
  memory_mb: 1024
""",
}


def _absolute_hf(text: str, base: Path) -> str:
    """``hf: REL`` paths made absolute (relative to ``base``), so the seed works from any
    directory."""
    def repl(m: re.Match) -> str:
        path = m.group(2)
        p = Path(path)
        return m.group(1) + str(p if p.is_absolute() else (base / p).resolve())
    return re.sub(r"(hf:\s*)([^,}\s]+)", repl, text)


def seeds() -> dict[str, str]:
    """Seed documents by name: ``graphs/*.yaml`` (``hf`` paths made absolute) and
    :data:`_EXTRA_SEEDS`. Every seed except one naming a checkpoint that is not there is a
    valid graph."""
    out = {}
    for p in sorted((REPO / "graphs").glob("*.yaml")):
        out[p.stem] = _absolute_hf(p.read_text(), p.parent)
    out.update(_EXTRA_SEEDS)
    return out


# --------------------------------------------------------------------------- chooser

class Chooser:
    """Source of random choices; :class:`RandomChooser` for the script, a hypothesis-backed
    one in the tests (so failing cases shrink)."""

    def integer(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.integer(0, len(seq) - 1)]

    def chance(self, p: float) -> bool:
        return self.integer(0, 999) < int(p * 1000)

    #: code point ranges of random text: ASCII, control characters, Latin/Greek, CJK, emoji,
    #: a BOM, line/paragraph separators
    POOLS = [(0x20, 0x7e), (0x00, 0x1f), (0x80, 0x2ff), (0x370, 0x3ff), (0x4e00, 0x4e40),
             (0x1f600, 0x1f64f), (0xfeff, 0xfeff), (0x2028, 0x2029)]

    def text(self, max_size: int = 12) -> str:
        out = []
        for _ in range(self.integer(0, max_size)):
            lo, hi = self.choice(self.POOLS)
            out.append(chr(self.integer(lo, hi)))
        return "".join(out)


class RandomChooser(Chooser):
    def __init__(self, seed: Any):
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


# --------------------------------------------------------------------------- values

NASTY_NUMBERS: list[Any] = [
    0, -1, 1, 2, 7, 255, 2**31, 2**31 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**39,
    -10**39, 10**400, 0.0, -0.0, 0.5, 1.5, 1e-300, 5e-324, 1e39, 1.0e300, -1e300, 1.7976931348623157e308,
    float("nan"), float("inf"), float("-inf"), 16384, 16385, 1 << 20, (1 << 20) + 1, 86_400_000,
    86_400_001, 1000, 1000.5, 1_073_741_824, 1e9,
]
NASTY_OTHER: list[Any] = [
    True, False, None, "", "x", "1e3", "2", "nan", "frames", "query", ".", "..", "a" * 129,
    "a/b", "../../etc", "/abs/path", "a" * 300, "~no_such_user_sg/x", "/etc/passwd", "/",
    "/dev/null", "\x00", "é", "名前", "😀", "\u2028", [], {}, [1, 2],
    [16, 16], [64, 64, 3], {"a": 1}, {"op": "none"}, [[[]]], [None], ["pruner", "query", "query"],
]
KEYS = ["op", "input", "cache", "tokens_per_frame", "positions", "capacity_tokens", "sink_tokens",
        "window_tokens", "max_new_tokens", "prefill_chunk_tokens", "fps", "frame_size", "memory_mb",
        "frame_deadline_ms", "ttft_ms", "overload", "preset", "hf", "seed", "dtype", "name",
        "version", "threshold", "mode", "update_ratio", "refresh_every", "skip_threshold",
        "text_window_tokens", "vision_window_frames", "vision_window_seconds", "init_tokens",
        "local_tokens", "topk", "block_tokens", "question_tokens", "store_blocks", "store_mb",
        "carriers", "alpha", "channel_keep_ratio", "scoring", "bogus", "frames", "query", "nodes",
        "model", "stream", "slo", "budget", "encoder", "pruner", "llm", "reducer", "<<"]
OPS_NAMES = ["vision_encoder", "stc_cacher", "topk_saliency", "dtd", "stc_pruner", "tome", "pool",
             "none", "full", "sink_window", "streaming_vlm", "rekv", "carrier", "decoder", "bogus",
             "", "Decoder"]


def nasty_value(ch: Chooser) -> Any:
    """An extreme value (a fresh copy: mutations edit documents in place)."""
    r = ch.integer(0, 9)
    if r < 5:
        return ch.choice(NASTY_NUMBERS)
    if r < 8:
        return _copy(ch.choice(NASTY_OTHER))
    if r < 9:
        return ch.text()
    return ch.integer(-(2**70), 2**70)


def perturb_number(value: Any, ch: Chooser) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return nasty_value(ch)
    try:
        return _perturb(value, ch)
    except (OverflowError, ValueError):  # a huge int in a float, NaN or inf in an int
        return -value


def _perturb(value: int | float, ch: Chooser) -> Any:
    r = ch.integer(0, 7)
    if r == 0:
        return -value
    if r == 1:
        return value * 10 ** ch.integer(1, 40)
    if r == 2:
        return float(value) + 0.5
    if r == 3:
        return value + ch.choice([-1, 1])
    if r == 4:
        return int(value) * 2 ** ch.integer(1, 70)
    if r == 5:
        return value / 10 ** ch.integer(1, 400)
    if r == 6:
        return str(value)
    return float(value)


# --------------------------------------------------------------------------- tree mutations

Path_ = tuple  # path of keys/indexes into the document


def _paths(doc: Any, path: Path_ = ()) -> list[Path_]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, path + (i,))
    return out


def _get(doc: Any, path: Path_) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _pick(doc: Any, ch: Chooser, want: Callable[[Any], bool] = lambda v: True) -> Path_ | None:
    paths = [p for p in _paths(doc) if want(_get(doc, p))]
    return ch.choice(paths) if paths else None


def _new_key(ch: Chooser) -> Any:
    r = ch.integer(0, 5)
    if r < 3:
        return ch.choice(KEYS)
    if r == 3:
        return ch.text()
    if r == 4:
        return ch.choice([1, 0, True, None, 1.5, "a" * 200, "x" * 129, "llm\n", " llm", "ＬＬＭ"])
    return ch.choice(KEYS) + ch.choice(["s", "_", "2", ""])


def mutate_tree(doc: Any, ch: Chooser) -> tuple[Any, str]:
    """One mutation of the constructed document; returns (document, description)."""
    r = ch.integer(0, 13)
    if r in (12, 13):  # an extreme number where a number is
        p = _pick(doc, ch, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
        if p is not None:
            v = ch.choice(NASTY_NUMBERS)
            return _set(doc, p, v), f"number {p} to {v!r:.60}"
    if r == 0:  # delete a key
        p = _pick(doc, ch, lambda v: isinstance(v, dict) and v)
        if p is not None:
            d = _get(doc, p)
            k = ch.choice(list(d))
            del d[k]
            return doc, f"delete {p + (k,)}"
    if r in (1, 2):  # replace a value with an extreme one
        p = _pick(doc, ch)
        v = nasty_value(ch)
        return _set(doc, p, v), f"replace {p} with {v!r:.60}"
    if r == 3:  # perturb a number
        p = _pick(doc, ch, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
        if p is not None:
            v = perturb_number(_get(doc, p), ch)
            return _set(doc, p, v), f"perturb {p} to {v!r:.60}"
    if r == 4:  # wrong nesting: wrap
        p = _pick(doc, ch)
        v = _get(doc, p)
        w = [v] if ch.chance(0.5) else {ch.choice(KEYS): v}
        return _set(doc, p, w), f"wrap {p}"
    if r == 5:  # wrong nesting: unwrap
        p = _pick(doc, ch, lambda v: isinstance(v, (dict, list)) and v)
        if p is not None:
            v = _get(doc, p)
            inner = ch.choice(list(v.values()) if isinstance(v, dict) else v)
            return _set(doc, p, inner), f"unwrap {p}"
    if r == 6:  # rename a key
        p = _pick(doc, ch, lambda v: isinstance(v, dict) and v)
        if p is not None:
            d = _get(doc, p)
            old, new = ch.choice(list(d)), _new_key(ch)
            items = [((new if k == old else k), v) for k, v in d.items()]
            return _set(doc, p, dict(items)), f"rename {p + (old,)} to {new!r:.60}"
    if r == 7:  # add an unknown or extra key
        p = _pick(doc, ch, lambda v: isinstance(v, dict))
        if p is not None:
            k, v = _new_key(ch), nasty_value(ch)
            _get(doc, p)[k] = v
            return doc, f"add {p + (k,)} = {v!r:.60}"
    if r == 8:  # change an op
        p = _pick(doc, ch, lambda v: isinstance(v, dict) and "op" in v)
        if p is not None:
            op = ch.choice(OPS_NAMES)
            _get(doc, p)["op"] = op
            return doc, f"op of {p} to {op!r}"
    if r == 9:  # change a reference
        p = _pick(doc, ch, lambda v: isinstance(v, dict) and ("input" in v or "cache" in v))
        if p is not None:
            d = _get(doc, p)
            field = ch.choice([f for f in ("input", "cache") if f in d])
            names = list((doc.get("nodes") or {}) if isinstance(doc, dict) and isinstance(
                doc.get("nodes"), dict) else []) + ["frames", "query", "nope"]
            ref = ch.choice(names)
            if isinstance(d[field], list) and d[field] and ch.chance(0.7):
                d[field][ch.integer(0, len(d[field]) - 1)] = ref
            else:
                d[field] = ref
            return doc, f"reference {p + (field,)} to {ref!r}"
    if r == 10:  # copy a subtree somewhere else
        src, dst = _pick(doc, ch), _pick(doc, ch, lambda v: isinstance(v, dict))
        if dst is not None:
            k = _new_key(ch) if ch.chance(0.5) else ch.choice(["llm2", "cache2", "enc2", "p2"])
            _get(doc, dst)[k] = _copy(_get(doc, src))
            return doc, f"copy {src} to {dst + (k,)}"
    if r == 11:  # swap two values
        a, b = _pick(doc, ch), _pick(doc, ch)
        if a and b and a[:len(b)] != b and b[:len(a)] != a:
            va, vb = _copy(_get(doc, a)), _copy(_get(doc, b))
            _set(doc, a, vb)
            _set(doc, b, va)
            return doc, f"swap {a} and {b}"
    p = _pick(doc, ch)
    v = nasty_value(ch)
    return _set(doc, p, v), f"replace {p} with {v!r:.60}"


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


class _Dumper(yaml.SafeDumper):
    pass


def dump(doc: Any, ch: Chooser) -> str:
    """Serialize ``doc`` in a random style (block, flow, mixed; unicode escaped or not)."""
    style = ch.choice([False, True, None])
    try:
        return yaml.dump(doc, Dumper=_Dumper, default_flow_style=style,
                         allow_unicode=ch.chance(0.5), sort_keys=False, width=ch.choice([80, 10**6]))
    except (yaml.YAMLError, ValueError, RecursionError):
        return yaml.dump(repr(doc), Dumper=_Dumper)


# --------------------------------------------------------------------------- text mutations

def _lines(text: str) -> list[str]:
    return text.split("\n")


def mutate_text(text: str, ch: Chooser) -> tuple[str | bytes, str]:
    """One mutation of the serialized document; returns (text or bytes, description)."""
    lines = _lines(text)
    r = ch.integer(0, 17)
    if r == 0 and lines:  # duplicate a line (duplicate keys)
        i = ch.integer(0, len(lines) - 1)
        lines.insert(i, lines[i])
        return "\n".join(lines), f"duplicate line {i + 1}"
    if r == 1 and lines:  # delete a line
        i = ch.integer(0, len(lines) - 1)
        del lines[i]
        return "\n".join(lines), f"delete line {i + 1}"
    if r == 2:  # anchors and aliases: anchor a value, alias it elsewhere
        m = list(re.finditer(r"(?m)^(\s*)([A-Za-z_]+): (\{.*\}|\[.*\]|\S+)$", text))
        if len(m) >= 2:
            a, b = ch.choice(m), ch.choice(m)
            if a.start() != b.start():
                first, second = sorted([a, b], key=lambda x: x.start())
                out = (text[:first.start(3)] + "&anc " + text[first.start(3):second.start(3)]
                       + "*anc" + text[second.end(3):])
                return out, f"anchor line of {first.group(2)!r}, alias at {second.group(2)!r}"
    if r == 3:  # alias bomb ("billion laughs") as a value
        levels = ch.integer(3, 9)
        bomb = ["bomb0: &l0 [x, x, x, x, x, x, x, x, x]"]
        for i in range(1, levels):
            bomb.append(f"bomb{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
        key = ch.choice(["name", "fps", "nodes", "model", "input", "tokens_per_frame", "bogus"])
        target = re.search(rf"(?m)^(\s*){key}: .*$", text)
        head = "\n".join(bomb) + "\n"
        if target:
            out = head + text[:target.start()] + f"{target.group(1)}{key}: *l{levels - 1}" + text[target.end():]
        else:
            out = head + text
        return out, f"alias bomb ({levels} levels) at {key!r}"
    if r == 4:  # merge keys
        variants = ["<<: *anc", "<<: [*anc, *anc]", "<<: 5", "<<: {op: full}", "<<: [1, 2]", "<<: *nope"]
        v = ch.choice(variants)
        m = re.search(r"(?m)^(\s*)(\w+): \{", text)
        if m:
            out = (text[:m.end() - 1] + "&anc {" + text[m.end():]) + f"\nextra: {{{v}}}\n"
            return out, f"merge key {v!r}"
        return text + f"\nx: &anc {{a: 1}}\ny: {{{v}}}\n", f"merge key {v!r}"
    if r == 5:  # tags
        tag = ch.choice(["!!binary aGVsbG8=", "!!timestamp 2020-01-01", "2020-01-01", "2020-13-45", "!!set {a, b}",
                         "!!omap [a: 1]", "!!python/object:os.system x", "!custom 5", "!!str 5",
                         "!!int '7'", "!!float 1", "!!null ''", "!!bool yes", "? [a, b]", "!!map {a: 1}",
                         "!!seq [1]", "0x1F", "0o17", "1_000", "+12", "1e3", "1E-2", ".5", "1:30",
                         "~", "yes", "no", "on", ".NaN", "-.inf", "0b101"])
        m = list(re.finditer(r"(?m)(: )([^\n{}\[\],]+)", text))
        if m:
            t = ch.choice(m)
            return text[:t.start(2)] + tag + text[t.end(2):], f"value {t.group(2)!r} to {tag!r}"
    if r == 6:  # deep nesting
        n = ch.choice([30, 200, 1000, 5000, 50000])
        inner = ch.choice(["[" * n + "]" * n, "{a: " * n + "1" + "}" * n, "[" * n])
        m = list(re.finditer(r"(?m)(: )([^\n{}\[\],]+)", text))
        if m:
            t = ch.choice(m)
            return text[:t.start(2)] + inner + text[t.end(2):], f"nesting depth {n}"
        return inner, f"nesting depth {n}"
    if r == 7:  # empty documents
        v = ch.choice(["", "\n", "---", "---\n...\n", "# only a comment\n", "...", "\ufeff", " ", "\t"])
        return v, f"empty document {v!r}"
    if r == 8:  # non-mapping documents
        v = ch.choice(["- a\n- b\n", "42", "'text'", "[1, 2]", "null", "true", "!!binary aGVsbG8=",
                       "- " + text.replace("\n", "\n  "), "? a\n", "&a [*a]"])
        return v, f"non-mapping document {v[:20]!r}"
    if r == 9:  # several documents
        return text + "\n---\n" + text, "two documents"
    if r == 10:  # insert random unicode / control characters
        pos = ch.integer(0, len(text))
        s = ch.text(4) or "\x07"
        return text[:pos] + s + text[pos:], f"insert {s!r} at {pos}"
    if r == 11:  # binary bytes
        raw = bytearray(text.encode("utf-8"))
        for _ in range(ch.integer(1, 4)):
            pos = ch.integer(0, len(raw))
            raw[pos:pos] = bytes([ch.integer(0, 255)])
        return bytes(raw), "binary bytes inserted"
    if r == 12:  # random binary file
        n = ch.integer(0, 64)
        return bytes(ch.integer(0, 255) for _ in range(n)), f"random {n} bytes"
    if r == 13:  # truncate
        pos = ch.integer(0, len(text))
        return text[:pos], f"truncate at {pos}"
    if r == 14:  # tabs / indentation damage
        if lines:
            i = ch.integer(0, len(lines) - 1)
            lines[i] = ch.choice(["\t", "   ", " ", ""]) + lines[i]
            return "\n".join(lines), f"indent line {i + 1}"
    if r == 15:  # flip a byte
        raw = bytearray(text.encode("utf-8"))
        if raw:
            pos = ch.integer(0, len(raw) - 1)
            raw[pos] ^= 1 << ch.integer(0, 7)
            try:
                return raw.decode("utf-8"), f"flip a bit at byte {pos}"
            except UnicodeDecodeError:
                return bytes(raw), f"flip a bit at byte {pos}"
    if r == 16:  # BOM / CRLF / odd line breaks
        v = ch.choice(["bom", "crlf", "cr", "nel", "ls"])
        out = {"bom": lambda t: "\ufeff" + t, "crlf": lambda t: t.replace("\n", "\r\n"),
               "cr": lambda t: t.replace("\n", "\r"), "nel": lambda t: t.replace("\n", "\x85"),
               "ls": lambda t: t.replace("\n", "\u2028")}[v](text)
        return out, f"line breaks {v}"
    if r == 17:  # a huge number literal in the text
        m = list(re.finditer(r"(?m)(: )(\d+(?:\.\d+)?)\b", text))
        if m:
            t = ch.choice(m)
            lit = ch.choice(["9" * 400, "9" * 5000, "1e999", "-1e999", "1" + "0" * 39, "9223372036854775808",
                             "0." + "0" * 400 + "1", "1e39", "1.0e+300", "NaN", ".nan", "1_0"])
            return text[:t.start(2)] + lit + text[t.end(2):], f"literal {lit[:20]!r}"
    return text, "unchanged text"


# --------------------------------------------------------------------------- cases

def make_case(ch: Chooser, seed_docs: dict[str, str] | None = None) -> tuple[str, list[str], bytes]:
    """A mutated graph file: (seed name, mutation descriptions, file bytes)."""
    seed_docs = seed_docs or seeds()
    name = ch.choice(sorted(seed_docs))
    text = seed_docs[name]
    steps: list[str] = []
    # mostly one mutation, so that most cases reach the graph and plan checks behind the
    # first error
    n_tree = ch.choice([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4])
    if n_tree:
        doc = yaml.safe_load(text)
        for _ in range(n_tree):
            doc, what = mutate_tree(doc, ch)
            steps.append(what)
        text = dump(doc, ch)
    data: str | bytes = text
    if n_tree == 0 or ch.chance(0.15):
        for _ in range(ch.integer(1, 2)):
            if isinstance(data, bytes):
                break
            data, what = mutate_text(data, ch)
            steps.append(what)
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    return name, steps, raw


LOCATED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): ")


class CaseTimeout(BaseException):
    """Raised by the alarm inside a case that ran too long (not an Exception, so no code
    under test can swallow it)."""


def classify(path: str, exc: BaseException | None) -> tuple[str, str]:
    """(kind, message) of one case's outcome; ``exc`` is what ``validate`` raised."""
    from streamgraph.errors import StreamgraphError

    if exc is None:
        return "valid", ""
    if isinstance(exc, CaseTimeout):
        return "hang", "timed out"
    if not isinstance(exc, StreamgraphError):
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        return "internal", f"{type(exc).__name__}: {exc}"[:500] + where
    msg = str(exc)
    m = LOCATED.match(msg)
    if "\n" in msg or "\r" in msg or not msg.isprintable() or m is None or m.group("file") != path:
        return "unlocated", msg[:500]
    try:  # the position must exist in the file (line breaks as YAML counts them)
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        text = None
    if text is not None:
        lines = len(re.split("\r\n|[\n\r\x85\u2028\u2029]", text))
        if not (1 <= int(m.group("line")) <= lines and int(m.group("col")) >= 1):
            return "unlocated", f"position outside the file ({lines} lines): {msg[:400]}"
    return "located", msg


def validate_file(path: str) -> None:
    """The code path of ``streamgraph validate`` (spec -> graph -> plan, no export)."""
    from streamgraph.compiler.compile import check_graph

    check_graph(path, build_weights=False)


def run_case(path: str, timeout: float) -> tuple[str, str]:
    """Validate ``path`` in this process with a wall-clock limit (``signal.setitimer``; main
    thread only). Returns :func:`classify`'s (kind, message)."""
    def on_alarm(signum, frame):
        raise CaseTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    exc: BaseException | None = None
    try:
        validate_file(path)
    except CaseTimeout as e:
        exc = e
    except RecursionError as e:  # keep the worker's stack usable
        exc = e
    except Exception as e:  # noqa: BLE001 - classified below
        exc = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return classify(path, exc)


# --------------------------------------------------------------------------- long mode

def _worker(conn, timeout: float) -> None:
    validate_file  # noqa: B018 - imports happen on the first case
    while True:
        try:
            path = conn.recv()
        except EOFError:
            return
        if path is None:
            return
        conn.send(run_case(path, timeout))


class _Pool:
    """One worker process; restarted after a hang (no answer in time) or a crash."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.timeout), daemon=True)
        self.proc.start()
        self.conn = parent

    def run(self, path: str, first: bool) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self.start()
            first = True
        self.conn.send(path)
        # the first case of a worker pays for importing torch
        limit = self.timeout + (120 if first else 10)
        if self.conn.poll(limit):
            try:
                return self.conn.recv()
            except EOFError:
                pass
            code = self.proc.exitcode
            self.kill()
            return "internal", f"worker died (exit code {code})"
        self.kill()
        return "hang", f"no answer in {limit:.0f} s (worker killed)"

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        self.kill()


def campaign(cases: int, seed: int, timeout: float, keep: int, workdir: Path,
             progress: Callable[[int, dict], None] | None = None) -> dict:
    """Run ``cases`` cases; returns the summary (counts, failing cases, message samples)."""
    seed_docs = seeds()
    counts = {k: 0 for k in KINDS}
    failures: list[dict] = []
    samples: dict[str, list[str]] = {"located": [], "valid": []}
    pool = _Pool(timeout)
    started = time.time()
    path = workdir / "graph.yaml"
    try:
        for i in range(cases):
            name, steps, raw = make_case(RandomChooser(f"{seed}:{i}"), seed_docs)
            path.write_bytes(raw)
            kind, message = pool.run(str(path), first=(i == 0))
            counts[kind] += 1
            if kind in ("unlocated", "internal", "hang"):
                if len(failures) < 20:
                    print(f"case {i}: {kind}: {message[:300]}", file=sys.stderr, flush=True)
                failures.append({"case": i, "kind": kind, "seed_doc": name, "mutations": steps,
                                 "message": message, "file": raw.decode("utf-8", "replace")[:4000]})
            elif kind == "located" and len(samples["located"]) < keep:
                samples["located"].append(message.replace(str(path), "g.yaml"))
            elif kind == "valid" and len(samples["valid"]) < keep:
                samples["valid"].append(f"{name}: {'; '.join(steps)}")
            if progress is not None:
                progress(i + 1, counts)
    finally:
        pool.close()
    return {"cases": cases, "seed": seed, "timeout_s": timeout, "counts": counts,
            "seconds": round(time.time() - started, 1), "failures": failures, "samples": samples,
            "command": " ".join([Path(sys.argv[0]).name if sys.argv else "fuzz_graphs.py", *sys.argv[1:]])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=10_000, help="mutated graphs to validate (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed; case i uses seed 'SEED:i'")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    p.add_argument("--out", default="fuzz-summary.json", help="JSON summary path")
    p.add_argument("--keep", type=int, default=20, help="sample messages kept per outcome")
    p.add_argument("--case", type=int, help="print case N's mutations and file, run it, and exit")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sg-fuzz-") as tmp:
        if args.case is not None:
            name, steps, raw = make_case(RandomChooser(f"{args.seed}:{args.case}"))
            path = Path(tmp) / "graph.yaml"
            path.write_bytes(raw)
            print(f"seed {name}; mutations: {'; '.join(steps)}\n--- file ---")
            print(raw.decode("utf-8", "replace"))
            print("--- outcome ---")
            print(run_case(str(path), args.timeout))
            return 0

        def progress(done: int, counts: dict) -> None:
            if done % 500 == 0 or done == args.cases:
                print(f"{done}/{args.cases} " + " ".join(f"{k}={v}" for k, v in counts.items()),
                      flush=True)

        summary = campaign(args.cases, args.seed, args.timeout, args.keep, Path(tmp), progress)
    Path(args.out).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    c = summary["counts"]
    print(f"{args.cases} cases in {summary['seconds']} s: " + ", ".join(f"{c[k]} {k}" for k in KINDS)
          + f"; summary in {args.out}")
    return 0 if c["unlocated"] == c["internal"] == c["hang"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
