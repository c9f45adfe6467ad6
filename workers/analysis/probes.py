"""Named, versioned probe image sets.

A report records the probe set it used (``natural-v1``, ``texture-v1``), so two reports
computed with the same name are comparable: a name is never reused for different images.
A new recipe gets a new version (``natural-v2``), the old one stays.

Every set is built deterministically from images that ship with scikit-image and load
offline, and returns float32 images in ``[0, 1]``, shape (M, 3, H, W). Models expect
their own normalisation: pass the images through `normalize_for_model` before a forward.

- ``natural-v1``: the 12 photographs and scans listed in `NATURAL_V1_IMAGES`, in that
  order; each is centre-cropped to the target aspect ratio and resized (anti-aliased) to
  the model's input size; greyscale images are repeated over the three channels. A set of
  more than 12 continues with variants: image ``i >= 12`` is a seeded crop (50-85 % of the
  side, at a seeded place) of source ``i % 12``, mirrored left-right in odd rounds
  (``i // 12``), so any count is honoured and the first 12 never change.
- ``texture-v1``: real textures (scikit-image's brick, grass and gravel) pasted as
  rectangles at seeded random places on a flat grey background whose grey level equals the
  mean of the pasted texture pixels (so brightness alone does not give the texture away).
  Each image carries, per patch of a given `Grid`, the fraction of the patch's pixels that
  are textured. About `TEXTURE_V1_TARGET_SHARE` of every image is textured.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from workers.analysis.grid import Grid

NATURAL_V1_IMAGES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "page",
    "text",
)
TEXTURE_V1_SOURCES: tuple[str, ...] = ("brick", "grass", "gravel")
# Textured area share targeted per image: small enough that a head concentrating on
# textured patches can reach a lift of about 1 / 0.25 = 4, large enough that every image
# holds several textured patches even on a 4x4 grid.
TEXTURE_V1_TARGET_SHARE = 0.25
TEXTURE_V1_DEFAULT_COUNT = 8
TEXTURE_V1_DEFAULT_SEED = 0

# Probe sets built per worker process and kept: a few MB each at 224 px.
PROBE_CACHE_SIZE = 8


@dataclass(frozen=True)
class ProbeSet:
    """Probe images (M, 3, H, W) float32 in [0, 1] and the set's name."""

    name: str
    images: Tensor
    sources: tuple[str, ...]


@dataclass(frozen=True)
class TextureProbeSet:
    """Texture probes and, per image and patch, the textured fraction of the patch.

    ``texture_fraction`` is (M, N) float32 in [0, 1] over the patches of ``grid`` in raster
    order; ``texture_mask`` is ``texture_fraction >= 0.5`` (a patch that is mostly texture).
    """

    name: str
    images: Tensor
    texture_fraction: Tensor
    grid: Grid
    seed: int

    @property
    def texture_mask(self) -> Tensor:
        return self.texture_fraction >= 0.5


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    return h, w


def _to_float_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) uint8/bool -> (H, W, 3) float64 in [0, 1]."""
    x = np.asarray(image)
    x = x.astype(np.float64) if x.dtype == bool else x.astype(np.float64) / 255.0
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    return x[:, :, :3]


def _crop_resize(
    image: np.ndarray, size: tuple[int, int], variant: int = 0, *, source: int = 0
) -> np.ndarray:
    """Crop (H, W, 3) to the aspect ratio of ``size`` and resize (anti-aliased).

    ``variant`` 0 is the centre crop; variant ``r > 0`` a crop 50-85 % as large at a place
    seeded by ``(r, source)``, mirrored left-right when ``r`` is odd.
    """
    from skimage.transform import resize

    th, tw = size
    h, w = image.shape[:2]
    if h * tw > w * th:  # too tall
        ch, cw = max(1, round(w * th / tw)), w
    else:
        ch, cw = h, max(1, round(h * tw / th))
    top, left = (h - ch) // 2, (w - cw) // 2
    if variant:
        rng = np.random.default_rng((variant, source))
        f = rng.uniform(0.5, 0.85)
        ch, cw = max(1, round(ch * f)), max(1, round(cw * f))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = image[top : top + ch, left : left + cw]
    if variant % 2:
        crop = crop[:, ::-1]
    out = resize(crop, (th, tw, 3), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(out, 0.0, 1.0)


@lru_cache(maxsize=PROBE_CACHE_SIZE)
def natural_v1(size: int | tuple[int, int], *, count: int | None = None) -> ProbeSet:
    """The ``natural-v1`` set at ``size`` (H, W): ``count`` images (default: the 12 of
    `NATURAL_V1_IMAGES`), continued past 12 by seeded crops (see the module docstring).

    Cached (a trajectory audit asks for the same set at every step): the returned tensors
    are shared, so callers must not modify them in place.
    """
    import skimage.data

    k = len(NATURAL_V1_IMAGES)
    count = k if count is None else count
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    hw = _size_pair(size)
    loaded = [_to_float_rgb(getattr(skimage.data, n)()) for n in NATURAL_V1_IMAGES[:count]]
    arrays = [_crop_resize(loaded[i % k], hw, i // k, source=i % k) for i in range(count)]
    names = [NATURAL_V1_IMAGES[i % k] + (f"#crop{i // k}" if i >= k else "") for i in range(count)]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32)
    return ProbeSet("natural-v1", images.contiguous(), tuple(names))


def _texture_sources() -> list[np.ndarray]:
    import skimage.data

    return [getattr(skimage.data, n)().astype(np.float64) / 255.0 for n in TEXTURE_V1_SOURCES]


@lru_cache(maxsize=PROBE_CACHE_SIZE)
def texture_v1(
    size: int | tuple[int, int],
    grid: Grid,
    *,
    count: int = TEXTURE_V1_DEFAULT_COUNT,
    seed: int = TEXTURE_V1_DEFAULT_SEED,
) -> TextureProbeSet:
    """The ``texture-v1`` set: ``count`` images of ``size`` with the textured fraction per patch.

    Each image gets two or three rectangles (side 20-45 % of the image side, so the textured
    share is near `TEXTURE_V1_TARGET_SHARE`), each cut from a random place of a random
    texture at its native scale, pasted at a random place (overlaps allowed). The grid must
    tile the image (``grid.height * grid.patch_size == H``, same for the width). Cached like
    `natural_v1`: do not modify the returned tensors in place.
    """
    h, w = _size_pair(size)
    if grid.height * grid.patch_size != h or grid.width * grid.patch_size != w:
        raise ValueError(
            f"grid {grid.height}x{grid.width} of {grid.patch_size}px patches does not tile "
            f"a {h}x{w} image"
        )
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    rng = np.random.default_rng(seed)
    sources = _texture_sources()
    images, fractions = [], []
    for _ in range(count):
        canvas = np.zeros((h, w), dtype=np.float64)
        mask = np.zeros((h, w), dtype=bool)
        # Rectangles until the target share is reached (at least two, at most six).
        for k in range(6):
            if k >= 2 and mask.mean() >= TEXTURE_V1_TARGET_SHARE:
                break
            rh = max(2, int(round(h * rng.uniform(0.2, 0.45))))
            rw = max(2, int(round(w * rng.uniform(0.2, 0.45))))
            src = sources[int(rng.integers(len(sources)))]
            sy = int(rng.integers(0, src.shape[0] - rh + 1))
            sx = int(rng.integers(0, src.shape[1] - rw + 1))
            y = int(rng.integers(0, h - rh + 1))
            x = int(rng.integers(0, w - rw + 1))
            canvas[y : y + rh, x : x + rw] = src[sy : sy + rh, sx : sx + rw]
            mask[y : y + rh, x : x + rw] = True
        canvas[~mask] = canvas[mask].mean()
        images.append(np.repeat(canvas[None], 3, axis=0))
        frac = mask.reshape(grid.height, grid.patch_size, grid.width, grid.patch_size)
        fractions.append(frac.mean(axis=(1, 3)).reshape(-1))
    return TextureProbeSet(
        name="texture-v1",
        images=torch.from_numpy(np.stack(images)).to(torch.float32),
        texture_fraction=torch.from_numpy(np.stack(fractions)).to(torch.float32),
        grid=grid,
        seed=seed,
    )


def normalize_for_model(images: Tensor, model: torch.nn.Module) -> Tensor:
    """Images in [0, 1] (M, 3, H, W) -> the model's input scale, ``(x - mean) / std``.

    Mean and std come from ``timm.data.resolve_data_config`` for the model (ImageNet's by
    default). Returns a new tensor; the input is not modified.
    """
    from timm.data import resolve_data_config

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (M, 3, H, W), got {tuple(images.shape)}")
    config = resolve_data_config({}, model=model)
    mean = torch.tensor(config["mean"], dtype=images.dtype, device=images.device)
    std = torch.tensor(config["std"], dtype=images.dtype, device=images.device)
    return (images - mean[None, :, None, None]) / std[None, :, None, None]
