"""Find the absolute position table of an ONNX ViT by following the data path.

Exports store the table in many shapes: timm's ``pos_embed`` ``[1, prefix + h*w, D]`` added
as is; the same table split into prefix and patch rows, the patch rows resized to the input's
grid inside the graph (``Resize``; DINOv2, any ``dynamic_img_size`` export) and concatenated
back; or, after an exporter folded the reshape and transpose, a ``[1, D, h, w]`` initializer
feeding the ``Resize``. A shape test cannot tell those apart from other weights, so the table
is found where it enters the network:

1. forward from the patch-embedding ``Conv`` through layout ops (Reshape, Flatten,
   Transpose, Concat with the class token, ...) to the first ``Add``: the token sum;
2. backward from that Add's other input through the ops that move or resample a table
   (Slice, Reshape, Transpose, Resize, Concat, ...) to the initializers (or ``Constant``
   nodes) it is made of;
3. the largest of them is the patch table; its layout (rows, NCHW or NHWC) and grid come from
   its shape and the ops on the way.

Every op on the way is recorded, so the report can say how the graph turns the stored table
into the one the tokens receive; where the path cannot be followed, the error names the node
where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Ops that only move token data between layouts on the way from the patch Conv to the sum.
TOKEN_LAYOUT_OPS = frozenset(
    {"Reshape", "Flatten", "Transpose", "Concat", "Squeeze", "Unsqueeze", "Identity", "Cast"}
)
# Ops that move, cut or resample a position table on its way to the sum; the first input is
# the table (Concat: every input is a part of it).
TABLE_PATH_OPS = frozenset(
    {
        "Slice",
        "Reshape",
        "Flatten",
        "Transpose",
        "Resize",
        "Upsample",
        "Concat",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Cast",
        "Expand",
        "Gather",
    }
)
RESAMPLING_OPS = frozenset({"Resize", "Upsample"})
# Steps from the Conv to the sum, or from the sum back to the table, before giving up: a ViT
# export needs fewer than ten; a bound keeps a hostile graph from making the walk long.
MAX_PATH_NODES = 64


class TraceError(ValueError):
    """The path from the tokens to a position table cannot be followed; names the node."""


@dataclass(frozen=True)
class TracedTable:
    """The stored patch table and how the graph brings it to the tokens.

    ``patches`` is (h, w, D) as stored; ``grid`` its (h, w); ``source`` the initializer (or
    Constant node) it was read from; ``ops`` the op types from the table to the ``Add``
    (table side first); ``add_node`` the sum with the tokens; ``prefix_rows`` how many
    non-patch rows were stored with it (in the same tensor or concatenated beside it).
    """

    patches: np.ndarray
    grid: tuple[int, int]
    source: str
    ops: tuple[str, ...]
    add_node: str
    prefix_rows: int

    @property
    def resampled_in_graph(self) -> bool:
        return any(op in RESAMPLING_OPS for op in self.ops)


def _label(node) -> str:
    return f"node '{node.name or node.output[0]}' ({node.op_type})"


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _token_sum(graph, conv) -> tuple[object, str]:
    """The first Add the patch tokens reach through layout ops, and its other input."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier, seen = [conv.output[0]], set()
    last = conv
    while frontier and len(seen) < MAX_PATH_NODES:
        name = frontier.pop(0)
        for node in consumers.get(name, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Add":
                others = [i for i in node.input if i != name]
                if len(others) != 1:
                    raise TraceError(f"{_label(node)} adds the patch tokens to themselves")
                return node, others[0]
            if node.op_type in TOKEN_LAYOUT_OPS:
                last = node
                frontier.extend(node.output)
    raise TraceError(
        f"the patch tokens from {_label(conv)} reach no Add through layout ops "
        f"({', '.join(sorted(TOKEN_LAYOUT_OPS))}); the walk stopped after {_label(last)}"
    )


def _table_leaves(graph, start: str, constants: dict[str, np.ndarray]):
    """The constant tensors the Add's other input is made of, with the ops on the way."""
    producers = {out: node for node in graph.node for out in node.output}
    leaves: list[tuple[str, list[str]]] = []
    stack: list[tuple[str, list[str]]] = [(start, [])]
    visited = 0
    while stack:
        name, ops = stack.pop()
        visited += 1
        if visited > MAX_PATH_NODES:
            raise TraceError("the path from the token sum back to its table is too long")
        if (
            name in constants
            and name not in producers
            or (name in producers and producers[name].op_type == "Constant")
        ):
            leaves.append((name, ops))
            continue
        node = producers.get(name)
        if node is None:
            raise TraceError(
                f"the tokens' summand '{start}' comes from the graph input '{name}', not from a "
                "stored table"
            )
        if node.op_type not in TABLE_PATH_OPS:
            raise TraceError(
                f"the path from the token sum back to its position table stops at "
                f"{_label(node)}: not an op that moves or resamples a table "
                f"({', '.join(sorted(TABLE_PATH_OPS))})"
            )
        inputs = list(node.input) if node.op_type == "Concat" else [node.input[0]]
        for item in inputs:
            if item:
                stack.append((item, [node.op_type, *ops]))
    return leaves


def _holds_rows(shape: tuple[int, ...], dim: int) -> bool:
    """Whether an array of ``shape`` can hold position rows of width ``dim``."""
    return (len(shape) >= 2 and shape[-1] == dim) or (len(shape) == 4 and shape[1] == dim)


def _patch_grid(
    shape: tuple[int, ...], dim: int, prefix_rows: int, model_grid: tuple[int, int] | None
) -> tuple[np.ndarray | None, tuple[int, int], int]:
    """How a stored array of ``shape`` lays out its patches: (reshape order, grid, prefix
    rows inside it). Raises TraceError when the layout cannot be read."""
    if len(shape) == 4 and shape[0] == 1 and shape[1] == dim:  # [1, D, h, w]
        return np.array([0, 2, 3, 1]), (shape[2], shape[3]), 0
    if len(shape) == 4 and shape[0] == 1 and shape[3] == dim:  # [1, h, w, D]
        return None, (shape[1], shape[2]), 0
    rows = shape[-2] if len(shape) >= 2 and shape[-1] == dim else None
    if rows is None or (len(shape) == 3 and shape[0] != 1) or len(shape) > 3:
        raise TraceError(f"a table of shape {list(shape)} does not hold rows of width {dim}")
    for inside in sorted({prefix_rows, 0, 1, 2, 5}):
        patches = rows - inside
        if patches <= 0:
            continue
        if model_grid is not None and patches == model_grid[0] * model_grid[1]:
            return None, model_grid, inside
        side = math.isqrt(patches)
        if side * side == patches and (model_grid is None or model_grid[0] == model_grid[1]):
            return None, (side, side), inside
    expected = (
        "" if model_grid is None else f"the input's {model_grid[0]}x{model_grid[1]} grid nor "
    )
    raise TraceError(
        f"a table of {rows} rows is neither {expected}a square grid (with up to 5 prefix rows): "
        "its grid cannot be read from its shape"
    )


def trace_position_table(
    graph, conv, *, dim: int, model_grid: tuple[int, int] | None
) -> TracedTable:
    """The stored position table of an ONNX ViT graph, found along the data path (see the
    module docstring). ``conv`` is the patch-embedding node, ``dim`` the embedding width,
    ``model_grid`` the grid of the graph's input, None when it is dynamic (tables stored as
    rows are read on that grid, or else on a square one). Raises TraceError naming the node where the path could not be followed."""
    add, summand = _token_sum(graph, conv)
    constants = _constants(graph)
    leaves = _table_leaves(graph, summand, constants)
    sized = [
        (name, ops, constants[name])
        for name, ops in leaves
        if name in constants and _holds_rows(constants[name].shape, dim)
    ]
    if not sized:
        shapes = ", ".join(f"'{n}' {list(constants[n].shape)}" for n, _ in leaves if n in constants)
        raise TraceError(
            f"{_label(add)} adds the tokens to constants ({shapes or 'none'}) none of which "
            f"holds rows of width {dim}"
        )
    name, ops, table = max(sized, key=lambda item: item[2].size)
    beside = sum(
        int(np.prod(constants[n].shape[:-1]))
        for n, _, _ in sized
        if n != name and constants[n].shape[-1] == dim
    )
    order, grid, inside = _patch_grid(tuple(table.shape), dim, beside, model_grid)
    values = np.asarray(table, dtype=np.float64)
    if order is not None:
        patches = values.transpose(*order).reshape(grid[0], grid[1], dim)
    else:
        flat = values.reshape(-1, dim)
        patches = flat[inside:].reshape(grid[0], grid[1], dim)
    return TracedTable(
        patches=patches,
        grid=grid,
        source=name,
        ops=tuple(ops),
        add_node=add.name or add.output[0],
        prefix_rows=beside + inside,
    )
