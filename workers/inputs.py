"""Uploaded images -> tensors, opened defensively (bombs, traversal, junk are clear errors)."""

from __future__ import annotations

import io
import tarfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 40_000_000  # about 6300x6300; PIL's own bomb check raises above this
MAX_ARCHIVE_BYTES = 512 * 1024**2  # uncompressed total of an images archive
MAX_COMPRESSION_RATIO = 200  # zip members that inflate more than this are bombs, not photos


class ImageInputError(Exception):
    """The uploaded images cannot be used; the message names the file and the problem."""

    code = "images_rejected"


def _open_image(data: bytes, name: str) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageInputError(
                    f"image '{name}' declares {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS}"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"image '{name}' is a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        # PIL's message names an in-memory buffer object, not the user's file.
        raise ImageInputError(
            f"'{name}' is not a readable image: its content is no known image format"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"'{name}' is not a readable image: {exc}") from None
    return image.convert("RGB")


def _safe_member(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts


def _archive_members(path: Path, name: str, max_images: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of the images in a .zip or .tar archive, checked before inflating."""
    members: list[tuple[str, bytes]] = []
    total = 0
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                if not _safe_member(info.filename):
                    raise ImageInputError(
                        f"the images archive has an unsafe path '{info.filename}'"
                    )
                if not info.filename.lower().endswith(IMAGE_SUFFIXES):
                    continue
                total += info.file_size
                ratio = info.file_size / max(info.compress_size, 1)
                if total > MAX_ARCHIVE_BYTES or ratio > MAX_COMPRESSION_RATIO:
                    raise ImageInputError(
                        f"the images archive inflates beyond its limits at '{info.filename}' "
                        f"({info.file_size} bytes, ratio {ratio:.0f}); is it a zip bomb?"
                    )
                members.append((info.filename, archive.read(info)))
                if len(members) > max_images:
                    raise ImageInputError(
                        f"too many images in the archive: the limit is {max_images}"
                    )
        return members
    try:
        with tarfile.open(path) as archive:
            for info in archive:
                if not _safe_member(info.name):
                    raise ImageInputError(f"the images archive has an unsafe path '{info.name}'")
                if not info.isfile() or not info.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                total += info.size
                if total > MAX_ARCHIVE_BYTES:
                    raise ImageInputError(
                        f"the images archive inflates beyond {MAX_ARCHIVE_BYTES} bytes"
                    )
                handle = archive.extractfile(info)
                members.append((info.name, handle.read() if handle else b""))
                if len(members) > max_images:
                    raise ImageInputError(
                        f"too many images in the archive: the limit is {max_images}"
                    )
    except tarfile.TarError:
        # tarfile's message lists every decompressor it tried; the user needs the file's name.
        raise ImageInputError(f"the images archive '{name}' is not a readable zip or tar") from None
    return members


def load_images(paths: list[Path], names: list[str], *, max_images: int) -> list[tuple[str, bytes]]:
    """The uploaded images (files, or one archive of them) as (name, encoded bytes), counted.

    Decoding waits for `images_to_pixels`, which opens one image at a time: holding every
    decoded full-resolution upload at once would grow memory with the number of images.
    """
    items: list[tuple[str, bytes]] = []
    for path, name in zip(paths, names, strict=True):
        if path.name.lower().endswith(IMAGE_SUFFIXES):
            items.append((name, path.read_bytes()))
        else:
            items.extend(_archive_members(path, name, max_images))
    if not items:
        raise ImageInputError("no images found in the upload (an empty archive?)")
    if len(items) > max_images:
        raise ImageInputError(f"too many images: {len(items)}, the limit is {max_images}")
    return items


def images_to_pixels(images: Iterable[tuple[str, bytes]], size: tuple[int, int]) -> Tensor:
    """(N, 3, H, W) uint8: each image decoded (with the bomb checks of `_open_image`), resized
    (shorter side) and centre-cropped, one at a time. Kept as 8-bit pixels, a quarter of the
    float32 size, until a batch is normalised (`unit_pixels`)."""
    height, width = size
    out = []
    for name, data in images:
        image = _open_image(data, name)
        scale = max(height / image.height, width / image.width)
        resized = image.resize(
            (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
            Image.BICUBIC,
        )
        left = (resized.width - width) // 2
        top = (resized.height - height) // 2
        crop = resized.crop((left, top, left + width, top + height))
        out.append(torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out)


def unit_pixels(pixels: Tensor) -> Tensor:
    """Pixels in [0, 1], float32: uint8 pixels divided by 255 (one correctly rounded float32
    division, so every caller gets the same bits); float pixels are returned as they are."""
    return pixels.to(torch.float32) / 255.0 if pixels.dtype == torch.uint8 else pixels
