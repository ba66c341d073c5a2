"""``pool``: LLaVA-OneVision's 2x2 bilinear pooling, vs transformers and vs an independent 2x2 mean."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streamgraph.compiler.compile import check_graph
from streamgraph.errors import GraphError
from streamgraph.reducers.pool import BilinearPool2x, bilinear_pool_2x, pool_source_index, pooled_grid
from tests.conftest import write_graph


@pytest.mark.parametrize("side", [5, 6, 27])
def test_matches_transformers_apply_pooling(side):
    pytest.importorskip("transformers")
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    # apply_pooling only reads config.vision_config.{image_size, patch_size}
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=side * 14, patch_size=14)))
    x = torch.randn(3, side * side, 16, generator=torch.Generator().manual_seed(side))
    ref = LlavaOnevisionModel.apply_pooling(fake, x)
    got = bilinear_pool_2x(x, (side, side))
    assert got.shape == ref.shape == (3, pooled_grid((side, side))[0] ** 2, 16)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_even_grid_is_the_mean_of_each_2x2_cell():
    x = torch.randn(2, 4 * 6, 8, generator=torch.Generator().manual_seed(0))
    got = bilinear_pool_2x(x, (4, 6))
    cells = x.reshape(2, 2, 2, 3, 2, 8).mean(dim=(2, 4)).reshape(2, 6, 8)   # independent reference
    torch.testing.assert_close(got, cells, atol=1e-6, rtol=0)
    idx = pool_source_index((4, 6))
    assert idx.tolist() == [0, 2, 4, 12, 14, 16]                              # top-left of each cell


def test_source_index_is_the_top_left_of_each_bilinear_footprint():
    # 27 -> 14 (SigLIP-so400m at 384 px): sample points (i + 0.5) * 27/14 - 0.5
    idx = pool_source_index((27, 27))
    assert idx.shape == (196,) and bool((idx[1:] > idx[:-1]).all())
    rows = sorted({int(i) // 27 for i in idx})
    expect = [int(np.floor(max((i + 0.5) * 27 / 14 - 0.5, 0))) for i in range(14)]
    assert rows == expect and rows[:3] == [0, 2, 4] and rows[-1] == 25
    # every output reads its source_index token (one-hot inputs: the diagonal is nonzero), and
    # only tokens in the 2x2 neighbourhood starting there
    onehots = torch.zeros(196, 27 * 27, 1)
    onehots[torch.arange(196), idx, 0] = 1.0
    out = bilinear_pool_2x(onehots, (27, 27))[..., 0]                        # [196 inputs, 196 outputs]
    assert bool((out.diagonal() > 0).all())
    full = bilinear_pool_2x(torch.eye(27 * 27)[:, :, None], (27, 27))[..., 0]   # [729 sources, 196]
    for k in (0, 57, 195):
        r, c = divmod(int(idx[k]), 27)
        feeding = {divmod(int(j), 27) for j in torch.nonzero(full[:, k] > 0)[:, 0]}
        assert feeding <= {(r + a, c + b) for a in (0, 1) for b in (0, 1)} and (r, c) in feeding


def test_reducer_module_and_its_onnx_engine(tmp_path):
    import onnxruntime as ort

    from streamgraph.compiler.lower import export_engine
    from streamgraph.compiler.plan import EnginePlan, TensorSpec

    red = BilinearPool2x((5, 7))
    x = torch.randn(1, 35, 12, generator=torch.Generator().manual_seed(1))
    tokens, keep, index = red(x)
    assert tokens.shape == (1, 12, 12) and keep.dtype == torch.bool and bool(keep.all())
    torch.testing.assert_close(index[0], pool_source_index((5, 7)), atol=0, rtol=0)
    engine = EnginePlan("reducer", "engines/reducer.onnx", [TensorSpec("visual_tokens", "float32", [1, 35, 12])],
                        [TensorSpec("tokens", "float32", [1, 12, 12]), TensorSpec("keep_mask", "bool", [1, 12]),
                         TensorSpec("source_index", "int64", [1, 12])])
    export_engine(red, engine, tmp_path)
    sess = ort.InferenceSession(str(tmp_path / engine.file), providers=["CPUExecutionProvider"])
    t, k, i = sess.run(None, {"visual_tokens": x.numpy()})
    np.testing.assert_allclose(t, tokens.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(k, keep.numpy())
    np.testing.assert_array_equal(i, index.numpy())


def test_pool_op_in_a_graph(tmp_path):
    g = write_graph(tmp_path, name="pooled").read_text().replace(
        "{op: topk_saliency, input: encoder, tokens_per_frame: 16}", "{op: pool, input: encoder}")
    path = tmp_path / "pooled.yaml"
    path.write_text(g)
    checked = check_graph(path, build_weights=False)
    # tiny preset at 64x64, patch 8: an 8x8 grid pooled to 4x4
    assert checked.plan.tokens_per_frame == 16 and checked.plan.encoder_grid == [8, 8]
    assert checked.plan.reducer["op"] == "pool" and checked.plan.reducer["params"] == {"grid": [8, 8]}
    module = checked.modules["reducer_k16"]
    assert isinstance(module, BilinearPool2x) and module.grid == (8, 8)
    # without a known token grid the shape rule refuses, located at the node
    from streamgraph.compiler.graph import build_graph
    from streamgraph.compiler.spec import load_spec

    with pytest.raises(GraphError, match=r"pooled.yaml:7:\d+: nodes.pruner.input: pool needs a raster grid"):
        build_graph(load_spec(path), encoder_tokens=64, hidden_size=64)
