"""The SGD step check: one real step on the position embedding inside the model.

The section analyses ``g = dL/d pos_embed`` (the gradient of the mean loss over the audited
images). If that is the gradient the model really has, then stepping the model's own
position table by ``-eta * g`` changes the mean loss of any subset S of those images by
``-eta * <g_S, g>`` to first order (Taylor; ``g_S`` the gradient of S's mean loss, from
the same backward pass; ``-eta * ||g||^2`` when S is every image), and changes every
attention logit ``s_ij`` of every layer by the directional derivative
``-eta * <ds_ij/d pos, g>``. This check does exactly that, on S = the first images
(`workers.analysis.gradients.CHECK_IMAGES`; ``num_images`` says how many), and compares:

- ``loss_change_real`` (after - before, same images, same targets) with
  ``loss_change_predicted = -eta * <g_S, g>``: ``relative_error`` = |real - predicted| /
  |predicted|. A gradient taken from the wrong tensors, a wrong loss, or a model whose
  forward differs from the one analysed (masks, dropout left on) all show up here.
- per layer, the Pearson correlation between the predicted change of the patch-to-patch
  logits (forward-mode derivative along the step, on the first `SGD_LOGIT_IMAGES` images)
  and their real change after the step.

The table is put back bit for bit afterwards (a saved copy, also when a forward raises).
The calculus behind the prediction (the cosine-change formula) is a unit test, not part of
the report: it holds by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.func import functional_call
from torch.profiler import record_function

from workers.analysis.capture import (
    attention_capture,
    attention_sites,
    explicit_attention,
    qk_capture,
)
from workers.analysis.results import finite_or_none

# Default step: the one whose first-order loss decrease is this fraction of the loss. Far
# above float32 rounding of a loss (~1e-7 relative), and small enough for the linear term
# to dominate: measured on random-init vit_tiny / vit_small (224 px, 8 natural-v1 images)
# relative errors 0.0028 / 0.0021 at 1e-3, 0.03 at 1e-2, 0.1-0.13 at 3e-2, 0.35-0.47 at 1e-1.
SGD_STEP_LOSS_FRACTION = 1e-3
# ... but never a step longer than this fraction of the table's norm (a model whose
# position gradient is tiny would otherwise get a huge step out of the linear regime).
SGD_STEP_MAX_TABLE_RATIO = 1e-2
# The check passes when the real loss change is within 20 % of the first-order prediction
# (the bar) ...
SGD_CHECK_MAX_REL_ERROR = 0.2
# ... and every layer's real logit changes correlate at least this well with the
# predicted ones (first-order agreement: near 1 at the default step; a step 30 times
# larger already bends it).
SGD_CHECK_MIN_LOGIT_CORRELATION = 0.9
# Images whose logit changes are compared: the first few of the stream (one extra
# forward-mode pass on these only; their logits after the step are read off the second
# forward's first batch). One image gives heads x N^2 logit pairs per layer (115,000 on
# ViT-Ti/16, 230,000 on ViT-S/16): the correlation checks the model's derivative along the
# step, not a statistic over images. The forward-mode pass costs ~4-5 forwards per image
# (0.27 s of a 10 s vit_tiny audit with 2 images, under torch.profiler).
SGD_LOGIT_IMAGES = 1

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(logits, targets) -> (B,)`` per-image losses, the section's objective."""


def default_step(loss: float, grad_norm: float, table_norm: float) -> float:
    """The default ``eta``: first-order loss decrease `SGD_STEP_LOSS_FRACTION` * loss,
    capped so the step is at most `SGD_STEP_MAX_TABLE_RATIO` of the table's norm."""
    if not grad_norm > 0:
        raise ValueError("the gradient is zero: there is no step to take")
    eta = SGD_STEP_LOSS_FRACTION * max(abs(loss), 1e-12) / grad_norm**2
    if table_norm > 0:
        eta = min(eta, SGD_STEP_MAX_TABLE_RATIO * table_norm / grad_norm)
    return eta


@contextmanager
def stepped(param: nn.Parameter, step: Tensor) -> Iterator[None]:
    """``param += step`` for the duration of the block; the exact old values come back."""
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.add_(step.to(param.dtype))
        yield
    finally:
        with torch.no_grad():
            param.copy_(saved)


def _patch_logits(q: Tensor, k: Tensor, scale: float, num_prefix: int) -> Tensor:
    p = num_prefix
    return (q[:, :, p:] * scale) @ k[:, :, p:].transpose(-1, -2)


def _logits_and_changes(
    model: nn.Module,
    param_name: str,
    param: nn.Parameter,
    direction: Tensor,
    images: Tensor,
    num_prefix: int,
) -> list[tuple[Tensor, Tensor]]:
    """Per layer: patch-to-patch logits ``s`` and their forward-mode derivative along
    ``direction`` (the step), on ``images``."""
    out = []
    with (
        torch.no_grad(),
        explicit_attention(model),
        fwad.dual_level(),
        attention_capture(model, with_gradients=True) as capture,
    ):
        capture.reset()
        dual = fwad.make_dual(param.detach(), direction.to(param.dtype))
        functional_call(model, {param_name: dual}, (images,))
        for site, taps in zip(capture.sites, capture.taps, strict=True):
            q, dq = fwad.unpack_dual(taps.q)
            k, dk = fwad.unpack_dual(taps.k)
            scale = float(site.module.scale)
            s = _patch_logits(q, k, scale, num_prefix)
            if dq is None or dk is None:  # the step does not reach this layer
                ds = torch.zeros_like(s)
            else:
                ds = _patch_logits(dq, k, scale, num_prefix) + _patch_logits(
                    q, dk, scale, num_prefix
                )
            out.append((s, ds))
    return out


def _pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def sgd_unavailable(reason: str) -> dict[str, Any]:
    """``sgd_step_check`` where no step can be taken: the contract keys, null, and why."""
    keys = ("eta", "loss_before", "loss_after", "loss_change_real", "loss_change_predicted")
    return {
        "available": False,
        "reason": reason,
        **dict.fromkeys(keys),
        "relative_error": None,
        "logit_change_correlation": [],
        "passed": None,
    }


def sgd_step_check(
    model: nn.Module,
    param: nn.Parameter,
    grad: Tensor,
    batches: Iterable[Tensor],
    targets: Tensor,
    losses_before: Tensor,
    loss_fn: LossFn,
    *,
    eta: float,
    num_prefix: int,
    subset_grad: Tensor | None = None,
) -> dict[str, Any]:
    """Step ``param`` (the model's position table) by ``-eta * grad`` inside the model and
    measure what changes; the report's ``sgd_step_check``.

    ``grad`` is the analysed gradient (of the mean loss over all audited images);
    ``batches`` are the first n of those images (image batches, as the gradient pass saw
    them), ``targets`` (n,) the targets that pass used for them and ``losses_before`` (n,)
    float64 their per-image losses there. ``subset_grad`` is the gradient of those n
    images' mean loss (default: ``grad``, when they are all the images); the predicted
    loss change is ``-eta <subset_grad, grad>``. The model must be in the mode the gradient
    pass ran in (eval); the forwards here run timm's explicit attention path, like that
    pass, without autograd; hooks on the first batch keep the logits of its first
    `SGD_LOGIT_IMAGES` images, and a forward-mode pass runs on those images only.
    """
    if not (eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a positive finite step size, got {eta}")
    name = next((n for n, p in model.named_parameters() if p is param), None)
    if name is None:
        raise ValueError("param is not a parameter of model")
    n = int(losses_before.shape[0])
    step = -eta * grad
    along = grad if subset_grad is None else subset_grad
    predicted = -eta * float((along.double() * grad.double()).sum())

    first: Tensor | None = None
    after = torch.empty(n, dtype=torch.float64)
    seen = 0
    # The first images' patch-to-patch logits after the step, read off the first batch's
    # forward (hooks on q_norm/k_norm) rather than from a forward of their own.
    sites = attention_sites(model)
    scales = {site.layer: float(site.module.scale) for site in sites}
    logits_after: dict[int, Tensor] = {}

    def keep_logits(layer: int, q: Tensor, k: Tensor) -> None:
        m = SGD_LOGIT_IMAGES
        logits_after[layer] = _patch_logits(q[:m], k[:m], scales[layer], num_prefix)

    with (
        torch.no_grad(),
        explicit_attention(model),
        stepped(param, step),
        record_function("sgd.second_forward"),
    ):
        for images in batches:
            b = images.shape[0]
            if seen + b > n:
                raise ValueError("batches hold more images than the gradient pass saw")
            if first is None:
                first = images[:SGD_LOGIT_IMAGES]
                with qk_capture(model, keep_logits, sites=sites):
                    logits = model(images)
            else:
                logits = model(images)
            after[seen : seen + b] = loss_fn(logits, targets[seen : seen + b].to(logits.device))
            seen += b
        if seen != n:
            raise ValueError(f"batches hold {seen} images, the gradient pass saw {n}")
    real_after = [logits_after[layer] for layer in sorted(logits_after)]
    correlations: list[float | None] = []
    if first is not None:
        with record_function("sgd.forward_mode"):
            before = _logits_and_changes(model, name, param, step, first, num_prefix)
        for (s, ds), s_after in zip(before, real_after, strict=True):
            correlations.append(finite_or_none(_pearson(ds, s_after - s)))

    real = float((after - losses_before).sum()) / n
    rel = abs(real - predicted) / abs(predicted) if predicted != 0 else float("nan")
    judged = [c for c in correlations if c is not None]
    passed = bool(
        np.isfinite(rel)
        and rel <= SGD_CHECK_MAX_REL_ERROR
        and len(judged) > 0  # a check with no layer to compare is not a pass
        and all(c >= SGD_CHECK_MIN_LOGIT_CORRELATION for c in judged)
    )
    return {
        "available": True,
        "eta": eta,
        "step_norm": eta * float(grad.norm()),
        "table_norm": float(param.detach().norm()),
        "loss_before": float(losses_before.sum()) / n,
        "loss_after": float(after.sum()) / n,
        "loss_change_real": real,
        "loss_change_predicted": predicted,
        "relative_error": finite_or_none(rel),
        "logit_change_correlation": correlations,
        "logit_images": 0 if first is None else int(first.shape[0]),
        "num_images": n,
        "passed": passed,
        "tolerance": {
            "max_relative_error": SGD_CHECK_MAX_REL_ERROR,
            "min_logit_correlation": SGD_CHECK_MIN_LOGIT_CORRELATION,
        },
        "description": (
            "one SGD step of size eta on the model's own position embedding along the "
            "analysed gradient g of the mean loss, then the first num_images images again: "
            "their real mean-loss change against the first-order prediction -eta <g_S, g> "
            "(g_S their own mean-loss gradient; = -eta*||g||^2 when they are all the "
            "images), and per layer "
            "the Pearson correlation between the real and the predicted (forward-mode "
            "derivative) change of the patch-to-patch attention logits; the table is "
            "restored exactly afterwards"
        ),
    }
