"""Train a tiny ViT from scratch on a task whose label depends on spatial layout.

This is the training core of ``vitaudit demo``: pure code over tensors (no Redis, no HTTP,
no file paths). It makes a seeded, procedurally generated dataset, trains a small timm
``VisionTransformer`` on it and returns checkpoints along the way, so that the audit can
watch the learned position embedding turn from random noise into a map of the patch grid.

The task ("relative direction"): every image holds two textured squares on a textured
background (scikit-image's gravel photograph): a red-tinted brick square, the *anchor*, and a
green-tinted grass square, the *target*. The label is the quadrant in which the target lies
as seen from the anchor: 0 up-left, 1 up-right, 2 down-left, 3 down-right (two bits: is it
below, is it to the right). Which square is which is visible in any single patch (tint and
texture); *where* they are is not, so the model can only solve the task through the position
embedding, and the simplest table that answers "is this patch right of / below that one"
for every pair is one that is linear in (row, col): the grid structure the audit measures.
The target sits a whole number of patches (1 to ``max_offset``) from the anchor on each
axis, so the absolute position of either square alone says little: the label asks for a
comparison.

Why the squares alone are not enough for the heads: trained on the direction label alone
(through the class token), the model solves the task by attending to the two squares
wherever they are; its heads stay ``global`` (one became ``texture``), and about 60 other
label-only tasks and settings (neighbour tasks, distractors, noise, curricula, optimiser
and attention knobs) produced no positional head within a minute of CPU training. So the
training adds a second, dense objective, as masked image modelling does (MAE, SimMIM):
*fill-in*. A random quarter of each training image's patches are greyed out, and every
masked patch's own output token must predict the patch's mean colour (see `TrainConfig`).
Every patch query now gets its own gradient, and the answer lies in other patches at
fixed offsets: the background carries stripes (`make_dataset`), horizontal in the red
channel and vertical in the blue one, so a masked patch's red is best read along its row
and its blue along its column, and inside a square its neighbours hold its tint. Each
head has its own W_Q, W_K, and heads split these jobs between them.

The controlled contrast (``shuffle_patches=True``) trains the same model on the same images
with the pixel patches of every image put in a fresh random order before the model sees
them (before the masking, so the fill-in targets move with their patches). The order then
carries no information, and no single patch tells the direction (see ``make_dataset``).
The null is measured, not built in: a solver that re-assembled a shuffled image like a
jigsaw, matching patches by the gravel texture that runs across their edges or by the
stripes (the patches of one row share one smooth red profile), could still read the label.
This model does not learn to: the control stays at chance accuracy, a masked patch's grid
neighbours say nothing about it, and the gradient that reaches the position embedding has
no reason to lay it out as a grid.

Measured on the 2-core development machine (seed 0 unless stated, one thread per run,
audited on 32 held-out task images as ``vitaudit demo`` does):

- default schedule (1,000 steps of 64 images, 36 s per run): ``grid_structure_score``
  0.00 -> 0.63, training accuracy 0.99; head labels ``{global: 8}`` -> ``{global: 4,
  local: 2, vertical: 1, mixed: 1}``, the three positional heads in block 1, whose mean
  attention distance falls from 4.14 to 1.9 patches (uniform 4.14). Seeds 0-4 end with
  3, 3, 4, 2 and 3 positional heads (scores 0.63, 0.56, 0.59, 0.63, 0.59).
- quick schedule (the same 1,000 steps in batches of 32, 20 s): 0.00 -> 0.63, one
  horizontal and one vertical head. Seeds 0-4: 2, 3, 4, 0 and 1 positional heads (seed 3
  ends with four ``mixed`` heads just short of the axis threshold, scores -0.46 to -0.48
  against 0.5); scores 0.46-0.63.
- shuffled controls: 0.00, all 8 heads ``global``, accuracy 0.22-0.31 (chance 0.25).
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

from workers.inputs import unit_pixels

#: A timm model name whose constructor ``timm.create_model(MODEL_ARCH, pretrained=False,
#: **config.model)`` builds exactly the model ``build_model(config.model)`` builds (every
#: shape-defining argument of the named model is overridden by the kwargs).
MODEL_ARCH = "vit_tiny_patch16_224"

#: Direction classes, in label order.
DIRECTIONS: tuple[str, ...] = ("up-left", "up-right", "down-left", "down-right")
NUM_CLASSES = len(DIRECTIONS)

#: The demo model: 32x32 images cut into an 8x8 grid of 4x4 patches; 2 blocks of width 32
#: keep a step at ~20-40 ms on one CPU core. Four heads (head width 8) rather than two made
#: the escape from the initial loss plateau reliable across seeds (2 heads: some seeds still
#: at chance after 400 steps).
DEFAULT_MODEL: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "in_chans": 3,
    "num_classes": NUM_CLASSES,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "global_pool": "token",
    "class_token": True,
    "pos_embed": "learn",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on besides the seed; plain data (see ``as_dict``).

    ``model`` holds the ``VisionTransformer`` keyword arguments. ``blob_size`` (pixels),
    ``max_offset`` (patches) and the stripes shape the dataset (see ``make_dataset``).
    ``steps`` is the length of the schedule (linear warmup over ``warmup_steps``, then
    cosine decay to 10% of ``learning_rate``; AdamW). ``checkpoint_steps`` is the default
    set of steps ``train`` saves.

    The loss has two parts (see the module docstring): the direction label's cross-entropy
    through the class token, plus ``fill_in_weight`` times the fill-in loss: every training
    image has a random ``mask_fraction`` of its patches greyed out (input 0), and a linear
    layer on each masked patch's output token predicts the patch's mean colour (mean
    squared error over the three channels, averaged over the masked patches). The linear
    layer is training scaffolding, like the decoder of a masked autoencoder: it is not
    part of the checkpoint, which stays a plain timm ``VisionTransformer``.

    The position table is treated apart from the other weights, because the demo has to show
    it change within a few hundred CPU steps:

    - ``pos_embed_init_std`` replaces timm's init (truncated normal, std 0.02) by a normal of
      this std (None keeps timm's). At std 0.02 the table is ~10x smaller than a patch
      token, LayerNorm all but hides it, and the model sits on a loss plateau for hundreds
      of steps; at 0.5 it is still random (no grid structure) but visible.
    - ``pos_embed_weight_decay`` (decoupled, AdamW) shrinks what the gradient does not keep
      up, so the random part of the init fades while the part the task needs stays.
    """

    model: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    steps: int = 1000
    batch_size: int = 64
    num_images: int = 4096
    eval_images: int = 512
    blob_size: int = 8
    max_offset: int = 3
    stripe_amplitude: float = 0.8
    stripe_sigma_px: float = 2.0
    fill_in_weight: float = 3.0
    mask_fraction: float = 0.25
    learning_rate: float = 6e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    pos_embed_init_std: float | None = 0.5
    pos_embed_weight_decay: float = 0.05
    checkpoint_steps: tuple[int, ...] = (0, 50, 100, 150, 200, 300, 400, 600, 800, 1000)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_images", "eval_images", "blob_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.fill_in_weight < 0 or not 0.0 <= self.mask_fraction < 1.0:
            raise ValueError(
                f"fill_in_weight must be >= 0 and mask_fraction in [0, 1), got "
                f"{self.fill_in_weight}, {self.mask_fraction}"
            )
        if self.eval_images > self.num_images:
            raise ValueError(
                f"eval_images ({self.eval_images}) exceeds num_images ({self.num_images})"
            )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy (the model kwargs as a plain dict, tuples as lists)."""
        out = asdict(self)
        out["model"] = dict(self.model)
        out["checkpoint_steps"] = list(self.checkpoint_steps)
        return out


#: The demo's schedule: 1,000 steps of 64 images.
DEFAULT_CONFIG = TrainConfig()
#: The tests' schedule: the same model, task and steps on half the data, in batches of 32.
QUICK_CONFIG = TrainConfig(
    batch_size=32,
    num_images=2048,
    eval_images=256,
    checkpoint_steps=(0, 250, 500, 1000),
)

SCHEDULES: dict[str, TrainConfig] = {"default": DEFAULT_CONFIG, "quick": QUICK_CONFIG}


@dataclass(frozen=True)
class Checkpoint:
    """The model after ``step`` optimiser steps (0 = the random init).

    ``state_dict`` holds CPU tensors cloned from the model (no parameters, no shared
    storage). ``train_loss`` (cross-entropy, nats; chance ln 4 = 1.386) and
    ``train_accuracy`` (in [0, 1]; chance 0.25) are measured at that step, in eval mode, on a
    fixed seeded sample of the training images, whole (no patch greyed out) and in the order
    the run shows them (shuffled patches in the control). The fill-in loss is not recorded.
    """

    step: int
    state_dict: dict[str, Tensor]
    train_loss: float
    train_accuracy: float


@dataclass(frozen=True)
class LayoutDataset:
    """Model inputs (N, 3, H, W) float32, labels (N,) long in [0, 4), the top-left pixel
    (row, col) of the anchor and the target squares, (N, 2) each, and the 8-bit pixels
    (N, 3, H, W) uint8 the inputs are made from: ``images == pixels_to_inputs(pixels)``
    exactly, the same float32 arithmetic the audit pipeline applies to an uploaded PNG
    (``/ 255``, then the model's ``(x - mean) / std``), so the demo can upload the task's own
    images and the audit sees the tensors the model was trained on."""

    images: Tensor
    labels: Tensor
    anchor: Tensor
    target: Tensor
    pixels: Tensor


def build_model(model_kwargs: Mapping[str, Any]) -> VisionTransformer:
    """A fresh ``VisionTransformer(**model_kwargs)`` (initialised from torch's global RNG)."""
    return VisionTransformer(**dict(model_kwargs))


@lru_cache(maxsize=1)
def input_normalisation() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that the audit applies to images in [0, 1] for a
    ``MODEL_ARCH`` checkpoint: ``timm.data.resolve_data_config({}, model=model)`` (0.5, 0.5
    on every channel for ``vit_tiny_patch16_224``, so inputs span [-1, 1])."""
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model(MODEL_ARCH, pretrained=False, **DEFAULT_MODEL)
    config = resolve_data_config({}, model=model)
    return tuple(float(m) for m in config["mean"]), tuple(float(s) for s in config["std"])


def pixels_to_inputs(pixels: Tensor) -> Tensor:
    """(N, 3, H, W) uint8 pixels -> float32 model inputs, ``(pixels / 255 - mean) / std``
    in the same float32 operations as the audit pipeline (`workers.inputs.unit_pixels`
    then `workers.analysis.probes.normalize_for_model`)."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(
            f"pixels must be (N, 3, H, W) uint8, got {tuple(pixels.shape)} {pixels.dtype}"
        )
    mean, std = input_normalisation()
    unit = unit_pixels(pixels)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (unit - m) / s


def inputs_to_pixels(inputs: Tensor) -> Tensor:
    """Float model inputs -> the nearest 8-bit pixels (clipped to [0, 255]), uint8."""
    mean, std = input_normalisation()
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return torch.round((inputs.float() * s + m) * 255.0).clamp(0, 255).to(torch.uint8)


@lru_cache(maxsize=1)
def _textures() -> dict[str, Tensor]:
    """scikit-image's brick, grass and gravel photographs (they load offline), (512, 512)
    float32 with mean 0 and std 0.5."""
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


def _stripe_profiles(n: int, size: int, sigma_px: float, generator: torch.Generator) -> Tensor:
    """(n, size) white noise smoothed by a circular Gaussian of ``sigma_px``, std 1."""
    noise = torch.randn(n, 1, size, generator=generator)
    half = min(size // 2, math.ceil(3 * sigma_px))
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma_px**2))
    padded = torch.nn.functional.pad(noise, (half, half), mode="circular")
    smooth = torch.nn.functional.conv1d(padded, (kernel / kernel.sum())[None, None])[:, 0]
    return smooth / smooth.std()


def _direction_labels(anchor: Tensor, target: Tensor) -> Tensor:
    """Label of the target's quadrant as seen from the anchor: 2 * below + right."""
    d = target - anchor
    return (2 * (d[:, 0] > 0).long() + (d[:, 1] > 0).long()).long()


def make_dataset(
    num_images: int,
    *,
    seed: int,
    image_size: int = 32,
    patch_size: int = 4,
    blob_size: int = 8,
    max_offset: int = 3,
    stripe_amplitude: float = 0.0,
    stripe_sigma_px: float = 2.0,
) -> LayoutDataset:
    """A seeded relative-direction dataset (see the module docstring).

    The anchor's top-left pixel is uniform over the image (any pixel offset, so a square
    usually straddles patches). The target sits a whole number of patches away on each
    axis, between 1 and ``max_offset`` patches, and far enough on at least one axis that a
    full patch of background separates the squares. Two consequences: (1) no axis offset
    is zero, so the quadrant is never ambiguous; (2) both squares sit at the same offset
    inside their patches and no patch touches both, so no patch, nor the squares' patches
    compared with each other, tells the direction: their places do. (The content still lets
    an image be re-assembled like a jigsaw, see the module docstring; the shuffled control
    rests on the model not doing so, which its chance accuracy shows.) Classes are balanced in
    expectation by symmetry. The images are 8-bit representable (``pixels``; see
    `LayoutDataset`). Same arguments, same tensors.

    ``stripe_amplitude`` > 0 adds stripes to the background (not to the squares): in the red
    channel horizontal ones (a value per pixel row, the same along the row), in the blue
    channel vertical ones (a value per pixel column); each profile is white noise smoothed
    by a Gaussian of ``stripe_sigma_px`` pixels, with std ``stripe_amplitude``. They carry
    nothing about the label; they are what the fill-in objective (see `TrainConfig`) reads
    along a row or a column. Being smooth, they also make a shuffled image easier to
    re-assemble. An independent value per row (and column) of patches, kept off the squares'
    patches, would not; tried, it gave positional heads for fewer seeds (default schedule,
    seed 0: none, seed 1: three; quick schedule, seed 0: none), so the smooth ones stay.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not tile a {image_size}-pixel image")
    if not 1 <= blob_size <= image_size // 2:
        raise ValueError(f"blob_size must be in [1, {image_size // 2}], got {blob_size}")
    if stripe_amplitude < 0 or stripe_sigma_px <= 0:
        raise ValueError(
            f"stripes need amplitude >= 0 and sigma > 0, got {stripe_amplitude}, {stripe_sigma_px}"
        )
    # Smallest whole-patch offset with at least one patch of background between the squares.
    separated = -(-(blob_size + patch_size) // patch_size)
    span = image_size - blob_size + 1
    if not separated <= max_offset or separated * patch_size >= span:
        raise ValueError(
            f"no room: squares of {blob_size} px need {separated} patches between corners "
            f"(max_offset {max_offset}, image {image_size} px)"
        )
    g = torch.Generator().manual_seed(seed)
    anchors, targets, have = [], [], 0
    while have < num_images:
        n = 4 * (num_images - have) + 16
        a = torch.randint(0, span, (n, 2), generator=g)
        k = torch.randint(1, max_offset + 1, (n, 2), generator=g)
        sign = torch.randint(0, 2, (n, 2), generator=g) * 2 - 1
        t = a + sign * k * patch_size
        ok = (k.max(dim=1).values >= separated) & ((t >= 0) & (t < span)).all(dim=1)
        anchors.append(a[ok])
        targets.append(t[ok])
        have += int(ok.sum())
    anchor = torch.cat(anchors)[:num_images]
    target = torch.cat(targets)[:num_images]

    tex = _textures()
    background = _random_crops(tex["gravel"], num_images, image_size, g) * 0.5
    images = background[:, None].repeat(1, 3, 1, 1)
    images = images + 0.1 * torch.randn(images.shape, generator=g)
    if stripe_amplitude > 0:
        rows = _stripe_profiles(num_images, image_size, stripe_sigma_px, g) * stripe_amplitude
        cols = _stripe_profiles(num_images, image_size, stripe_sigma_px, g) * stripe_amplitude
        images[:, 0] += rows[:, :, None]  # red: constant along each pixel row
        images[:, 2] += cols[:, None, :]  # blue: constant along each pixel column
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
    # Quantise to 8-bit pixels (the tinted channel of a square clips at the top of the
    # range) and map back: the inputs are exactly what the audit makes of the same PNGs.
    pixels = inputs_to_pixels(images).contiguous()
    return LayoutDataset(
        pixels_to_inputs(pixels), _direction_labels(anchor, target), anchor, target, pixels
    )


def _image_and_patch_size(config: TrainConfig) -> tuple[int, int]:
    def first(value: Any) -> int:
        return int(value[0] if isinstance(value, (tuple, list)) else value)

    return first(config.model.get("img_size", 224)), first(config.model.get("patch_size", 16))


def config_dataset(config: TrainConfig, num_images: int, *, seed: int) -> LayoutDataset:
    """``make_dataset`` with the image, patch, square and stripe settings of ``config``."""
    image_size, patch = _image_and_patch_size(config)
    return make_dataset(
        num_images,
        seed=seed,
        image_size=image_size,
        patch_size=patch,
        blob_size=config.blob_size,
        max_offset=config.max_offset,
        stripe_amplitude=config.stripe_amplitude,
        stripe_sigma_px=config.stripe_sigma_px,
    )


def patch_colours(images: Tensor, *, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C): the mean of every patch per channel, patches in row-major
    order (the order of a ViT's patch tokens)."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    means = images.reshape(b, c, gh, patch_size, gw, patch_size).mean(dim=(3, 5))
    return means.permute(0, 2, 3, 1).reshape(b, gh * gw, c)


def grey_out_patches(images: Tensor, masked: Tensor, *, patch_size: int) -> Tensor:
    """A copy of ``images`` (B, C, H, W) with the patches where ``masked`` (B, N) bool is
    true set to 0 (mid-grey in the model's input space)."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    pixels = masked.reshape(b, 1, gh, 1, gw, 1).expand(b, c, gh, patch_size, gw, patch_size)
    return images.masked_fill(pixels.reshape(b, c, h, w), 0.0)


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
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


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
    num_threads: int | None = 1,
) -> list[Checkpoint]:
    """Train ``build_model(config.model)`` from a seeded init and return one
    :class:`Checkpoint` per requested step, in increasing step order (step 0 is the init).

    ``checkpoint_steps`` (default ``config.checkpoint_steps``) are integers in
    ``[0, config.steps]``; training stops at the largest one. The learning-rate schedule
    always spans ``config.steps``, so a call that stops early reproduces the first steps
    of the full run exactly.

    Everything follows ``seed``: the dataset (``make_dataset(config.num_images, seed=seed,
    ...)``), the init (the fill-in layer's too), the batch order, the patch permutations and
    the fill-in masks, each from its own generator; the same call gives the same tensors, and the caller's global torch RNG
    state is left as it was. ``shuffle_patches=True`` is the controlled contrast (see the
    module docstring): same images, same init, same batches, with the patch order of every
    image redrawn each time it is shown (also for the images the accuracy is measured on).

    ``num_threads`` caps torch's intra-op threads for the call (restored on exit; None
    leaves them alone). At this model size threads cost more than they give (the earlier
    250-step quick schedule took ~8 s on one thread and ~35 s on two on the loaded 2-core
    machine); one run of the default schedule takes 34-40 s on one thread.
    """
    if num_threads is None:
        return _train(config, seed=seed, shuffle=shuffle_patches, checkpoint_steps=checkpoint_steps)
    if num_threads < 1:
        raise ValueError(f"num_threads must be positive or None, got {num_threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _train(config, seed=seed, shuffle=shuffle_patches, checkpoint_steps=checkpoint_steps)
    finally:
        torch.set_num_threads(previous)


def _train(
    config: TrainConfig, *, seed: int, shuffle: bool, checkpoint_steps: Sequence[int] | None
) -> list[Checkpoint]:
    steps = list(config.checkpoint_steps if checkpoint_steps is None else checkpoint_steps)
    if not steps:
        raise ValueError("checkpoint_steps is empty")
    if any(int(s) != s or s < 0 or s > config.steps for s in steps):
        raise ValueError(f"checkpoint_steps must be integers in [0, {config.steps}], got {steps}")
    wanted = sorted({int(s) for s in steps})
    last = wanted[-1]
    image_size, patch = _image_and_patch_size(config)

    data = config_dataset(config, config.num_images, seed=seed)
    # Separate streams, so that the control draws the same batches as the real run and
    # only adds permutations.
    batch_gen = torch.Generator().manual_seed(seed + 1)
    perm_gen = torch.Generator().manual_seed(seed + 2)
    mask_gen = torch.Generator().manual_seed(seed + 3)
    num_patches = (image_size // patch) ** 2
    eval_idx = torch.randperm(config.num_images, generator=batch_gen)[: config.eval_images]
    eval_images, eval_labels = data.images[eval_idx], data.labels[eval_idx]
    if shuffle:
        eval_images = shuffle_patch_order(eval_images, patch_size=patch, generator=perm_gen)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config.model)
        if config.pos_embed_init_std is not None and model.pos_embed is not None:
            with torch.no_grad():
                model.pos_embed.normal_(0.0, config.pos_embed_init_std)
        # The fill-in head (see `TrainConfig`): training scaffolding, not in the checkpoint.
        fill_in = torch.nn.Linear(model.embed_dim, int(config.model.get("in_chans", 3)))
    model.train()
    named = list(model.named_parameters()) + [
        (f"fill_in.{n}", p) for n, p in fill_in.named_parameters()
    ]
    optimiser = torch.optim.AdamW(
        [
            {
                "params": [p for n, p in named if n != "pos_embed" and p.ndim >= 2],
                "weight_decay": config.weight_decay,
            },
            {
                "params": [p for n, p in named if n != "pos_embed" and p.ndim < 2],
                "weight_decay": 0.0,
            },
            {
                "params": [p for n, p in named if n == "pos_embed"],
                "weight_decay": config.pos_embed_weight_decay,
            },
        ],
        lr=config.learning_rate,
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
            group["lr"] = config.learning_rate * factor
        idx = torch.randint(0, config.num_images, (config.batch_size,), generator=batch_gen)
        x, y = data.images[idx], data.labels[idx]
        if shuffle:
            x = shuffle_patch_order(x, patch_size=patch, generator=perm_gen)
        masked = torch.rand(x.shape[0], num_patches, generator=mask_gen) < config.mask_fraction
        tokens = model.forward_features(grey_out_patches(x, masked, patch_size=patch))
        loss = torch.nn.functional.cross_entropy(model.forward_head(tokens), y)
        if config.fill_in_weight > 0 and bool(masked.any()):
            predicted = fill_in(tokens[:, model.num_prefix_tokens :])
            error = (predicted - patch_colours(x, patch_size=patch)).pow(2).mean(dim=-1)
            loss = loss + config.fill_in_weight * error[masked].mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step in wanted:
            save(step)
    return out
