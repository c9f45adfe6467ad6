"""Probe sets: deterministic, in range, and the texture masks say where the texture is."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from workers.analysis.grid import Grid  # noqa: E402
from workers.analysis.probes import (  # noqa: E402
    NATURAL_V1_IMAGES,
    NATURAL_V2_MAX_IMAGES,
    TEXTURE_V1_TARGET_SHARE,
    natural_count_notes,
    natural_set,
    natural_v1,
    natural_v2,
    normalize_for_model,
    texture_v1,
)

torch.set_num_threads(1)


def test_natural_v1_is_deterministic_and_in_range() -> None:
    a = natural_v1((24, 40), count=3)
    b = natural_v1((24, 40), count=3)
    assert a.name == "natural-v1" and a.sources == NATURAL_V1_IMAGES[:3]
    assert a.images.shape == (3, 3, 24, 40) and a.images.dtype == torch.float32
    assert torch.equal(a.images, b.images)
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert a.images.flatten(1).std(-1).min() > 0.05  # real photographs, not blanks
    with pytest.raises(ValueError, match="count"):
        natural_v1(16, count=0)


def test_natural_v1_ships_every_listed_image() -> None:
    probes = natural_v1(16)
    assert probes.images.shape == (len(NATURAL_V1_IMAGES), 3, 16, 16)


def test_natural_v2_offers_at_least_64_distinct_images_and_starts_with_natural_v1() -> None:
    assert NATURAL_V2_MAX_IMAGES >= 64
    probes = natural_v2(16)
    assert probes.name == "natural-v2" and probes.images.shape == (NATURAL_V2_MAX_IMAGES, 3, 16, 16)
    assert len(set(probes.sources)) == NATURAL_V2_MAX_IMAGES
    assert torch.equal(probes.images[:12], natural_v1(16).images)
    assert torch.equal(natural_v2(16, count=20).images, probes.images[:20])
    flat = probes.images.flatten(1)
    gaps = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert gaps.min() > 0.5  # no two views are the same picture (pixel L2 over 768 values)
    with pytest.raises(ValueError, match="count"):
        natural_v2(16, count=NATURAL_V2_MAX_IMAGES + 1)


@pytest.mark.parametrize(
    ("asked", "name", "used"),
    [(5, "natural-v1", 5), (12, "natural-v1", 12), (32, "natural-v2", 32), (500, "natural-v2", 96)],
)
def test_a_natural_request_gets_what_it_asks_for_or_a_note(
    asked: int, name: str, used: int
) -> None:
    probes = natural_set(16, asked)
    assert probes.name == name and len(probes.images) == used
    notes = natural_count_notes({"options": {"probe_set": "natural-v1", "num_images": asked}})
    assert bool(notes) == (used < asked)
    if notes:
        assert f"{asked} natural probe images were asked for" in notes[0]
    assert not natural_count_notes({"options": {"probe_set": "texture-v1", "num_images": 500}})


@pytest.mark.parametrize("grid", [(4, 4), (6, 10)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_texture_v1_masks_mark_exactly_the_textured_patches(grid: tuple[int, int]) -> None:
    g = Grid(*grid, 8)
    size = (grid[0] * 8, grid[1] * 8)
    probes = texture_v1(size, g, count=6, seed=2)
    again = texture_v1(size, g, count=6, seed=2)
    other = texture_v1(size, g, count=6, seed=3)
    assert torch.equal(probes.images, again.images)
    assert torch.equal(probes.texture_fraction, again.texture_fraction)
    assert not torch.equal(probes.images, other.images)
    assert probes.images.shape == (6, 3, *size) and probes.texture_fraction.shape == (
        6,
        g.num_patches,
    )
    assert probes.texture_mask.dtype == torch.bool
    # Flat background: a patch with no texture has constant pixels; fully textured patches
    # (real textures) have varying pixels.
    patches = probes.images[:, 0].reshape(6, grid[0], 8, grid[1], 8).permute(0, 1, 3, 2, 4)
    spread = patches.reshape(6, g.num_patches, 64).std(-1)
    frac = probes.texture_fraction
    assert spread[frac == 0].max() == 0
    assert (spread[frac == 1] > 0).float().mean() > 0.95
    share = frac.mean(-1)
    assert share.min() > 0.5 * TEXTURE_V1_TARGET_SHARE and share.max() < 0.8
    # The background grey equals the mean of the textured pixels, so brightness alone does
    # not reveal the texture: textured mean = (image sum - grey * flat pixels) / textured pixels.
    for image_patches, image, f in zip(
        patches.reshape(6, g.num_patches, 64), probes.images[:, 0], frac, strict=True
    ):
        flat = (f == 0).nonzero()
        if not flat.numel():
            continue
        grey = float(image_patches[int(flat[0]), 0])
        textured_pixels = float(f.sum()) * 64
        flat_pixels = image.numel() - textured_pixels
        textured_mean = (float(image.double().sum()) - grey * flat_pixels) / textured_pixels
        assert abs(textured_mean - grey) < 1e-5


def test_texture_v1_needs_a_grid_that_fits_the_image() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        texture_v1(32, Grid(5, 4, 8))


def test_texture_v1_measures_a_grid_that_does_not_tile_on_the_part_it_covers() -> None:
    # 30 px in 7-px patches: timm's patch embedding sees a 4x4 grid over the top-left 28 px
    probes = texture_v1(30, Grid(4, 4, 7), count=3, seed=1)
    assert probes.images.shape == (3, 3, 30, 30)
    assert probes.texture_fraction.shape == (3, 16)
    assert (
        0.0 <= float(probes.texture_fraction.min()) <= float(probes.texture_fraction.max()) <= 1.0
    )
    assert float(probes.texture_fraction.sum()) > 0


@pytest.mark.parametrize(
    ("model_name", "mean", "std"),
    [
        # a bare VisionTransformer has timm's default config: ImageNet mean/std
        (None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        # the registered vit_tiny_patch16_224 config (augreg weights) uses 0.5 / 0.5
        ("vit_tiny_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ],
)
def test_normalize_for_model_uses_the_model_config_and_keeps_the_input(
    model_name: str | None, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    import timm

    if model_name is None:
        model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    else:
        model = timm.create_model(model_name, pretrained=False, img_size=16, depth=1)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    copy = images.clone()
    out = normalize_for_model(images, model)
    assert torch.equal(images, copy)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    torch.testing.assert_close(out, (copy - m) / s)
    with pytest.raises(ValueError, match=r"\(M, 3, H, W\)"):
        normalize_for_model(images[0], model)


def test_a_natural_request_honours_any_count_and_keeps_its_first_twelve() -> None:
    twelve = natural_v1((16, 24))
    more = natural_set((16, 24), 27)
    assert more.images.shape == (27, 3, 16, 24) and more.name == "natural-v2"
    assert torch.equal(more.images[:12], twelve.images)
    # The views are new images, not copies of their sources.
    for i in range(12, 27):
        assert (more.images[i] - more.images[i % 12]).abs().mean() > 1e-3, i
    assert torch.equal(natural_set((16, 24), 27).images, more.images)  # deterministic
