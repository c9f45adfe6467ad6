"""Named, versioned probe image sets.

A report records the probe set it used (``natural-v1``, ``texture-v1``), so two reports
computed with the same name are comparable: a name is never reused for different images.
A new recipe gets a new version (``natural-v2``), the old one stays.

Every set is built deterministically from images that ship with scikit-image and load
offline, and returns float32 images in ``[0, 1]``, shape (M, 3, H, W). Models expect
their own normalisation: pass the images through `normalize_for_model` before a forward.

- ``natural-v1``: the 12 photographs and scans listed in `NATURAL_V1_IMAGES`, in that
  order; each is centre-cropped to the target aspect ratio and resized (anti-aliased) to
  the model's input size; greyscale images are repeated over the three channels.
- ``natural-v2``: up to `NATURAL_V2_MAX_IMAGES` (96) distinct views of the same 12 images,
  view by view (`NATURAL_V2_VIEWS`): the first 12 are exactly ``natural-v1``, then the
  mirrored images, four corner crops of 60 % of the side, a centre crop of half the side
  and its mirror. No randomness: the same count gives the same images. `natural_set`
  serves a request for ``natural-v1`` with this set when it asks for more than 12 images.
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
# natural-v2 views, in order: (top, left, side) of the crop as fractions of the largest
# centred crop with the target aspect ratio, and whether the view is mirrored left-right.
NATURAL_V2_VIEWS: tuple[tuple[float, float, float, bool], ...] = (
    (0.0, 0.0, 1.0, False),  # natural-v1
    (0.0, 0.0, 1.0, True),
    (0.0, 0.0, 0.6, False),
    (0.0, 0.4, 0.6, False),
    (0.4, 0.0, 0.6, False),
    (0.4, 0.4, 0.6, False),
    (0.25, 0.25, 0.5, False),
    (0.25, 0.25, 0.5, True),
)
NATURAL_V2_MAX_IMAGES = len(NATURAL_V2_VIEWS) * len(NATURAL_V1_IMAGES)
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
    image: np.ndarray,
    size: tuple[int, int],
    view: tuple[float, float, float, bool] = NATURAL_V2_VIEWS[0],
) -> np.ndarray:
    """Centre-crop (H, W, 3) to the aspect ratio of ``size``, take the ``view`` of that crop
    (see `NATURAL_V2_VIEWS`) and resize (anti-aliased)."""
    from skimage.transform import resize

    th, tw = size
    h, w = image.shape[:2]
    if h * tw > w * th:  # too tall
        ch, cw = max(1, round(w * th / tw)), w
    else:
        ch, cw = h, max(1, round(h * tw / th))
    top, left = (h - ch) // 2, (w - cw) // 2
    v_top, v_left, side, mirror = view
    top, left = top + round(v_top * ch), left + round(v_left * cw)
    ch, cw = max(1, round(side * ch)), max(1, round(side * cw))
    crop = image[top : top + ch, left : left + cw]
    if mirror:
        crop = crop[:, ::-1]
    out = resize(crop, (th, tw, 3), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(out, 0.0, 1.0)


@lru_cache(maxsize=PROBE_CACHE_SIZE)
def natural_v1(size: int | tuple[int, int], *, count: int | None = None) -> ProbeSet:
    """The ``natural-v1`` set at ``size`` (H, W): ``count`` of the 12 images of
    `NATURAL_V1_IMAGES` (default: all); more come from ``natural-v2`` (`natural_set`).

    Cached (a trajectory audit asks for the same set at every step): the returned tensors
    are shared, so callers must not modify them in place.
    """
    names = NATURAL_V1_IMAGES if count is None else NATURAL_V1_IMAGES[:count]
    if count is not None and not 1 <= count <= len(NATURAL_V1_IMAGES):
        raise ValueError(f"count must be in 1..{len(NATURAL_V1_IMAGES)}, got {count}")
    hw = _size_pair(size)
    arrays = [_natural_view(hw, 0, i) for i in range(len(names))]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32)
    return ProbeSet("natural-v1", images.contiguous(), tuple(names))


@lru_cache(maxsize=1)
def _natural_originals() -> tuple[np.ndarray, ...]:
    """`NATURAL_V1_IMAGES` as (H, W, 3) float64 in [0, 1], decoded once per process."""
    import skimage.data

    return tuple(_to_float_rgb(getattr(skimage.data, n)()) for n in NATURAL_V1_IMAGES)


def cache_natural_views(size: tuple[int, int]) -> None:
    """Decode and resize the natural-v1 images at ``size`` (H, W) into this process's cache,
    then let the decoded originals go (116 MB; the views at one size take 14 MB). NumPy and
    scikit-image only, no torch kernel: the worker calls it before it forks its jobs."""
    for index in range(len(NATURAL_V1_IMAGES)):
        _natural_view(size, 0, index)
    _natural_originals.cache_clear()


@lru_cache(maxsize=PROBE_CACHE_SIZE * NATURAL_V2_MAX_IMAGES)
def _natural_view(size: tuple[int, int], view: int, image: int) -> np.ndarray:
    """One view (`NATURAL_V2_VIEWS`) of one of `NATURAL_V1_IMAGES` at ``size``, cached so that
    sets of different counts at the same size share their images."""
    return _crop_resize(_natural_originals()[image], size, NATURAL_V2_VIEWS[view])


@lru_cache(maxsize=PROBE_CACHE_SIZE)
def natural_v2(size: int | tuple[int, int], *, count: int = NATURAL_V2_MAX_IMAGES) -> ProbeSet:
    """The first ``count`` images of ``natural-v2`` at ``size``: `NATURAL_V2_VIEWS` of
    `NATURAL_V1_IMAGES`, view by view (the first 12 are ``natural-v1``). Sources are named
    ``image#view``. Cached like `natural_v1`: do not modify the tensors in place."""
    if not 1 <= count <= NATURAL_V2_MAX_IMAGES:
        raise ValueError(f"count must be in 1..{NATURAL_V2_MAX_IMAGES}, got {count}")
    hw = _size_pair(size)
    picks = [divmod(i, len(NATURAL_V1_IMAGES)) for i in range(count)]  # (view, image)
    arrays = [_natural_view(hw, v, i) for v, i in picks]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32)
    sources = tuple(f"{NATURAL_V1_IMAGES[i]}#{v}" for v, i in picks)
    return ProbeSet("natural-v2", images.contiguous(), sources)


def natural_set(size: int | tuple[int, int], count: int) -> ProbeSet:
    """What a request for ``count`` ``natural-v1`` images gets: ``natural-v1`` itself up to
    its 12 images, else the first ``count`` of ``natural-v2`` (at most
    `NATURAL_V2_MAX_IMAGES`; `natural_count_notes` says when fewer than asked were used)."""
    if count <= len(NATURAL_V1_IMAGES):
        return natural_v1(size, count=count)
    return natural_v2(size, count=min(count, NATURAL_V2_MAX_IMAGES))


def natural_count_notes(request: dict) -> list[str]:
    """A report note when a request asked for more natural probe images than exist."""
    options = request.get("options") or {}
    asked = int(options.get("num_images", 0))
    if request.get("images") or options.get("probe_set", "natural-v1") != "natural-v1":
        return []
    if asked <= NATURAL_V2_MAX_IMAGES:
        return []
    return [
        f"{asked} natural probe images were asked for; natural-v2 holds "
        f"{NATURAL_V2_MAX_IMAGES} distinct views of 12 photographs, so "
        f"{NATURAL_V2_MAX_IMAGES} were used (upload images to audit with more)"
    ]


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
    texture at its native scale, pasted at a random place (overlaps allowed). The grid covers
    the image's top-left ``grid.height * grid.patch_size`` rows and as many columns; where
    that is less than the image (384 px in 14-px patches: a 27x27 grid covers 378 px) the
    rest is what a timm patch embedding drops, and the fractions are of the covered part.
    Cached like
    `natural_v1`: do not modify the returned tensors in place.
    """
    h, w = _size_pair(size)
    covered_h, covered_w = grid.height * grid.patch_size, grid.width * grid.patch_size
    if covered_h > h or covered_w > w:
        raise ValueError(
            f"grid {grid.height}x{grid.width} of {grid.patch_size}px patches does not fit "
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
        frac = mask[:covered_h, :covered_w].reshape(
            grid.height, grid.patch_size, grid.width, grid.patch_size
        )
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
