"""Which model a graph's ``model:`` section names, and its config — torch-free, so the
compiler's graph checks (``streamgraph validate``) run before torch is imported: a seeded
random preset (:data:`~streamgraph.models.config.PRESETS`) or a local Hugging Face checkpoint
(:func:`~streamgraph.models.hf.open_checkpoint` reads its JSON files and safetensors headers
only). The torch model itself is built by :mod:`streamgraph.models.build`."""
from __future__ import annotations

from streamgraph.errors import SpecError
from streamgraph.models.config import PRESETS, VLMConfig

__all__ = ["hf_checkpoint", "model_config"]

_CKPT_CACHE: dict = {}


def hf_checkpoint(spec):
    """The :class:`~streamgraph.models.hf.Checkpoint` of a graph with ``model: {hf: DIR}``
    (``DIR`` relative to the graph file), read once per directory state.

    Raises the loader's :class:`~streamgraph.models.hf.CheckpointError` subclass with the
    message prefixed by the graph file's ``FILE:LINE:COL: model.hf:`` (an OSError reading
    the directory becomes a CheckpointError too)."""
    from streamgraph.models.hf import CheckpointError, open_checkpoint

    path = spec.resolve_path(spec.model.hf)
    try:
        stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir()))
    except OSError:
        stamp = None
    key = (str(path), stamp)
    if stamp is not None and key in _CKPT_CACHE:
        return _CKPT_CACHE[key]
    try:
        ckpt = open_checkpoint(path)
    except (CheckpointError, OSError) as e:  # OSError: EACCES, EIO, ... reading the directory
        line, col = spec.locate(("model", "hf")) or (None, None)
        where = spec.source_file + (f":{line}:{col}" if line is not None else "")
        if isinstance(e, CheckpointError):
            raise type(e)(f"{where}: model.hf: {e}") from None
        raise CheckpointError(f"{where}: model.hf: {path}: cannot read the checkpoint: "
                              f"{e.strerror or e}") from None
    _CKPT_CACHE.clear()
    _CKPT_CACHE[key] = ckpt
    return ckpt


def model_config(spec) -> VLMConfig:
    """Model config of a :class:`~streamgraph.compiler.spec.GraphSpec`.

    For ``hf`` models the encoder input size is the checkpoint's (its preprocessor config);
    ``stream.frame_size``, when given, must equal it. Raises SpecError (located at
    ``stream.frame_size``) for a frame size the model cannot take, and the loader's
    CheckpointError (located at ``model.hf``) for a bad checkpoint."""
    m = spec.model
    if m.preset in PRESETS:
        try:
            return PRESETS[m.preset](tuple(spec.stream.frame_size))
        except ValueError as e:
            line, col = spec.locate(("stream", "frame_size")) or (None, None)
            raise SpecError(str(e), file=spec.source_file, line=line, col=col, field="stream.frame_size") from None
    ckpt = hf_checkpoint(spec)
    cfg = ckpt.cfg
    if "frame_size" in spec.stream.model_fields_set and tuple(spec.stream.frame_size) != cfg.vision.image_size:
        h, w = cfg.vision.image_size
        line, col = spec.locate(("stream", "frame_size")) or (None, None)
        raise SpecError(f"the checkpoint's vision tower takes {h}x{w} frames ({ckpt.preprocessor_file}); "
                        f"set frame_size: [{h}, {w}] or leave it out", file=spec.source_file, line=line,
                        col=col, field="stream.frame_size")
    return cfg
