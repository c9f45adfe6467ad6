"""ONNX exports as people make them: the position table stored at one grid and resized inside
the graph on every call (timm ``dynamic_img_size``, DINOv2-style exports). The section must
read the table as stored, say how the graph brings it to the tokens, and give the same
numbers as the PyTorch path on the same weights.

Two exporters, as they are used:
- the dynamo exporter with dynamic H and W (a static size would let it fold the resize into
  a constant, leaving only the resampled table in the file);
- the TorchScript exporter at a fixed size larger than the table's. It cannot export the
  antialiased bicubic resize timm uses, so the export runs with ``antialias=False``, as
  DINOv2's own interpolation does (what the third-party exports in the issue contain).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.planted.models import TINY_ARCH, save_safetensors
from tests.planted.posembed_tables import as_timm_pos_embed, random_table, sincos_2d_table
from tests.test_onnx import assert_close, stage_audit
from workers.analysis.onnx_model import load_onnx_model
from workers.analysis.onnx_trace import TraceError, trace_position_table
from workers.pipeline import run_pipeline

STORED = (8, 8)  # the table's grid as trained (64 px, 8 px patches)
EXPORTED_PX = 96  # the TorchScript export's fixed input: a 12x12 grid
MODEL_ARGS = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 5,
}
# The same float32 table read from the checkpoint and from the ONNX initializer; the
# metrics are deterministic functions of it.
POSITION_TOLERANCE = 1e-9


def _model(table: torch.Tensor, **extra) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TINY_ARCH, pretrained=False, **MODEL_ARGS, **extra).eval()
    with torch.no_grad():
        model.pos_embed.copy_(as_timm_pos_embed(table, num_prefix=1))
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


def _export_dynamo_dynamic(model: torch.nn.Module, path: Path) -> Path:
    from torch.export import Dim

    size = {2: 8 * Dim("grid_h", min=2, max=32), 3: 8 * Dim("grid_w", min=2, max=32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, EXPORTED_PX, EXPORTED_PX),),
            str(path),
            dynamo=True,
            opset_version=18,
            dynamic_shapes={"x": size},
            external_data=False,  # one file, as an upload of one .onnx is
            verbose=False,
        )
    return path


def _export_torchscript_fixed(model: torch.nn.Module, path: Path) -> Path:
    import timm.models.vision_transformer as vision_transformer

    resample = vision_transformer.resample_abs_pos_embed
    vision_transformer.resample_abs_pos_embed = functools.partial(resample, antialias=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                torch.randn(1, 3, EXPORTED_PX, EXPORTED_PX),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )
    finally:
        vision_transformer.resample_abs_pos_embed = resample
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx-tables")
    sincos = sincos_2d_table(*STORED, MODEL_ARGS["embed_dim"])
    noise = random_table(*STORED, MODEL_ARGS["embed_dim"], seed=4)
    return {
        "weights": save_safetensors(_model(sincos), folder / "sincos.safetensors"),
        "noise_weights": save_safetensors(_model(noise), folder / "noise.safetensors"),
        "dynamo": _export_dynamo_dynamic(
            _model(sincos, dynamic_img_size=True), folder / "dynamo.onnx"
        ),
        "torchscript": _export_torchscript_fixed(
            _model(sincos, dynamic_img_size=True), folder / "torchscript.onnx"
        ),
        "noise_torchscript": _export_torchscript_fixed(
            _model(noise, dynamic_img_size=True), folder / "noise-torchscript.onnx"
        ),
    }


def _section(root: Path, checkpoint: Path) -> dict:
    request, audit_dir = stage_audit(root, checkpoint, analyses=["position_embedding"])
    request["options"]["model_args"] = MODEL_ARGS
    return run_pipeline(request, audit_dir).report["position_embedding"]


# Fields that describe how the table was found, which differ between the two formats.
PROVENANCE = {
    "kind",
    "kind_detail",
    "grid",
    "num_prefix_tokens",
    "table_grid",
    "resampled",
    "resample_method",
    "resample_note",
    "prefix_in_table",
    "trainable",
    "matches_sincos",
    "source",
    "onnx_path",
    "resampled_in_graph",
}


def _numbers(section: dict) -> dict:
    return {k: v for k, v in section.items() if k not in PROVENANCE}


@pytest.mark.parametrize(
    ("export", "weights", "input_grid"),
    [
        ("dynamo", "weights", STORED),  # dynamic H, W: audited at the table's own size
        ("torchscript", "weights", (12, 12)),  # fixed 96 px: the graph resizes 8x8 -> 12x12
        ("noise_torchscript", "noise_weights", (12, 12)),
    ],
)
def test_onnx_reads_the_stored_table_and_matches_pytorch(
    exports, tmp_path: Path, export: str, weights: str, input_grid: tuple[int, int]
) -> None:
    onnx_section = _section(tmp_path / "onnx", exports[export])
    torch_section = _section(tmp_path / "torch", exports[weights])
    assert onnx_section["available"] and torch_section["available"]
    assert onnx_section["table_grid"] == list(STORED)
    assert onnx_section["grid"] == list(input_grid)
    assert "Resize" in onnx_section["onnx_path"] and onnx_section["resampled_in_graph"]
    assert "Resize" in onnx_section["kind_detail"]
    assert_close(_numbers(onnx_section), _numbers(torch_section), POSITION_TOLERANCE, export)


def test_the_stored_sincos_table_scores_as_a_map_and_noise_does_not(exports, tmp_path) -> None:
    """The planted answers through the in-graph resize: a 2-D sin-cos table is a map; i.i.d.
    noise stays near 0 although the graph resamples it smoothly to 12x12 (judged as stored)."""
    sincos = _section(tmp_path / "a", exports["torchscript"])
    noise = _section(tmp_path / "b", exports["noise_torchscript"])
    assert sincos["kind"] == "fixed_sincos" and sincos["grid_structure_score"] > 0.9
    assert noise["kind"] == "learned_absolute" and noise["grid_structure_score"] < 0.15


def test_a_dynamic_input_is_audited_at_the_stored_tables_size(exports) -> None:
    vit = load_onnx_model(exports["dynamo"])
    assert vit.img_size == (64, 64) and vit.grid.shape == STORED
    assert any("dynamic" in note for note in vit.notes)


def _graph_with_scaled_table() -> onnx.GraphProto:
    """Conv -> Flatten -> Transpose -> Add(tokens, Mul(table, 2)): a table path through an
    op that changes the table's values, which the trace must not follow."""
    dim, grid = 4, 2
    tensors = [
        helper.make_tensor("w", TensorProto.FLOAT, [dim, 3, 8, 8], [0.0] * (dim * 3 * 64)),
        helper.make_tensor(
            "table", TensorProto.FLOAT, [1, grid * grid, dim], [0.1] * (grid * grid * dim)
        ),
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["p"], name="patch_embed", kernel_shape=[8, 8]),
        helper.make_node("Flatten", ["p"], ["f"], axis=2, name="flatten"),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 1], name="to_tokens"),
        helper.make_node("Mul", ["table", "two"], ["scaled"], name="scale_table"),
        helper.make_node("Add", ["t", "scaled"], ["x"], name="add_pos"),
    ]
    return helper.make_graph(
        nodes,
        "scaled",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        tensors,
    )


def test_a_path_the_trace_cannot_follow_names_the_node_where_it_stopped() -> None:
    graph = _graph_with_scaled_table()
    conv = graph.node[0]
    with pytest.raises(TraceError, match=r"stops at node 'scale_table' \(Mul\)"):
        trace_position_table(graph, conv, dim=4, model_grid=(2, 2))


def test_tokens_that_reach_no_add_are_reported_with_the_last_node() -> None:
    graph = _graph_with_scaled_table()
    del graph.node[-1]  # no token sum at all
    with pytest.raises(TraceError, match=r"reach no Add .* after node 'to_tokens' \(Transpose\)"):
        trace_position_table(graph, graph.node[0], dim=4, model_grid=(2, 2))


def test_a_table_stored_as_nchw_is_read_in_raster_order() -> None:
    """The dynamo exporter folds reshape + transpose into a [1, D, h, w] initializer."""
    dim, (h, w) = 4, (2, 3)
    table = np.arange(h * w * dim, dtype=np.float32).reshape(h, w, dim)
    tensors = [
        helper.make_tensor("w", TensorProto.FLOAT, [dim, 3, 8, 8], [0.0] * (dim * 3 * 64)),
        helper.make_tensor(
            "nchw", TensorProto.FLOAT, [1, dim, h, w], table.transpose(2, 0, 1).ravel()
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["p"], name="patch_embed", kernel_shape=[8, 8]),
        helper.make_node("Flatten", ["p"], ["f"], axis=2),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Flatten", ["nchw"], ["pf"], axis=2),
        helper.make_node("Transpose", ["pf"], ["pt"], perm=[0, 2, 1]),
        helper.make_node("Add", ["t", "pt"], ["x"], name="add_pos"),
    ]
    graph = helper.make_graph(
        nodes,
        "nchw",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 24])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        tensors,
    )
    traced = trace_position_table(graph, graph.node[0], dim=dim, model_grid=(h, w))
    assert traced.grid == (h, w) and traced.ops == ("Flatten", "Transpose")
    np.testing.assert_array_equal(traced.patches, table)
