"""Uploaded images -> tensors, opened defensively (bombs, traversal, junk are clear errors)."""

from __future__ import annotations

import io
import tarfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: The only decoders Pillow may pick (the formats IMAGE_SUFFIXES name): whatever the content
#: claims to be, nothing else is decoded (an EPS file would otherwise reach Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF")
MAX_IMAGE_PIXELS = 40_000_000  # about 6300x6300; PIL's own bomb check raises above this
#: Pixels of an image after the aspect-preserving resize (a W x 1 image becomes W*S x S).
MAX_RESIZED_PIXELS = MAX_IMAGE_PIXELS
#: Uncompressed total of the images in every archive of one request together.
MAX_ARCHIVE_BYTES = 512 * 1024**2
#: Members (zip) or whole archives (compressed tar) that inflate more than this are bombs.
MAX_COMPRESSION_RATIO = 200


class ImageInputError(Exception):
    """The uploaded images cannot be used; the message names the file and the problem."""

    code = "images_rejected"


def _open_image(data: bytes, name: str) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
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
            f"'{name}' is not a readable image: its content is no known image format "
            f"(accepted: {', '.join(IMAGE_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"'{name}' is not a readable image: {exc}") from None
    return image.convert("RGB")


def _safe_member(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts


@dataclass
class _Budget:
    """What the request's archives have inflated to so far, all archives together."""

    max_images: int
    images: int = 0
    inflated: int = 0

    def add(self, size: int, where: str) -> None:
        self.inflated += size
        self.images += 1
        if self.inflated > MAX_ARCHIVE_BYTES:
            raise ImageInputError(
                f"the images archives inflate beyond {MAX_ARCHIVE_BYTES} bytes (all archives of "
                f"the request together) at '{where}'"
            )
        if self.images > self.max_images:
            raise ImageInputError(f"too many images in the archive: the limit is {self.max_images}")


def _scan_zip(path: Path, budget: _Budget) -> list[str]:
    """The image members of a zip, checked from its directory without inflating anything."""
    members = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            if not _safe_member(info.filename):
                raise ImageInputError(f"the images archive has an unsafe path '{info.filename}'")
            if not info.filename.lower().endswith(IMAGE_SUFFIXES):
                continue
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > MAX_COMPRESSION_RATIO:
                raise ImageInputError(
                    f"the images archive inflates beyond its limits at '{info.filename}' "
                    f"({info.file_size} bytes, ratio {ratio:.0f}); is it a zip bomb?"
                )
            budget.add(info.file_size, info.filename)
            members.append(info.filename)
    return members


def _scan_tar(path: Path, name: str, budget: _Budget) -> list[str]:
    """The image members of a (compressed) tar, from its headers in one streaming pass.

    A compressed tar has no per-member sizes on disk, so the ratio is the whole archive's:
    refused at the header whose declared size takes the running total of every member past
    ``MAX_COMPRESSION_RATIO`` times the file's size, before that member is inflated.
    """
    members = []
    allowed = MAX_COMPRESSION_RATIO * max(path.stat().st_size, 1)
    total = 0
    try:
        with tarfile.open(path, "r|*") as archive:
            for info in archive:
                if not _safe_member(info.name):
                    raise ImageInputError(f"the images archive has an unsafe path '{info.name}'")
                total += max(info.size, 0)
                if total > allowed:
                    raise ImageInputError(
                        f"the images archive '{name}' inflates more than {MAX_COMPRESSION_RATIO}x "
                        f"its {path.stat().st_size} bytes at '{info.name}'; is it a tar bomb?"
                    )
                if info.isfile() and info.name.lower().endswith(IMAGE_SUFFIXES):
                    budget.add(info.size, info.name)
                    members.append(info.name)
    except tarfile.TarError:
        # tarfile's message lists every decompressor it tried; the user needs the file's name.
        raise ImageInputError(f"the images archive '{name}' is not a readable zip or tar") from None
    return members


@dataclass
class UploadedImages:
    """The request's images, checked (count, paths, sizes, ratios) but not yet read: each
    iteration yields (name, encoded bytes) one image at a time, so no more than one
    member is held in memory, whatever the archives hold."""

    sources: list[tuple[Path, str, list[str] | None]]  # (file, upload name, archive members)

    def __len__(self) -> int:
        return sum(1 if members is None else len(members) for _, _, members in self.sources)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        for path, name, members in self.sources:
            if members is None:
                yield name, path.read_bytes()
            elif zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    for member in members:
                        yield member, archive.read(member)
            else:
                wanted = set(members)
                with tarfile.open(path, "r|*") as archive:
                    for info in archive:
                        if info.name in wanted and info.isfile():
                            handle = archive.extractfile(info)
                            yield info.name, handle.read() if handle else b""


def load_images(paths: list[Path], names: list[str], *, max_images: int) -> UploadedImages:
    """The uploaded images (files, or archives of them), counted and checked, to be read one
    at a time (`UploadedImages`).

    Decoding waits for `images_to_pixels`, which opens one image at a time: holding every
    decoded full-resolution upload at once would grow memory with the number of images.
    """
    budget = _Budget(max_images)
    sources: list[tuple[Path, str, list[str] | None]] = []
    for path, name in zip(paths, names, strict=True):
        if path.name.lower().endswith(IMAGE_SUFFIXES):
            sources.append((path, name, None))
        elif zipfile.is_zipfile(path):
            sources.append((path, name, _scan_zip(path, budget)))
        else:
            sources.append((path, name, _scan_tar(path, name, budget)))
    images = UploadedImages(sources)
    count = len(images)
    if not count:
        raise ImageInputError("no images found in the upload (an empty archive?)")
    if count > max_images:
        raise ImageInputError(f"too many images: {count}, the limit is {max_images}")
    return images


def images_to_pixels(images: Iterable[tuple[str, bytes]], size: tuple[int, int]) -> Tensor:
    """(N, 3, H, W) uint8: each image decoded (with the bomb checks of `_open_image`), resized
    (shorter side) and centre-cropped, one at a time. Kept as 8-bit pixels, a quarter of the
    float32 size, until a batch is normalised (`unit_pixels`)."""
    height, width = size
    out = []
    for name, data in images:
        image = _open_image(data, name)
        scale = max(height / image.height, width / image.width)
        target = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        if target[0] * target[1] > MAX_RESIZED_PIXELS:
            raise ImageInputError(
                f"image '{name}' ({image.width}x{image.height}) would be resized to "
                f"{target[0]}x{target[1]} pixels, over the limit of {MAX_RESIZED_PIXELS}: "
                "its aspect ratio is too extreme"
            )
        resized = image.resize(target, Image.BICUBIC)
        left = (resized.width - width) // 2
        top = (resized.height - height) // 2
        crop = resized.crop((left, top, left + width, top + height))
        out.append(torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out)


def unit_pixels(pixels: Tensor) -> Tensor:
    """Pixels in [0, 1], float32: uint8 pixels divided by 255 (one correctly rounded float32
    division, so every caller gets the same bits); float pixels are returned as they are."""
    return pixels.to(torch.float32) / 255.0 if pixels.dtype == torch.uint8 else pixels
