"""Gradient alignment: how the loss pushes queries, keys and the position embedding.

The textbook story this section checks, for one checkpoint and one image set: with
``s_ij = Q_i . K_j * scale`` (``scale = 1/sqrt(d)``) and ``A = softmax(s)``, the gradient is
``dL/dQ_i = scale * sum_j G_ij K_j`` with ``G_ij = dL/ds_ij``. Gradient descent then raises
``s_ij`` for neighbouring patches and lowers it for distant ones, and because
``X_i = patch_i + pos_i`` the same gradient reaches ``pos_i``, so neighbouring position
embeddings are pulled together. Every number here says whether that holds, and where not.

This module runs the pass (capture, one backward per batch, per-batch sums) and assembles
the section; the concepts live beside it: `gradient_formula` (the formula and its check),
`gradient_pressure` (logit, angle and position pressures, head divergence),
`gradient_sgd` (the SGD step check) and `gradient_verdict` (the verdict).

Conventions used throughout:

- Loss: the objective's per-image loss (`workers.analysis.objectives`): cross-entropy of
  every image against its label
  (``labels_source="labels"``) or, when no labels are given, against the model's own argmax
  prediction (``"predictions"``); for an embedding model (no classifier head, or a CLIP-style
  projection) the proxy objective of `workers.analysis.objectives`. ``objective`` names the
  one used.
- "Per image": logit, angle and formula statistics are computed from the gradient of each
  image's own loss and averaged over images. The position-embedding and head gradients are
  gradients of the mean loss over all images (the sum of per-image gradients divided by the
  number of images). Both are sums over images at heart, so the analysis streams: one
  forward and ONE backward pass per batch feed every statistic, and memory depends on the
  batch size, not on the number of images. Beside the sums, a few numbers per image are
  kept (each layer's head-mean logit pressure per distance bin, the position cos-change
  profile of the image's own gradient, its loss and target): the verdict's bootstrap
  resamples them (`gradient_verdict`) without another pass.
- Second pass: the SGD step check (`gradient_sgd`) steps the model's own position table
  and runs the first `CHECK_IMAGES` images once more, without autograd or capture (plus a
  forward-mode and a captured forward on the first few images), so ``batches`` is read
  twice (the second time only as far as those images).
- Pressure: ``-G_ij``, the rate at which one gradient-descent step on ``s`` raises the
  attention logit of query ``i`` on key ``j``. Positive = the loss wants more attention there.
  Each row of ``G`` sums to zero over all keys (prefix tokens included), so pressure is a
  redistribution: what one key gains, others lose. Patch-to-patch pairs only; prefix keys
  are reported separately as ``prefix_key_pressure``.
- Distances and bins come from :class:`workers.analysis.grid.Grid` (bin ``b`` holds the
  pairs whose Euclidean grid distance rounds to ``b``; bin 0 = the patch itself).
  "Near" is bin 1 (4- and 8-neighbours); "far" is every bin from
  ``max(2, ceil(num_bins / 2))`` on. The story predicts pressure > 0 near and < 0 far.

Mechanics: `capture.attention_capture` with ``with_gradients=True`` (the same capture the
head statistics use) switches each block's ``attn.fused_attn`` off so that ``attn.attn_drop``
(identity in eval mode) sees the attention probabilities ``P``; its hooks on
``attn.q_norm`` / ``attn.k_norm`` give Q and K as they enter the product (after any q/k
norm) and ``attn_drop`` gives ``P``. A hook on ``model.pos_drop`` gives the tokens whose
gradient is each image's own position gradient. One ``torch.autograd.grad`` call per batch
returns dL/dQ, dL/dK, dL/dP, dL/d pos_embed and dL/d qkv.weight; ``G`` is rebuilt from
``P`` and ``dL/dP`` (softmax Jacobian), never by a second backward pass. The model is put
back exactly as found (flags, train/eval modes, ``requires_grad``; ``.grad`` is never
written because ``autograd.grad`` does not accumulate into it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.profiler import record_function

from workers.analysis.capture import (
    AttentionCapture,
    BatchAttentionCallback,
    attention_capture,
    attention_sites,
    evaluating,
)
from workers.analysis.gradient_formula import (
    agreement_sums,
    cosine_change_rate,
    formula_check,
    logit_gradient,
    summed_cosine_change_rate,
)
from workers.analysis.gradient_pressure import (
    DistanceBins,
    head_divergence,
    jsonable,
    layer_pressure_rows,
    position_pressure,
)
from workers.analysis.gradient_sgd import default_step, sgd_step_check, sgd_unavailable
from workers.analysis.gradient_verdict import (
    bootstrap_weights,
    decide,
    interval,
    judge_layers,
    margins,
)
from workers.analysis.gradient_verdict import verdict as story_verdict
from workers.analysis.grid import Grid, grid_from_model
from workers.analysis.objectives import ClassifierObjective, InstanceDiscrimination
from workers.analysis.results import SectionResult, unavailable

QKCallback = Callable[[int, Tensor, Tensor, int], None]
"""``callback(layer, q, k, start)``: one layer's Q and K (B, heads, T, d) of a batch whose
first image is image number ``start``."""

# The two self-checks run on the first batches until this many images are in (whole
# batches, at least one). The formula check asks whether the hooked Q, K and P are the
# tensors autograd differentiates: a property of the model's code path, the same on every
# image, so more images add cost (two (B, H, T, T) x (B, H, T, d) products per layer, ~10 %
# of the section) and no evidence. The SGD step check steps the table along the analysed
# gradient g and runs these images again: their first-order loss change is
# -eta <g_S, g> (g_S: their own mean-loss gradient, from the same backward), so it tests g
# as well as all images would, for a quarter of the second forward at 64 images.
CHECK_IMAGES = 16
# ... unless the cosine between g_S and g is below this (then all images run again).
SGD_SUBSET_MIN_COSINE = 0.1

# --------------------------------------------------------------------------------------
# Capture: the shared attention capture, with gradients
# --------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[nn.Module] | str:
    """The timm ``Attention`` of every block, or the reason the model is not supported."""
    try:
        sites = attention_sites(model)
    except ValueError as error:
        return str(error)
    for site in sites:
        if not isinstance(site.module.qkv, nn.Linear):
            return f"{site.name}.qkv is not a Linear layer"
    return [site.module for site in sites]


@contextmanager
def _instrumented(
    model: nn.Module, params: list[nn.Parameter], tokens: dict[str, Tensor] | None
) -> Iterator[AttentionCapture]:
    """Eval mode, `attention_capture` with gradients, and requires_grad on ``params``; all
    undone on exit. With ``tokens`` (a dict), each forward also stores there, as
    ``"out"``, the tokens that leave ``model.pos_drop`` (patch tokens plus their position
    rows: their gradient is each image's own gradient on the position table)."""
    grad_flags = [(p, p.requires_grad) for p in params]
    handle = None
    with evaluating(model), attention_capture(model, with_gradients=True) as capture:
        try:
            for p in params:
                p.requires_grad_(True)
            if tokens is not None:
                handle = model.pos_drop.register_forward_hook(
                    lambda _m, _i, out: tokens.__setitem__("out", out)
                )
            yield capture
        finally:
            if handle is not None:
                handle.remove()
            if tokens is not None:
                tokens.clear()
            for p, flag in grad_flags:
                p.requires_grad_(flag)


# --------------------------------------------------------------------------------------
# Streaming accumulators
# --------------------------------------------------------------------------------------


class _Accumulator:
    """Per-batch sums; every statistic of the section is a function of these at the end."""

    def __init__(self, num_layers: int, num_heads: list[int], num_bins: int) -> None:
        z = torch.zeros
        self.n = 0
        self.loss_sum = 0.0
        self.pressure = [z(h, num_bins, dtype=torch.float64) for h in num_heads]
        self.angle = [z(h, num_bins, dtype=torch.float64) for h in num_heads]
        self.prefix_pressure = [z(h, dtype=torch.float64) for h in num_heads]
        # formula check sums per head: <auto, recon>, |auto|^2, |recon|^2, |auto - recon|^2,
        # and the summed position gradient, over the first batches (`CHECK_IMAGES`);
        # check_images counts their images
        self.check_images = 0
        self.check_pos_grad: Tensor | None = None
        self.fq = [z(4, h, dtype=torch.float64) for h in num_heads]
        self.fk = [z(4, h, dtype=torch.float64) for h in num_heads]
        self.fq_pre = [z(4, h, dtype=torch.float64) for h in num_heads]
        self.fk_pre = [z(4, h, dtype=torch.float64) for h in num_heads]
        self.qkv_grad: list[Tensor | None] = [None] * num_layers
        self.pos_grad: Tensor | None = None
        # Per image, for the bootstrap (a few numbers per image and layer): head-mean logit
        # pressure per bin (B, L, bins) and the position cos-change-rate profile of the
        # image's own gradient (B, bins); the targets and losses for the SGD step check.
        self.image_pressure: list[Tensor] = []
        self.image_pos: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.image_loss: list[Tensor] = []


@dataclass(frozen=True)
class _PositionRows:
    """The patch rows of the learned position table, fixed during the pass."""

    param: nn.Parameter
    offset: int  # first patch row of pos_embed
    table: Tensor  # (N, D) float64 copy of the patch rows
    per_image: bool  # each image's own gradient is observed (model.pos_drop is tapped)


def gradient_section(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]]
    | Callable[[], Iterable[tuple[Tensor, Tensor | None]]],
    *,
    grid: Grid | None = None,
    eta: float | None = None,
    seed: int = 0,
    on_attention: BatchAttentionCallback | None = None,
    on_qk: QKCallback | None = None,
    objective: ClassifierObjective | InstanceDiscrimination | None = None,
) -> SectionResult:
    """The ``gradients`` report section for a timm ViT and a stream of image batches.

    ``batches`` yields ``(images (B, C, H, W), labels (B,) long or None)``; either every
    batch has labels or none does. It is read twice (the SGD step check runs the same
    images again), so it is a collection or a function that returns a fresh iterator.
    ``grid`` defaults to ``patch_embed.grid_size``. ``eta`` is the step size of the SGD step
    check and of the reported first-order cosine changes; ``None`` picks
    `gradient_sgd.default_step` (reported as ``sgd_step_check.eta``). ``seed`` seeds
    torch's RNG for the duration of the analysis (the model runs in eval mode; this only
    matters for models that draw random numbers at inference) and the bootstrap. ``on_attention(layer, probs, start)``, when
    given, receives every layer's attention probabilities of every batch (B, heads, T, T),
    detached, with the index of the batch's first image, right after the forward: another
    analysis of the same images (head statistics) reduces them instead of running its own
    forward pass. ``on_qk(layer, q, k, start)`` likewise receives every layer's Q and K
    (B, heads, T, d) as they enter the logits, detached (for the Q/K geometry). Both run
    on the gradient pass's forward only, never on the SGD step's. ``objective`` is the loss (`workers.analysis.objectives`; default:
    cross-entropy against the labels or the model's predictions), named in ``objective``.

    Returns ``available: false`` with a reason for models it cannot instrument (no timm
    ``Attention`` blocks, no classifier head). The model is left exactly as it was.
    """
    if eta is not None and not (eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a positive finite step size, got {eta}")
    if callable(batches):
        read = batches
    elif iter(batches) is batches:
        raise ValueError(
            "batches is a one-shot iterator; pass a list or a function that returns a "
            "fresh iterator (the SGD step check reads the images twice)"
        )
    else:
        read = lambda: batches  # noqa: E731
    found = _attention_modules(model)
    if isinstance(found, str):
        return unavailable(found)
    attns = found
    if objective is None and getattr(model, "num_classes", None) == 0:
        return unavailable("model has no classifier head (num_classes=0): no loss to differentiate")
    objective = objective or ClassifierObjective()
    if grid is None:
        grid = grid_from_model(model)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    pos_param, pos_offset, pos_reason = _patch_position_table(model, grid, num_prefix)
    rows = None
    if pos_param is not None:
        N = grid.num_patches
        rows = _PositionRows(
            pos_param,
            pos_offset,
            pos_param.detach()[0, pos_offset : pos_offset + N].double().clone(),
            isinstance(getattr(model, "pos_drop", None), nn.Module),
        )
    tokens: dict[str, Tensor] | None = {} if rows is not None and rows.per_image else None

    qkv_weights = [a.qkv.weight for a in attns]
    params = qkv_weights + ([pos_param] if pos_param is not None else [])
    bins = DistanceBins.of(grid)
    heads = [int(a.num_heads) for a in attns]
    acc = _Accumulator(len(attns), heads, grid.num_distance_bins)
    has_norm = [
        not isinstance(a.q_norm, nn.Identity) or not isinstance(a.k_norm, nn.Identity)
        for a in attns
    ]
    labels_source: str | None = None
    first = next(model.parameters())
    device, dtype = first.device, first.dtype

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with _instrumented(model, params, tokens) as capture, torch.enable_grad():
            for images, labels in read():
                source = _check_batch(images, labels)
                if labels_source is None:
                    labels_source = source
                elif source != labels_source:
                    raise ValueError(
                        "batches mix labelled and unlabelled images; give labels "
                        "for every batch or for none"
                    )
                _process_batch(
                    model,
                    capture,
                    images.to(device=device, dtype=dtype),
                    labels,
                    on_attention,
                    on_qk,
                    acc,
                    grid,
                    bins,
                    num_prefix,
                    params,
                    rows,
                    tokens,
                    has_norm,
                    objective,
                )
        if acc.n == 0:
            raise ValueError("no images: `batches` yielded nothing")
        with record_function("gradients.sgd_step_check"):
            sgd, eta = _sgd_check(
                model, read, acc, rows, pos_reason, eta, num_prefix, device, dtype, objective.losses
            )
    with record_function("gradients.assemble"):
        result = _assemble(
            acc,
            attns,
            grid,
            bins,
            num_prefix,
            has_norm,
            labels_source,
            rows,
            pos_reason,
            eta,
            sgd,
            seed,
        )
    result.data["objective"] = objective.describe()
    if not isinstance(objective, ClassifierObjective):  # an embedding has no classes to label
        result.data["labels_source"] = None
    return result


def _sgd_check(
    model: nn.Module,
    read: Callable[[], Iterable[tuple[Tensor, Tensor | None]]],
    acc: _Accumulator,
    rows: _PositionRows | None,
    reason: str | None,
    eta: float | None,
    num_prefix: int,
    device: torch.device,
    dtype: torch.dtype,
    losses: Callable[[Tensor, Tensor], Tensor],
) -> tuple[dict[str, Any], float | None]:
    """The real SGD step on the model's position table (`gradient_sgd.sgd_step_check`);
    ``losses(output, targets)`` is the objective's per-image loss."""
    if rows is None or acc.pos_grad is None:
        return sgd_unavailable(reason or "no gradient reached the position embedding"), None
    g = acc.pos_grad / acc.n  # gradient of the mean loss, the whole table (prefix rows too)
    g_norm = float(g.norm())
    if g_norm == 0.0:
        return sgd_unavailable("the loss gradient on the position embedding is exactly zero"), None
    if eta is None:
        eta = default_step(acc.loss_sum / acc.n, g_norm, float(rows.param.detach().norm()))
    # The first `CHECK_IMAGES` images, unless their own gradient is nearly orthogonal to g
    # (their predicted change -eta <g_S, g> would be near 0 and the relative error
    # ill-conditioned): then all of them.
    count, g_subset = acc.check_images, acc.check_pos_grad / acc.check_images
    agreement = _cosine(g_subset, g)
    if count < acc.n and agreement < SGD_SUBSET_MIN_COSINE:
        count, g_subset, agreement = acc.n, g, 1.0

    def subset() -> Iterator[Tensor]:
        seen = 0
        for images, _ in read():
            if seen >= count:
                return
            seen += images.shape[0]
            yield images.to(device=device, dtype=dtype)

    with evaluating(model):
        sgd = sgd_step_check(
            model,
            rows.param,
            g.to(dtype),
            subset(),
            torch.cat(acc.targets)[:count],
            torch.cat(acc.image_loss)[:count],
            losses,
            eta=eta,
            num_prefix=num_prefix,
            subset_grad=g_subset.to(dtype),
        )
    sgd["subset_gradient_cosine"] = agreement
    return sgd, eta


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def _check_batch(images: Tensor, labels: Tensor | None) -> str:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    if labels is None:
        return "predictions"
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a ({images.shape[0]},) tensor, got {shape}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    return "labels"


def _patch_position_table(
    model: nn.Module, grid: Grid, num_prefix: int
) -> tuple[nn.Parameter | None, int, str | None]:
    """The learned pos_embed, the row where the patch part starts, or why there is none."""
    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, nn.Parameter):
        return None, 0, "model has no learned position embedding (pos_embed is None or fixed)"
    offset = 0 if getattr(model, "no_embed_class", False) else num_prefix
    if pos.ndim != 3 or pos.shape[1] - offset != grid.num_patches:
        return (
            None,
            0,
            (
                f"pos_embed {tuple(pos.shape)} does not cover the {grid.height}x"
                f"{grid.width} grid after {offset} prefix rows"
            ),
        )
    return pos, offset, None


def _process_batch(
    model: nn.Module,
    capture: AttentionCapture,
    images: Tensor,
    labels: Tensor | None,
    on_attention: BatchAttentionCallback | None,
    on_qk: QKCallback | None,
    acc: _Accumulator,
    grid: Grid,
    bins: DistanceBins,
    num_prefix: int,
    params: list[nn.Parameter],
    rows: _PositionRows | None,
    token_tap: dict[str, Tensor] | None,
    has_norm: list[bool],
    objective: ClassifierObjective | InstanceDiscrimination,
) -> None:
    capture.reset()
    with record_function("gradients.forward"):
        logits = model(images)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError("model output is not (B, num_classes) logits")
    for i, taps in enumerate(capture.taps):
        if taps.calls != 1 or taps.q is None or taps.k is None or taps.probs is None:
            raise RuntimeError(
                f"block {i}: attention probabilities were not seen exactly once (saw "
                f"{taps.calls}); the attention does not run timm's manual path"
            )
        tokens = taps.probs.shape[-1]
        if tokens - num_prefix != grid.num_patches:
            raise ValueError(
                f"block {i} attends over {tokens} tokens = {num_prefix} prefix + "
                f"{tokens - num_prefix} patches, but the grid {grid.height}x{grid.width} has "
                f"{grid.num_patches} patches"
            )
    if on_attention is not None:
        with torch.no_grad(), record_function("gradients.heads_reduce"):
            for i, taps in enumerate(capture.taps):
                on_attention(i, taps.probs.detach(), acc.n)
    if on_qk is not None:
        with torch.no_grad(), record_function("gradients.qk_reduce"):
            for i, taps in enumerate(capture.taps):
                on_qk(i, taps.q.detach(), taps.k.detach(), acc.n)
    targets = objective.targets(logits, labels)
    losses = objective.losses(logits, targets)
    loss = losses.sum()

    L = len(capture.taps)
    B = images.shape[0]
    check_formula = acc.check_images < CHECK_IMAGES
    image_pressure = torch.zeros(B, L, grid.num_distance_bins, dtype=torch.float64)
    pending: list[dict[str, Tensor]] = [{} for _ in range(L)]
    finished = [False] * L
    needed = [
        ("q", "k", "p", "q_pre", "k_pre") if has_norm[i] else ("q", "k", "p") for i in range(L)
    ]

    def finish(i: int) -> None:
        got = pending[i]
        with torch.no_grad(), record_function("gradients.layer_stats"):
            _layer_stats(
                i,
                capture,
                acc,
                image_pressure,
                grid,
                num_prefix,
                got["G"],
                got["q"],
                got["k"],
                got.get("q_pre"),
                got.get("k_pre"),
                check_formula,
            )
        pending[i] = {}
        finished[i] = True
        taps = capture.taps[i]  # the graph keeps what backward still needs
        taps.q = taps.k = taps.probs = taps.q_pre = taps.k_pre = None

    def on_grad(i: int, name: str) -> Any:
        def hook(grad: Tensor) -> None:
            if finished[i]:
                return
            got = pending[i]
            if name == "p":  # rebuild G now and drop dL/dP
                with torch.no_grad(), record_function("gradients.rebuild_G"):
                    # G in the model's precision, as autograd's own softmax backward forms
                    # it; one new (B, H, T, T) buffer
                    buffer = grad.detach().clone()
                    got["G"] = logit_gradient(capture.taps[i].probs.detach(), buffer, in_place=True)
                got["p"] = grad.new_empty(0)
            else:
                got[name] = grad.detach()
            if all(k in got for k in needed[i]):
                finish(i)

        return hook

    # Every layer's statistics are computed inside backward as soon as its dL/dP, dL/dQ and
    # dL/dK exist, so at most a layer or two of attention gradients live at any time; the
    # single autograd.grad call only returns the parameter gradients.
    token_grad: list[Tensor] = []
    if token_tap is not None and "out" in token_tap and token_tap["out"].requires_grad:
        token_tap.pop("out").register_hook(lambda grad: token_grad.append(grad.detach()))
    for i, taps in enumerate(capture.taps):
        taps.probs.register_hook(on_grad(i, "p"))
        taps.q.register_hook(on_grad(i, "q"))
        taps.k.register_hook(on_grad(i, "k"))
        if has_norm[i]:
            taps.q_pre.register_hook(on_grad(i, "q_pre"))
            taps.k_pre.register_hook(on_grad(i, "k_pre"))
    with record_function("gradients.backward"):
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(params, grads, strict=True)]
    # A tensor the loss does not reach gets no hook call: its gradient is zero.
    for i in range(L):
        if finished[i]:
            continue
        taps, got = capture.taps[i], pending[i]
        if "p" not in got:
            got["G"] = torch.zeros_like(taps.probs)
        for name in ("q", "k", "q_pre", "k_pre"):
            if name in needed[i] and name not in got:
                got[name] = torch.zeros_like(getattr(taps, name))
        finish(i)

    g_qkv = grads[:L]
    g_pos = grads[L] if rows is not None else None
    with torch.no_grad(), record_function("gradients.per_image_sums"):
        acc.n += B
        acc.check_images += B if check_formula else 0
        acc.loss_sum += float(loss.item())
        acc.targets.append(targets.cpu())
        acc.image_loss.append(losses.detach().double().cpu())
        acc.image_pressure.append(image_pressure)
        if rows is not None and rows.per_image:
            N = grid.num_patches
            if token_grad:
                g_rows = token_grad[0][:, num_prefix : num_prefix + N].double()
            else:  # the loss does not reach the tokens
                g_rows = torch.zeros(B, N, rows.table.shape[1], dtype=torch.float64)
            table = rows.table.to(g_rows.device).expand_as(g_rows)
            rate = cosine_change_rate(table, table, g_rows, g_rows)  # (B, N, N)
            acc.image_pos.append(grid.bin_mean(rate, include_self=False).cpu())
        if g_pos is not None:
            g = g_pos.detach().double()
            acc.pos_grad = g if acc.pos_grad is None else acc.pos_grad + g
            if check_formula:
                acc.check_pos_grad = g if acc.check_pos_grad is None else acc.check_pos_grad + g
        for i in range(L):
            g = g_qkv[i].detach().double()
            acc.qkv_grad[i] = g if acc.qkv_grad[i] is None else acc.qkv_grad[i] + g
    del grads


def _layer_stats(
    i: int,
    capture: AttentionCapture,
    acc: _Accumulator,
    image_pressure: Tensor,
    grid: Grid,
    num_prefix: int,
    G: Tensor,
    g_q: Tensor,
    g_k: Tensor,
    g_q_pre: Tensor | None,
    g_k_pre: Tensor | None,
    check_formula: bool,
) -> None:
    """Add layer ``i``'s sums for one batch; ``G`` (B, H, T, T) is dL/ds. With
    ``check_formula`` also the formula check's sums (`CHECK_IMAGES`).

    Dtypes: the (B, H, T, T) products run in the model's precision (float32, the same
    arithmetic as autograd's own backward); the reductions over pairs run there too, and
    only their small results (per head and bin) are added up in float64 across batches.
    The formula check squares and sums in float64 (`agreement_sums`: a cosine of 1 - 1e-6
    is 8 float32 ulps from 1).
    """
    taps = capture.taps[i]
    scale = float(capture.sites[i].module.scale)
    Q, K = taps.q.detach(), taps.k.detach()
    gQ, gK = g_q, g_k
    if check_formula:
        with record_function("gradients.formula_sums"):
            Gt = G.transpose(-1, -2)
            acc.fq[i] += agreement_sums(gQ, scale * G @ K)
            acc.fk[i] += agreement_sums(gK, scale * Gt @ Q)
            if g_q_pre is not None:
                Qp, Kp = taps.q_pre.detach(), taps.k_pre.detach()
                acc.fq_pre[i] += agreement_sums(g_q_pre, scale * G @ Kp)
                acc.fk_pre[i] += agreement_sums(g_k_pre, scale * Gt @ Qp)

    p = num_prefix
    with record_function("gradients.pressure_sums"):
        pressure = G[:, :, p:, p:].sum(0).neg_()  # (H, N, N), summed over images
        acc.pressure[i] += grid.bin_mean(pressure.double()).cpu()  # bins sum thousands of pairs
        # Each image's head-mean profile, for the bootstrap: (B, N, N) -> (B, bins)
        image_pressure[:, i] = grid.bin_mean(G[:, :, p:, p:].mean(1).neg_().double()).cpu()
        if p:
            acc.prefix_pressure[i] += (-G[:, :, p:, :p].sum(-1)).mean(-1).sum(0).cpu()
    del pressure
    with record_function("gradients.angle_sums"):
        rate = summed_cosine_change_rate(Q[:, :, p:], K[:, :, p:], gQ[:, :, p:], gK[:, :, p:])
        acc.angle[i] += grid.bin_mean(rate.double()).cpu()


# --------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------


def _assemble(
    acc: _Accumulator,
    attns: list[nn.Module],
    grid: Grid,
    bins: DistanceBins,
    num_prefix: int,
    has_norm: list[bool],
    labels_source: str | None,
    rows: _PositionRows | None,
    pos_reason: str | None,
    eta: float | None,
    sgd: dict[str, Any],
    seed: int,
) -> SectionResult:
    n = acc.n
    formula = formula_check(
        acc.fq, acc.fk, acc.fq_pre, acc.fk_pre, attns, has_norm, num_images=acc.check_images
    )
    weights = bootstrap_weights(n, seed=seed)
    image_pressure = torch.cat(acc.image_pressure).numpy()  # (n, L, bins)

    layers, patterns, pressure_arr, angle_arr = layer_pressure_rows(
        [x / n for x in acc.pressure],
        [x / n for x in acc.angle],
        [x / n for x in acc.prefix_pressure] if num_prefix else None,
        bins,
    )
    judgements, logit_samples = judge_layers(
        image_pressure, bins, weights, [r["judged"] for r in layers]
    )
    for row, pattern, judgement in zip(layers, patterns, judgements, strict=True):
        row.update(judgement)
        if not row["judged"]:
            row["undecided_reason"] = pattern.get("reason")

    divergence, div_q, div_k = head_divergence(acc.qkv_grad, acc.n, attns)
    pos, pos_arrays = _position(acc, grid, bins, rows, pos_reason, eta, weights)
    verdict = story_verdict(layers, logit_samples, pos, formula, n)
    if not formula["passed"]:  # no verdict stands on pressures that are not the gradient
        failed = "the formula check failed: the pressures are not the model's gradient"
        for row in [*layers, pos]:
            if "story_holds" in row:
                row["story_holds"] = None
                row["undecided_reason"] = failed

    data: dict[str, Any] = {
        "available": True,
        "loss": acc.loss_sum / n,
        "labels_source": labels_source,
        "num_images": n,
        "grid": [grid.height, grid.width],
        "num_prefix_tokens": num_prefix,
        "distance_bins": {
            "centres_patches": jsonable(bins.centres),
            "pair_counts": [int(c) for c in bins.counts],
            "near_bins": list(bins.near),
            "far_bins": list(bins.far),
        },
        "units": (
            "logit pressure = -dL/ds per image (dL/ds of that image's own loss), mean "
            "over images and over the pairs of a bin; angle pressure = d cos(Q_i, K_j) "
            "per unit gradient step on the image's Q and K; prefix key pressure = "
            "-sum over prefix keys of dL/ds per patch query (attention the loss wants "
            "moved onto the prefix tokens), mean over queries, heads and images"
        ),
        "formula_check": formula,
        "sgd_step_check": sgd,
        "layers": layers,
        "position_embedding": pos,
        "head_divergence": divergence,
        "verdict": verdict,
    }
    arrays = {
        "gradient_logit_pressure": pressure_arr,
        "gradient_angle_pressure": angle_arr,
        "gradient_distance_bin_centres": bins.centres.astype(np.float64),
        "gradient_head_divergence_q": div_q,
        "gradient_head_divergence_k": div_k,
        "gradient_image_logit_pressure": image_pressure,
        **pos_arrays,
    }
    from workers.analysis import plots_gradients
    from workers.analysis.figures import figure

    figures = {
        "gradient_logit_pressure": figure(
            plots_gradients.plot_logit_pressure,
            pressure_arr,
            bins.centres,
            near_bins=bins.near,
            far_bins=bins.far,
        ),
    }
    if "gradient_pos_cos_change_rate" in pos_arrays:
        figures["gradient_pos_pressure"] = figure(
            plots_gradients.plot_pos_pressure, pos_arrays["gradient_pos_cos_change_rate"], grid
        )
    return SectionResult(data=data, arrays=arrays, figures=figures)


def _position(
    acc: _Accumulator,
    grid: Grid,
    bins: DistanceBins,
    rows: _PositionRows | None,
    reason: str | None,
    eta: float | None,
    weights: np.ndarray,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The position part: pressures of the mean-loss gradient, judged by the bootstrap of
    each image's own gradient's profile."""
    if rows is None or acc.pos_grad is None:
        return {
            "available": False,
            "reason": reason or "no gradient reached the position embedding",
        }, {}
    N = grid.num_patches
    g = (acc.pos_grad[0, rows.offset : rows.offset + N] / acc.n).cpu()  # mean-loss gradient
    if float(g.norm()) == 0.0:
        why = "the loss gradient on the position embedding is exactly zero"
        return {"available": False, "reason": why}, {}
    pos, arrays = position_pressure(rows.table.cpu(), g, grid, bins, offset=rows.offset, eta=eta)
    if pos["story_holds"] is None:  # unreached or no far bins: no interval applies
        pos["margin_ci95"] = None
    elif not acc.image_pos:
        pos.update(
            margin_ci95=None,
            story_holds=None,
            undecided_reason="each image's own position gradient is not observable here "
            "(the model has no pos_drop module)",
        )
    else:
        image_pos = np.nan_to_num(torch.cat(acc.image_pos).numpy(), nan=0.0)  # (n, bins)
        ci = interval(margins(weights @ image_pos, bins))
        holds, why = decide(ci, acc.n)
        pos.update(margin_ci95=ci, story_holds=holds, undecided_reason=why)
        arrays["gradient_image_pos_cos_change_rate"] = image_pos
    return pos, arrays
