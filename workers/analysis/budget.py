"""What a model will cost, estimated before anything is allocated.

The architecture is built on PyTorch's ``meta`` device (shapes only, no storage, no
initialisation) with the request's ``model_args`` and the checkpoint-derived
``num_classes``; its parameters, tokens and the activations one audit batch keeps are
counted there and compared with the worker's limits. Only a model within every limit, whose
state dict fits it shape for shape, is then built for real (`workers.analysis.loading`).

The defaults admit every ViT in ``service/timm_vit_models.txt`` at its default size with
``batch_size`` 1 (tested); an operator lowers them to what the worker's memory holds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from workers.analysis.checkpoint_errors import ModelTooLarge

#: Same bound as the ``model_args.num_classes`` option (`service.models.ModelArgs`); a head
#: of ``[N, 0]`` is zero bytes on disk but asks for ``N`` classes.
MAX_NUM_CLASSES = 100_000
#: ``mlp_ratio`` of real ViTs lies between 2 and 5 (vit_gigantic: 64/13).
MAX_MLP_RATIO = 16.0
BYTES_PER_FLOAT = 4  # the audit runs in float32
#: Attention-sized maps one gradient batch keeps per head: the probabilities P, dL/dP for
#: every block at once (one ``autograd.grad`` call), and G rebuilt from them.
ATTENTION_MAPS_KEPT = 3
#: Per-token outputs kept per linear layer and norm: the forward value and its gradient.
TOKEN_OUTPUTS_KEPT = 2

LIMIT_DEFAULTS = {
    "VITAUDIT_MAX_MODEL_PARAMS": 4_000_000_000,  # aimv2_3b: 2.72e9
    "VITAUDIT_MAX_TOKENS": 8192,  # vit_so400m_patch14_siglip_gap_896: 4096
    "VITAUDIT_MAX_ACTIVATION_BYTES": 128 * 1024**3,  # so400m at 896, one image: ~91 GiB
}


@dataclass(frozen=True)
class Limits:
    max_params: int
    max_tokens: int
    max_activation_bytes: int

    @classmethod
    def from_env(cls) -> Limits:
        def read(name: str) -> int:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return LIMIT_DEFAULTS[name]
            try:
                value = int(float(raw))
            except ValueError:
                raise ValueError(f"{name} must be a positive number, not {raw!r}") from None
            if value < 1:
                raise ValueError(f"{name} must be a positive number, not {raw!r}")
            return value

        return cls(
            read("VITAUDIT_MAX_MODEL_PARAMS"),
            read("VITAUDIT_MAX_TOKENS"),
            read("VITAUDIT_MAX_ACTIVATION_BYTES"),
        )


@dataclass(frozen=True)
class Estimate:
    """What a model costs: ``params`` parameters, ``tokens`` per image, and
    ``activation_bytes`` kept per image by a gradient batch (times the batch size)."""

    params: int
    tokens: int
    activation_bytes_per_image: int

    def activation_bytes(self, batch_size: int) -> int:
        return self.activation_bytes_per_image * batch_size


def check_model_args(model_args: dict[str, Any]) -> None:
    """Bounds of the fields the estimate cannot see before building (ModelTooLarge)."""
    ratio = model_args.get("mlp_ratio")
    if ratio is not None and not 0 < float(ratio) <= MAX_MLP_RATIO:
        raise ModelTooLarge(f"model_args.mlp_ratio is {ratio}; it must be in (0, {MAX_MLP_RATIO}]")
    classes = model_args.get("num_classes")
    if classes is not None and int(classes) > MAX_NUM_CLASSES:
        raise ModelTooLarge(f"num_classes is {classes}, over the limit of {MAX_NUM_CLASSES}")


def derived_num_classes(state_dict: dict[str, Tensor]) -> int | None:
    """``head.weight.shape[0]`` when the checkpoint has a 2-D head, capped (ModelTooLarge)."""
    head = state_dict.get("head.weight")
    if head is None or head.ndim != 2:
        return None
    classes = int(head.shape[0])
    if classes > MAX_NUM_CLASSES:
        raise ModelTooLarge(
            f"the checkpoint's head.weight {tuple(head.shape)} asks for {classes} classes, over "
            f"the limit of {MAX_NUM_CLASSES}"
        )
    return classes


def meta_model(arch: str, args: dict[str, Any]) -> nn.Module:
    """``arch`` built on the meta device: shapes only, no storage, and without its weight
    initialisation (``weight_init="skip"``, which timm's ViTs take; it is most of the time
    on meta, where it computes nothing)."""
    import timm

    with torch.device("meta"):
        if "weight_init" not in args:
            try:
                return timm.create_model(arch, pretrained=False, weight_init="skip", **args)
            except TypeError:
                pass  # an architecture without the option: initialised on meta, still no storage
        return timm.create_model(arch, pretrained=False, **args)


def _attention_heads(model: nn.Module) -> int:
    """Heads summed over every attention module (innermost module with ``num_heads``)."""
    holders = [m for m in model.modules() if isinstance(getattr(m, "num_heads", None), int)]
    inner = []
    for holder in holders:
        below = {id(m) for m in holder.modules() if m is not holder}
        if not any(id(other) in below for other in holders):
            inner.append(holder)
    return sum(int(m.num_heads) for m in inner)


def estimate(model: nn.Module) -> Estimate:
    """Count a (meta-device) ViT: parameters; tokens = patches + prefix tokens; activations
    per image = ``BYTES_PER_FLOAT * (TOKEN_OUTPUTS_KEPT * tokens * (sum of linear out_features
    and norm widths, classifier excluded) + ATTENTION_MAPS_KEPT * heads * tokens**2)``, the
    maps the gradient analysis keeps for every block of one batch at once."""
    params = sum(p.numel() for p in model.parameters())
    patch_embed = getattr(model, "patch_embed", None)
    patches = int(getattr(patch_embed, "num_patches", 0) or 0)
    tokens = patches + int(getattr(model, "num_prefix_tokens", 0) or 0)
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    widths = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not classifier:
            widths += module.out_features
        elif isinstance(module, nn.LayerNorm):
            widths += math.prod(module.normalized_shape)
    floats = (
        TOKEN_OUTPUTS_KEPT * tokens * widths
        + ATTENTION_MAPS_KEPT * _attention_heads(model) * tokens**2
    )
    return Estimate(int(params), tokens, int(floats * BYTES_PER_FLOAT))


def check_estimate(arch: str, found: Estimate, batch_size: int, limits: Limits) -> None:
    """ModelTooLarge naming every limit ``found`` is over, with the numbers."""
    over = []
    if found.params > limits.max_params:
        over.append(f"{found.params} parameters (VITAUDIT_MAX_MODEL_PARAMS is {limits.max_params})")
    if found.tokens > limits.max_tokens:
        over.append(f"{found.tokens} tokens per image (VITAUDIT_MAX_TOKENS is {limits.max_tokens})")
    needed = found.activation_bytes(batch_size)
    if needed > limits.max_activation_bytes:
        fits = limits.max_activation_bytes // max(found.activation_bytes_per_image, 1)
        advice = f"; batch_size {fits} would fit" if fits >= 1 else ""
        over.append(
            f"about {needed} bytes of activations for a batch of {batch_size} "
            f"(VITAUDIT_MAX_ACTIVATION_BYTES is {limits.max_activation_bytes}){advice}"
        )
    if over:
        raise ModelTooLarge(
            f"'{arch}' as configured is too large for this worker: " + "; ".join(over)
        )
