"""ONNX ViT exports -> what the analyses need, through ONNX Runtime.

An ONNX file has no ``model.blocks`` to hook, so this module reads the facts from the graph
and taps the attention where the export computes it:

- input size: the image input's static (H, W), or for an input with dynamic H and W the size
  of the stored position table's grid; patch size: the patch-embedding ``Conv`` (kernel
  equal to stride, no padding); grid = (H / patch, W / patch);
- attention: the output of every ``Softmax`` node, added as extra graph outputs and checked
  to be (batch, heads, prefix + patches, prefix + patches) with rows summing to 1; prefix
  tokens = tokens - patches;
- position embedding: the table the patch tokens are added to, found by following the data
  path from the patch ``Conv`` to the token sum and back to the stored initializer, through
  any Slice/Reshape/Transpose/Resize/Concat on the way (`workers.analysis.onnx_trace`); it
  is analysed as stored, whatever grid it covers.

What cannot be read that way is refused with the node and what was expected: a fused
``Attention`` op (recent opsets, ORT's contrib ops) has no probabilities to tap; weights in
a side file are read only from files uploaded beside the model (never through a path that
leaves the upload folder).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from workers.analysis.grid import Grid
from workers.analysis.loading import CheckpointError
from workers.analysis.onnx_trace import TracedTable, TraceError, trace_position_table
from workers.analysis.posembed import PositionTable, matches_sincos

# Protobuf cannot serialise a model above 2 GiB, and the session is built from bytes.
MAX_ONNX_BYTES = 2_000_000_000
# Softmax rows are float32; over a few hundred tokens the sum drifts by ~1e-6. A row off by
# more than this is not a probability distribution (a masked or scaled output, not the taps).
ROW_SUM_TOLERANCE = 1e-3
# (domain, op) pairs that compute attention in one node, so there is no Softmax to tap.
FUSED_ATTENTION_OPS = {
    ("", "Attention"),
    ("ai.onnx", "Attention"),
    ("com.microsoft", "Attention"),
    ("com.microsoft", "MultiHeadAttention"),
    ("com.microsoft", "PackedMultiHeadAttention"),
    ("com.microsoft", "GroupQueryAttention"),
}
REEXPORT_HINT = (
    "Re-export from timm with the attention unfused and the weights inside the file: "
    "`for block in model.blocks: block.attn.fused_attn = False`, then "
    "`torch.onnx.export(model, torch.randn(1, 3, H, W), 'model.onnx', dynamo=False, opset_version=17)`"
)


class OnnxModelError(CheckpointError):
    """The ONNX file cannot be interpreted as a ViT; the message names the node and why."""


@dataclass
class OnnxViT:
    """An ONNX ViT opened in ONNX Runtime with its attention Softmax outputs exposed."""

    session: object  # onnxruntime.InferenceSession
    providers: list[str]  # the execution providers the session runs on, in priority order
    input_name: str
    logits_name: str
    attention_names: list[str]  # Softmax outputs, one per block, in graph order
    attention_nodes: list[str]
    img_size: tuple[int, int]
    patch_size: int
    grid: Grid
    num_prefix_tokens: int
    num_heads: int
    num_classes: int
    embed_dim: int
    num_initializer_values: int  # stored weights; exporters merge identical tensors
    opset: int
    patch_embed_node: str
    pos_table: TracedTable | None = None  # the stored table and its path to the tokens
    pos_table_error: str | None = None  # why none was found (names the node)
    notes: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.attention_names)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid.num_patches


def _node_label(node) -> str:
    return f"node '{node.name or node.output[0]}' ({node.op_type})"


def _external_files(model, model_dir: Path, allowed_root: Path) -> list[Path]:
    """The side files the model's tensors point to, each checked to lie inside
    ``allowed_root`` and to exist; raise OnnxModelError otherwise."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    root = allowed_root.resolve()
    files: dict[Path, None] = {}
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (model_dir / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise OnnxModelError(
                f"tensor '{tensor.name}' points to external data '{location}', outside the "
                "upload; external data must sit beside the model in the same upload. "
                + REEXPORT_HINT
            )
        if not target.is_file():
            raise OnnxModelError(
                f"tensor '{tensor.name}' keeps its weights in the side file '{location}', which "
                "was not uploaded with the model; upload it in the same request. " + REEXPORT_HINT
            )
        files[target] = None
    return list(files)


def _image_input(graph, initializers: set[str]) -> tuple[str, tuple[int, int] | None]:
    """The image input and its (H, W); None when both are dynamic (the size is then taken
    from the stored position table)."""
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(f"'{i.name}'" for i in inputs) or "none"
        raise OnnxModelError(
            f"the graph has inputs {names}; expected exactly one image input (batch, 3, H, W)"
        )
    value = inputs[0]
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise OnnxModelError(
            f"graph input '{value.name}' has rank {len(dims)}; expected an image batch (batch, 3, H, W)"
        )
    channels, height, width = (d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
    if channels != 3 or bool(height) != bool(width):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        raise OnnxModelError(
            f"graph input '{value.name}' has shape {shape}; expected (batch, 3, H, W) with H "
            "and W both fixed or both dynamic"
        )
    return value.name, (int(height), int(width)) if height else None


def _patch_embedding(graph, input_name: str, init_shapes: dict[str, list[int]]):
    """The first Conv on the image input: (node, patch_size, embed_dim)."""
    import onnx

    convs = [n for n in graph.node if n.op_type == "Conv"]
    if not convs:
        raise OnnxModelError(
            "no Conv node found; expected the patch embedding as a Conv with kernel = stride"
        )
    direct = [n for n in convs if n.input[0] == input_name]
    node = (direct or convs)[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs.get("kernel_shape") or init_shapes.get(node.input[1], [0, 0, 0, 0])[2:])
    strides = list(attrs.get("strides") or [1, 1])
    pads = list(attrs.get("pads") or [0, 0, 0, 0])
    if (
        len(kernel) != 2
        or kernel != strides
        or kernel[0] != kernel[1]
        or any(pads)
        or attrs.get("group", 1) != 1
    ):
        raise OnnxModelError(
            f"{_node_label(node)} is not a ViT patch embedding: expected a square kernel equal "
            f"to its stride with no padding, got kernel_shape={kernel}, strides={strides}, pads={pads}"
        )
    weight = init_shapes.get(node.input[1])
    if weight is None or len(weight) != 4:
        raise OnnxModelError(
            f"{_node_label(node)}: its weight '{node.input[1]}' is not a 4-d initializer"
        )
    return node, int(kernel[0]), int(weight[0])


def _pick_providers(requested: list[str] | None) -> list[str]:
    import onnxruntime as ort

    if requested is not None:
        return requested
    available = ort.get_available_providers()
    # onnxruntime-gpu lists CUDA even without a GPU and then falls back with an error log;
    # ask for it only when torch sees a device.
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx_model(
    path: Path,
    *,
    allowed_root: Path | None = None,
    max_bytes: int = MAX_ONNX_BYTES,
    providers: list[str] | None = None,
    threads: int | None = None,
) -> OnnxViT:
    """Open an ONNX ViT export and check that it can be audited.

    ``allowed_root`` is the folder external data may come from (default: the model's own
    folder). The model plus its side files must stay under ``max_bytes``. One image of zeros
    runs through the model to check every attention output; raises OnnxModelError (a
    CheckpointError) with the node and what was expected when something does not fit.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise OnnxModelError(f"the ONNX file is {size} bytes; the limit is {max_bytes} bytes")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: not a protobuf ModelProto
        raise OnnxModelError(f"the .onnx file is not a readable ONNX model: {exc}") from None
    side_files = _external_files(model, path.parent, allowed_root or path.parent)
    total = size + sum(f.stat().st_size for f in side_files)
    if total > max_bytes:
        raise OnnxModelError(
            f"the ONNX model and its external data are {total} bytes; the limit is {max_bytes} bytes"
        )
    notes: list[str] = []
    if side_files:
        onnx.load_external_data_for_model(model, str(path.parent))
        notes.append(
            f"weights were read from the side file(s) {', '.join(f.name for f in side_files)}"
        )

    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    for node in graph.node:
        if (node.domain, node.op_type) in FUSED_ATTENTION_OPS:
            raise OnnxModelError(
                f"{_node_label(node)} computes attention in one fused op (opset {opset}); the "
                "attention probabilities cannot be read from it. " + REEXPORT_HINT
            )
    init_shapes = {t.name: list(t.dims) for t in graph.initializer}
    input_name, img_size = _image_input(graph, set(init_shapes))
    conv, patch, dim = _patch_embedding(graph, input_name, init_shapes)
    pos_table, pos_error = None, None
    try:
        input_grid = None if img_size is None else (img_size[0] // patch, img_size[1] // patch)
        pos_table = trace_position_table(graph, conv, dim=dim, model_grid=input_grid)
    except TraceError as exc:
        pos_error = str(exc)
    if img_size is None:
        if pos_table is None:
            raise OnnxModelError(
                f"graph input '{input_name}' has dynamic H and W, and the size cannot be taken "
                f"from a stored position table ({pos_error}); export with a fixed image size"
            )
        img_size = (pos_table.grid[0] * patch, pos_table.grid[1] * patch)
        notes.append(
            f"the input's H and W are dynamic: audited at {img_size[0]}x{img_size[1]}, the "
            f"size of the stored position table's {pos_table.grid[0]}x{pos_table.grid[1]} grid"
        )
    if img_size[0] % patch or img_size[1] % patch:
        raise OnnxModelError(
            f"input {img_size[0]}x{img_size[1]} is not a multiple of the patch size {patch} ({_node_label(conv)})"
        )
    grid = Grid(img_size[0] // patch, img_size[1] // patch, patch)

    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    if not softmaxes:
        raise OnnxModelError(
            "no Softmax node found: the attention probabilities cannot be tapped. " + REEXPORT_HINT
        )
    logits_name = graph.output[0].name
    existing = {o.name for o in graph.output}
    for node in softmaxes:
        if node.output[0] not in existing:
            graph.output.append(
                onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
            )

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=_pick_providers(providers)
        )
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise OnnxModelError(
            f"ONNX Runtime cannot open the model: {str(exc).strip().splitlines()[0]}"
        ) from None

    vit = OnnxViT(
        session=session,
        providers=list(session.get_providers()),
        input_name=input_name,
        logits_name=logits_name,
        attention_names=[n.output[0] for n in softmaxes],
        attention_nodes=[n.name or n.output[0] for n in softmaxes],
        img_size=img_size,
        patch_size=patch,
        grid=grid,
        num_prefix_tokens=0,
        num_heads=0,
        num_classes=0,
        embed_dim=dim,
        num_initializer_values=int(sum(int(np.prod(s)) for s in init_shapes.values())),
        opset=opset,
        patch_embed_node=conv.name or conv.output[0],
        pos_table=pos_table,
        pos_table_error=pos_error,
        notes=notes,
    )
    logits, probs = run_attention(vit, np.zeros((1, 3, *img_size), dtype=np.float32))
    vit.num_classes = int(logits.shape[-1])
    vit.num_heads = int(probs[0].shape[1])
    vit.num_prefix_tokens = int(probs[0].shape[-1]) - grid.num_patches
    return vit


def run_attention(vit: OnnxViT, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run one batch; return logits (B, classes) and every layer's probabilities
    (B, heads, T, T), each checked for shape and row sums (raise OnnxModelError)."""
    outputs = vit.session.run([vit.logits_name, *vit.attention_names], {vit.input_name: images})
    logits, probs = outputs[0], outputs[1:]
    batch = images.shape[0]
    expected_tokens = None
    for node, p in zip(vit.attention_nodes, probs, strict=True):
        tokens = p.shape[-1] if p.ndim == 4 else None
        if (
            p.ndim != 4
            or p.shape[0] != batch
            or p.shape[2] != tokens
            or tokens < vit.grid.num_patches
        ):
            raise OnnxModelError(
                f"Softmax node '{node}' gives {list(p.shape)}; expected attention probabilities "
                f"[batch={batch}, heads, tokens, tokens] with tokens >= the {vit.grid.num_patches} "
                f"patches of the {vit.grid.height}x{vit.grid.width} grid"
            )
        if expected_tokens is None:
            expected_tokens = tokens
        elif tokens != expected_tokens or (vit.num_heads and p.shape[1] != vit.num_heads):
            raise OnnxModelError(
                f"Softmax node '{node}' gives {list(p.shape)}; earlier layers gave {expected_tokens} tokens"
            )
        deviation = float(np.abs(p.sum(-1, dtype=np.float64) - 1.0).max())
        if not deviation <= ROW_SUM_TOLERANCE:
            raise OnnxModelError(
                f"Softmax node '{node}': rows sum to 1 within {deviation:.2g}; expected attention "
                f"probabilities (rows summing to 1 within {ROW_SUM_TOLERANCE})"
            )
    return logits, probs


def attention_batches(
    vit: OnnxViT, images: Tensor, *, batch_size: int, prepare=None
) -> Iterator[Tensor]:
    """(layers, B', heads, T, T) float32 probabilities per batch of ``images`` (M, 3, H, W),
    for `workers.analysis.heads.statistics_from_attention`. ``prepare`` maps each batch
    before it runs (e.g. append its low-passed copy)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for batch in images.split(batch_size):
        batch = prepare(batch) if prepare is not None else batch
        _, probs = run_attention(vit, batch.detach().to("cpu", torch.float32).contiguous().numpy())
        yield torch.from_numpy(np.stack(probs))


def position_table(vit: OnnxViT) -> PositionTable:
    """The stored patch rows of the position table the tokens are added to, on the grid the
    table covers (which may differ from the input's grid when the graph resamples it), as
    `PositionTable`.

    An ONNX file does not say whether a table was trained: ``kind`` is ``fixed_sincos`` when
    it equals the 2-D sin-cos construction, otherwise ``learned_absolute``.
    """
    grid, traced = vit.grid, vit.pos_table
    if traced is None:
        return PositionTable(
            grid=grid,
            kind="none",
            detail=f"no absolute position table could be read from the export: {vit.pos_table_error}",
            num_prefix_tokens=vit.num_prefix_tokens,
        )
    patches = torch.from_numpy(traced.patches)
    table_grid = Grid(traced.grid[0], traced.grid[1], grid.patch_size)
    is_sincos = matches_sincos(patches, table_grid) if min(traced.grid) >= 2 else False
    path = " -> ".join(
        ["initializer '" + traced.source + "'", *traced.ops, f"Add '{traced.add_node}'"]
    )
    if is_sincos:
        kind, detail = "fixed_sincos", "the table equals the standard 2-D sin-cos construction"
    else:
        kind, detail = "learned_absolute", "an absolute position table; assumed learned"
    how = (
        f"the graph resamples it to the input's {grid.height}x{grid.width} grid on every call"
        if traced.resampled_in_graph
        else "the graph adds it as stored"
    )
    return PositionTable(
        grid=grid,
        kind=kind,
        detail=(
            f"{detail} ({traced.grid[0]}x{traced.grid[1]} patch rows as stored; data path: "
            f"{path}; {how})"
        ),
        table=patches.clone(),
        table_grid=traced.grid,
        resample_method=(
            f"resized inside the ONNX graph ({' -> '.join(traced.ops)})"
            if traced.resampled_in_graph
            else None
        ),
        num_prefix_tokens=vit.num_prefix_tokens,
        prefix_in_table=traced.prefix_rows > 0,
        trainable=None,
        matches_sincos=is_sincos,
    )
