"""ONNX exports through ONNX Runtime: the same report as the PyTorch path on the same weights.

Small timm ViTs are exported here (legacy exporter, opset 17), once with timm's attention
unfused and once fused (the exporter decomposes it, so a Softmax is still there to tap);
a fused ``Attention`` op (opset 23) is built by hand, since this exporter cannot write one.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.conftest import Stack
from tests.planted.audits import audit_request
from tests.planted.models import TINY_ARCH, TINY_ARGS, save_safetensors, tiny_vit
from workers.analysis.onnx_model import REEXPORT_HINT, OnnxModelError, load_onnx_model
from workers.pipeline import run_pipeline

# ONNX Runtime and torch compute attention in float32 with different kernels (~1e-7 apart
# here); the issue asks for agreement within 1e-4.
HEAD_TOLERANCE = 1e-4
# The table is the same float32 initializer read two ways; the metrics are deterministic.
POSITION_TOLERANCE = 1e-9
OPTIONS = {
    "analyses": ["position_embedding", "heads", "gradients"],
    "probe_set": "natural-v1",
    "num_images": 4,
    "batch_size": 3,  # 4 images in batches of 3: a partial last batch too
    "seed": 0,
    "model_args": TINY_ARGS,
}


def export(model: torch.nn.Module, path: Path, *, fused: bool, **kwargs: Any) -> Path:
    for block in model.blocks:
        block.attn.fused_attn = fused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            torch.randn(1, 3, 32, 32),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            **kwargs,
        )
    return path


def stage_audit(root: Path, checkpoint: Path, *, analyses: list[str]) -> tuple[dict, Path]:
    """An audit folder as the service writes it: inputs/checkpoint.<suffix> + the request."""
    inputs = root / "inputs"
    inputs.mkdir(parents=True)
    target = inputs / f"checkpoint{checkpoint.suffix}"
    shutil.copyfile(checkpoint, target)
    options = {**OPTIONS, "analyses": analyses}
    return audit_request(root, target, TINY_ARCH, options, filename=checkpoint.name), root


def assert_close(a: Any, b: Any, tol: float, where: str = "") -> None:
    """Same structure, equal strings/bools/None, numbers within ``tol``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], tol, f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=0, abs_tol=tol), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return {
        "weights": save_safetensors(tiny_vit(seed=3), folder / "tiny.safetensors"),
        "unfused": export(tiny_vit(seed=3), folder / "unfused.onnx", fused=False),
        "fused": export(tiny_vit(seed=3), folder / "fused.onnx", fused=True),
    }


@pytest.fixture(scope="module")
def torch_report(exports: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    request, root = stage_audit(
        tmp_path_factory.mktemp("torch"),
        exports["weights"],
        analyses=["position_embedding", "heads"],
    )
    return run_pipeline(request, root).report


def test_heads_from_the_shared_gradient_pass_match_their_own_pass(
    exports, torch_report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With gradients requested, the pipeline's heads reuse the gradient pass's forward;
    the heads section must not change (the torch_report fixture runs heads on their own)."""
    import workers.analysis.heads as heads_module

    passes: list[int] = []
    own_stream = heads_module.stream_attention

    def counting_stream(*args, **kwargs):
        passes.append(own_stream(*args, **kwargs))
        return passes[-1]

    monkeypatch.setattr(heads_module, "stream_attention", counting_stream)
    request, root = stage_audit(tmp_path, exports["weights"], analyses=list(OPTIONS["analyses"]))
    report = run_pipeline(request, root).report
    assert report["gradients"]["available"] is True
    # the heads streamed only the texture probes (8 images); the 4 audited images came
    # from the gradient pass
    assert passes == [report["heads"]["num_texture_images"]] == [8]
    assert report["heads"]["num_images"] == 4
    assert_close(report["heads"], torch_report["heads"], HEAD_TOLERANCE, "heads")


@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_onnx_report_matches_the_pytorch_report(
    variant: str, exports, torch_report, tmp_path: Path
) -> None:
    request, root = stage_audit(tmp_path, exports[variant], analyses=list(OPTIONS["analyses"]))
    output = run_pipeline(request, root)
    report = output.report

    model = report["model"]
    assert model["format"] == "onnx"
    assert (
        model["onnx_providers"] == ["CPUExecutionProvider"]
        or "CUDAExecutionProvider" in model["onnx_providers"]
    )
    for key in (
        "grid",
        "patch_size",
        "img_size",
        "num_prefix_tokens",
        "num_layers",
        "num_heads",
        "embed_dim",
        "num_classes",
    ):
        assert model[key] == torch_report["model"][key], key

    onnx_heads, torch_heads = report["heads"], torch_report["heads"]
    assert [h["label"] for layer in onnx_heads["layers"] for h in layer["heads"]] == [
        h["label"] for layer in torch_heads["layers"] for h in layer["heads"]
    ]
    assert onnx_heads["num_texture_images"] == torch_heads["num_texture_images"] > 0
    assert_close(onnx_heads, torch_heads, HEAD_TOLERANCE, "heads")

    position = {
        k: v
        for k, v in report["position_embedding"].items()
        if k not in ("kind_detail", "trainable", "source", "onnx_path", "resampled_in_graph")
    }
    expected = {
        k: v
        for k, v in torch_report["position_embedding"].items()
        if k not in ("kind_detail", "trainable")
    }
    assert_close(position, expected, POSITION_TOLERANCE, "position_embedding")
    assert report["position_embedding"]["source"] == "ONNX initializer 'pos_embed'"
    # timm's export adds the stored table to the tokens as it is
    assert report["position_embedding"]["onnx_path"] == ["Add"]
    assert report["position_embedding"]["resampled_in_graph"] is False

    assert report["gradients"] == {
        "available": False,
        "reason": "gradient alignment needs autograd through the model; ONNX Runtime runs inference only. "
        "Upload the PyTorch weights (.safetensors or .pth state dict) to audit gradients",
    }
    assert {"pos_similarity", "attention_mean_maps"} <= output.arrays.keys()
    assert {
        "pos_similarity_grid",
        "pos_similarity_profile",
        "head_distance_vs_depth",
        "head_label_map",
    } <= output.figures.keys()


def test_graph_facts_are_read_from_the_export(exports) -> None:
    vit = load_onnx_model(exports["unfused"])
    assert (vit.img_size, vit.patch_size, vit.grid.shape) == ((32, 32), 8, (4, 4))
    assert (
        vit.num_prefix_tokens,
        vit.num_layers,
        vit.num_heads,
        vit.num_classes,
        vit.embed_dim,
    ) == (1, 2, 2, 5, 32)
    assert vit.attention_nodes == ["/blocks/blocks.0/attn/Softmax", "/blocks/blocks.1/attn/Softmax"]
    assert vit.providers == list(vit.session.get_providers())


def test_position_table_found_along_the_data_path_when_renamed(exports, tmp_path: Path) -> None:
    model = onnx.load(str(exports["unfused"]))
    for tensor in model.graph.initializer:
        if tensor.name == "pos_embed":
            tensor.name = "param_17"
    for node in model.graph.node:
        node.input[:] = ["param_17" if i == "pos_embed" else i for i in node.input]
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    vit = load_onnx_model(tmp_path / "renamed.onnx")
    assert vit.pos_table.source == "param_17" and vit.pos_table.patches.shape == (4, 4, 32)
    assert vit.pos_table.prefix_rows == 1 and not vit.pos_table.resampled_in_graph


def fused_attention_graph() -> onnx.ModelProto:
    """Patch embedding, then one opset-23 ``Attention`` op (what recent exporters write)."""
    weight = helper.make_tensor(
        "patch.weight", TensorProto.FLOAT, [32, 3, 8, 8], [0.0] * (32 * 3 * 64)
    )
    nodes = [
        helper.make_node(
            "Conv",
            ["image", "patch.weight"],
            ["patches"],
            name="patch_embed",
            kernel_shape=[8, 8],
            strides=[8, 8],
        ),
        helper.make_node("Flatten", ["patches"], ["tokens"], axis=2),
        helper.make_node(
            "Attention", ["tokens", "tokens", "tokens"], ["out"], name="blocks.0.attn"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_fused_attention_op_is_refused_with_how_to_reexport(tmp_path: Path) -> None:
    onnx.save(fused_attention_graph(), str(tmp_path / "fused23.onnx"))
    with pytest.raises(OnnxModelError) as caught:
        load_onnx_model(tmp_path / "fused23.onnx")
    assert str(caught.value) == (
        "node 'blocks.0.attn' (Attention) computes attention in one fused op (opset 23); the attention "
        "probabilities cannot be read from it. " + REEXPORT_HINT
    )


def test_overlapping_patch_embedding_is_refused_naming_the_node(exports, tmp_path: Path) -> None:
    model = onnx.load(str(exports["unfused"]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    for attribute in conv.attribute:
        if attribute.name == "strides":
            attribute.ints[:] = [4, 4]
    onnx.save(model, str(tmp_path / "overlap.onnx"))
    with pytest.raises(OnnxModelError) as caught:
        load_onnx_model(tmp_path / "overlap.onnx")
    assert str(caught.value) == (
        "node '/patch_embed/proj/Conv' (Conv) is not a ViT patch embedding: expected a square kernel equal to "
        "its stride with no padding, got kernel_shape=[8, 8], strides=[4, 4], pads=[0, 0, 0, 0]"
    )


def save_external(exports, folder: Path, location: str) -> Path:
    """The unfused export with its weights in a side file, then pointed at ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(exports["unfused"]))
    onnx.save(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_side_data_file_uploaded_with_the_model_is_read(exports, tmp_path: Path) -> None:
    path = save_external(exports, tmp_path / "inputs", "model.onnx.data")
    vit = load_onnx_model(path, allowed_root=tmp_path / "inputs")
    reference = load_onnx_model(exports["unfused"])
    assert (vit.pos_table.patches == reference.pos_table.patches).all()
    assert vit.notes == ["weights were read from the side file(s) model.onnx.data"]


def test_external_data_outside_the_upload_is_refused(exports, tmp_path: Path) -> None:
    path = save_external(exports, tmp_path / "inputs", "../model.onnx.data")
    (tmp_path / "inputs" / "model.onnx.data").rename(
        tmp_path / "model.onnx.data"
    )  # it exists, outside
    with pytest.raises(OnnxModelError) as caught:
        load_onnx_model(path, allowed_root=tmp_path / "inputs")
    assert str(caught.value) == (
        "tensor 'cls_token' points to external data '../model.onnx.data', outside the upload; external data "
        "must sit beside the model in the same upload. " + REEXPORT_HINT
    )


def test_missing_side_data_file_is_refused_with_how_to_reexport(exports, tmp_path: Path) -> None:
    path = save_external(exports, tmp_path / "inputs", "model.onnx.data")
    (tmp_path / "inputs" / "model.onnx.data").unlink()
    with pytest.raises(OnnxModelError) as caught:
        load_onnx_model(path)
    assert str(caught.value) == (
        "tensor 'cls_token' keeps its weights in the side file 'model.onnx.data', which was not uploaded "
        "with the model; upload it in the same request. " + REEXPORT_HINT
    )


def test_model_above_the_size_limit_is_refused(exports) -> None:
    size = exports["unfused"].stat().st_size
    with pytest.raises(OnnxModelError) as caught:
        load_onnx_model(exports["unfused"], max_bytes=size - 1)
    assert str(caught.value) == f"the ONNX file is {size} bytes; the limit is {size - 1} bytes"


@pytest.mark.e2e
def test_onnx_upload_end_to_end(stack: Stack, exports, torch_report) -> None:
    options = {k: v for k, v in OPTIONS.items() if k != "model_args"}
    with stack.client() as http, exports["unfused"].open("rb") as handle:
        created = http.post(
            "/v1/audits",
            data={"arch": TINY_ARCH, "options": json.dumps(options)},
            files={"checkpoint": ("tiny.onnx", handle)},
        )
    assert created.status_code == 202, created.text
    status = stack.wait_for_audit(created.json()["id"])
    assert status["status"] == "finished", status
    with stack.client() as http:
        report = http.get(f"/v1/audits/{created.json()['id']}/report").json()
    assert report["model"]["format"] == "onnx"
    assert report["model"]["onnx_providers"][-1] == "CPUExecutionProvider"
    assert report["gradients"]["available"] is False
    assert_close(
        report["heads"]["layers"], torch_report["heads"]["layers"], HEAD_TOLERANCE, "heads.layers"
    )
    assert report["position_embedding"]["grid_structure_score"] == pytest.approx(
        torch_report["position_embedding"]["grid_structure_score"], abs=POSITION_TOLERANCE
    )
