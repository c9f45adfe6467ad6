"""Train a tiny ViT from scratch on a task whose label depends on spatial layout.

This is the training core of ``vitaudit demo``: pure code over tensors (no Redis, no HTTP,
no file paths). It makes a seeded, procedurally generated dataset, trains a small timm
``VisionTransformer`` on it and returns checkpoints along the way, so that the audit can
watch the learned position embedding turn from random noise into a map of the patch grid.

The task ("relative direction"): every image holds two textured squares on a textured
background, a red-tinted brick square (the *anchor*) and a green-tinted grass square (the
*target*). The label is the direction in which the target lies from the anchor, along the
dominant axis of their displacement: 0 right, 1 down, 2 left, 3 up. Which square is which
is visible in any single patch (tint and texture); *where* they are is not, so the model can
only solve the task by reading the position embedding, and the cheapest way to compare two
positions is a table that is linear in (row, col): the grid structure the audit measures.

The controlled contrast (``shuffle_patches=True``) trains the same model on the same images
with the pixel patches of every image put in a fresh random order before the model sees
them. The order then carries no information, the label cannot be read from the image (the
run stays at chance accuracy), and the gradient that reaches the position embedding has no
reason to lay it out as a grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

#: A timm model name whose constructor ``timm.create_model(MODEL_ARCH, pretrained=False,
#: **config.model)`` builds exactly the model ``build_model(config.model)`` builds (every
#: shape-defining argument of the named model is overridden by the kwargs).
MODEL_ARCH = "vit_tiny_patch16_224"

#: Direction classes, in label order.
DIRECTIONS: tuple[str, ...] = ("up-left", "up-right", "down-left", "down-right")
NUM_CLASSES = len(DIRECTIONS)

#: The demo model: 32x32 images cut into an 8x8 grid of 4x4 patches. A small embedding
#: (32) keeps the step cheap on a CPU and lets the position table move far from its
#: std-0.02 init in a few hundred steps.
DEFAULT_MODEL: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "in_chans": 3,
    "num_classes": NUM_CLASSES,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "global_pool": "token",
    "class_token": True,
    "pos_embed": "learn",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on besides the seed; plain data (see ``as_dict``).

    ``model`` holds the ``VisionTransformer`` keyword arguments. ``pos_embed_lr_scale``
    multiplies the learning rate of the position table only (it starts at std 0.02 and has
    to travel furthest). ``checkpoint_steps`` is the default set of steps ``train`` saves.
    """

    model: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    steps: int = 600
    batch_size: int = 64
    num_images: int = 4096
    eval_images: int = 512
    blob_size: int = 8
    max_offset: int = 14
    pos_embed_init_std: float | None = None
    learning_rate: float = 2e-3
    pos_embed_lr_scale: float = 1.0
    weight_decay: float = 0.05
    pos_embed_weight_decay: float = 0.0
    warmup_steps: int = 30
    checkpoint_steps: tuple[int, ...] = (0, 25, 50, 100, 150, 200, 300, 400, 500, 600)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy (the model kwargs as a plain dict, tuples as lists)."""
        out = asdict(self)
        out["model"] = dict(self.model)
        out["checkpoint_steps"] = list(self.checkpoint_steps)
        return out


DEFAULT_CONFIG = TrainConfig()
QUICK_CONFIG = TrainConfig(
    steps=200,
    num_images=2048,
    eval_images=256,
    checkpoint_steps=(0, 50, 100, 150, 200),
)

SCHEDULES: dict[str, TrainConfig] = {"default": DEFAULT_CONFIG, "quick": QUICK_CONFIG}


@dataclass(frozen=True)
class Checkpoint:
    """The model after ``step`` optimiser steps (0 = the random init).

    ``state_dict`` holds CPU tensors cloned from the model (no parameters, no shared
    storage). ``train_loss`` (cross-entropy, nats; chance ln 4 = 1.386) and
    ``train_accuracy`` (in [0, 1]; chance 0.25) are measured at that step, in eval mode, on a
    fixed seeded sample of the training images, shown the way the run shows them (with
    shuffled patches in the control).
    """

    step: int
    state_dict: dict[str, Tensor]
    train_loss: float
    train_accuracy: float


@dataclass(frozen=True)
class LayoutDataset:
    """Images (N, 3, H, W) float32 roughly zero-mean, labels (N,) long in [0, 4), and the
    top-left pixel (row, col) of the anchor and the target squares, (N, 2) each."""

    images: Tensor
    labels: Tensor
    anchor: Tensor
    target: Tensor


def build_model(model_kwargs: Mapping[str, Any]) -> VisionTransformer:
    """A fresh ``VisionTransformer(**model_kwargs)`` (initialised from torch's global RNG)."""
    return VisionTransformer(**dict(model_kwargs))


@lru_cache(maxsize=1)
def _textures() -> dict[str, Tensor]:
    """scikit-image's brick, grass and gravel photographs, (512, 512) float32 in [-1, 1]."""
    from skimage import data

    out = {}
    for name in ("brick", "grass", "gravel"):
        img = torch.from_numpy(np.asarray(getattr(data, name)(), dtype=np.float32))
        out[name] = (img - img.mean()) / (img.std() + 1e-6) / 2.0
    return out


def _random_crops(texture: Tensor, n: int, size: int, generator: torch.Generator) -> Tensor:
    """``n`` random ``size x size`` crops of a 2-D texture -> (n, size, size)."""
    h, w = texture.shape
    top = torch.randint(0, h - size + 1, (n, 1, 1), generator=generator)
    left = torch.randint(0, w - size + 1, (n, 1, 1), generator=generator)
    ar = torch.arange(size)
    return texture[top + ar[None, :, None], left + ar[None, None, :]]


def _direction_labels(anchor: Tensor, target: Tensor) -> Tensor:
    """Label of the target's quadrant as seen from the anchor: 2 * below + right."""
    d = target - anchor
    return (2 * (d[:, 0] > 0).long() + (d[:, 1] > 0).long()).long()


def make_dataset(
    num_images: int,
    *,
    seed: int,
    image_size: int = 32,
    blob_size: int = 8,
    axis_margin: int = 4,
    min_gap: int = 4,
    max_offset: int = 14,
) -> LayoutDataset:
    """A seeded relative-direction dataset (see the module docstring).

    Square positions are uniform over the image (any pixel offset, so a square usually
    straddles patches); pairs that overlap, or whose displacement is within ``axis_margin``
    pixels of a diagonal (ambiguous direction), are redrawn. Classes are balanced in
    expectation by symmetry. Same arguments, same tensors.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if not 1 <= blob_size <= image_size // 2:
        raise ValueError(f"blob_size must be in [1, {image_size // 2}], got {blob_size}")
    g = torch.Generator().manual_seed(seed)
    span = image_size - blob_size + 1
    anchors, targets, have = [], [], 0
    while have < num_images:
        n = 2 * (num_images - have) + 16
        a = torch.randint(0, span, (n, 2), generator=g)
        t = a + torch.randint(-max_offset, max_offset + 1, (n, 2), generator=g)
        d = (t - a).abs()
        ok = (d.max(dim=1).values >= blob_size + min_gap) & (d.min(dim=1).values >= axis_margin)
        ok &= ((t >= 0) & (t < span)).all(dim=1)
        anchors.append(a[ok])
        targets.append(t[ok])
        have += int(ok.sum())
    anchor = torch.cat(anchors)[:num_images]
    target = torch.cat(targets)[:num_images]

    tex = _textures()
    background = _random_crops(tex["gravel"], num_images, image_size, g) * 0.5
    images = background[:, None].repeat(1, 3, 1, 1)
    images = images + 0.1 * torch.randn(images.shape, generator=g)
    # Tints: the anchor is brick in the red channel, the target grass in the green one.
    tints = {"brick": torch.tensor([1.0, -0.5, -0.5]), "grass": torch.tensor([-0.5, 1.0, -0.5])}
    idx = torch.arange(num_images)[:, None, None]
    ar = torch.arange(blob_size)
    for name, where in (("brick", anchor), ("grass", target)):
        patch = _random_crops(tex[name], num_images, blob_size, g)  # (N, b, b)
        rows = (where[:, 0, None, None] + ar[None, :, None]).expand(-1, blob_size, blob_size)
        cols = (where[:, 1, None, None] + ar[None, None, :]).expand(-1, blob_size, blob_size)
        for c in range(3):
            images[idx, c, rows, cols] = 0.5 * patch + tints[name][c]
    return LayoutDataset(images.contiguous(), _direction_labels(anchor, target), anchor, target)


def shuffle_patch_order(images: Tensor, *, patch_size: int, generator: torch.Generator) -> Tensor:
    """A copy of ``images`` (B, C, H, W) with each image's ``patch_size`` pixel patches put
    in an independent random order (a random permutation of the patch grid per image).

    The content of every patch is kept, only its place changes; the input is not modified.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"patch_size {patch_size} does not tile a {h}x{w} image")
    gh, gw = h // patch_size, w // patch_size
    n = gh * gw
    patches = images.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, n, c, patch_size, patch_size)
    perm = torch.argsort(torch.rand(b, n, generator=generator), dim=1)
    shuffled = patches[torch.arange(b)[:, None], perm]
    out = shuffled.reshape(b, gh, gw, c, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, c, h, w).contiguous()


def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True).clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _evaluate(model: torch.nn.Module, images: Tensor, labels: Tensor) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    try:
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    finally:
        model.train(was_training)
    return float(loss), float(accuracy)


def train(
    config: TrainConfig,
    *,
    seed: int,
    shuffle_patches: bool = False,
    checkpoint_steps: Sequence[int] | None = None,
) -> list[Checkpoint]:
    """Train ``build_model(config.model)`` from a seeded init; one Checkpoint per requested
    step, in increasing step order (step 0 is the init).

    The dataset (``make_dataset(config.num_images, seed=seed)``), the init, the batch order
    and the patch permutations all follow ``seed``: the same call gives the same tensors.
    The caller's global torch RNG state is left as it was. ``shuffle_patches=True`` is the
    controlled contrast (see the module docstring): same images, same batches, same init,
    patch order redrawn per image every time it is shown.
    """
    steps = list(config.checkpoint_steps if checkpoint_steps is None else checkpoint_steps)
    if not steps:
        raise ValueError("checkpoint_steps is empty")
    if any(int(s) != s or s < 0 or s > config.steps for s in steps):
        raise ValueError(f"checkpoint_steps must be integers in [0, {config.steps}], got {steps}")
    wanted = sorted({int(s) for s in steps})
    last = wanted[-1]
    patch = config.model.get("patch_size", 16)
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    image_size = config.model.get("img_size", 224)
    image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)

    data = make_dataset(
        config.num_images,
        seed=seed,
        image_size=image_size,
        blob_size=config.blob_size,
        max_offset=config.max_offset,
        min_gap=patch,
    )
    g = torch.Generator().manual_seed(seed + 1)
    eval_idx = torch.randperm(config.num_images, generator=g)[: config.eval_images]
    eval_images, eval_labels = data.images[eval_idx], data.labels[eval_idx]
    if shuffle_patches:
        eval_images = shuffle_patch_order(eval_images, patch_size=patch, generator=g)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config.model)
        if config.pos_embed_init_std is not None:
            with torch.no_grad():
                model.pos_embed.normal_(0.0, config.pos_embed_init_std)
    model.train()
    pos = [p for n, p in model.named_parameters() if n == "pos_embed"]
    decay = [p for n, p in model.named_parameters() if n != "pos_embed" and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if n != "pos_embed" and p.ndim < 2]
    base_lr = config.learning_rate
    optimiser = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay, "scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "scale": 1.0},
            {"params": pos, "weight_decay": config.pos_embed_weight_decay, "scale": config.pos_embed_lr_scale},
        ],
        lr=base_lr,
    )

    out: list[Checkpoint] = []

    def save(step: int) -> None:
        loss, acc = _evaluate(model, eval_images, eval_labels)
        out.append(Checkpoint(step, _snapshot(model), loss, acc))

    if wanted[0] == 0:
        save(0)
    for step in range(1, last + 1):
        factor = _lr_factor(step - 1, warmup=config.warmup_steps, total=config.steps)
        for group in optimiser.param_groups:
            group["lr"] = base_lr * factor * group["scale"]
        idx = torch.randint(0, config.num_images, (config.batch_size,), generator=g)
        x, y = data.images[idx], data.labels[idx]
        if shuffle_patches:
            x = shuffle_patch_order(x, patch_size=patch, generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step in wanted:
            save(step)
    return out

