"""The per-channel normalisation an audit feeds the model: ``(x - mean) / std``.

One value object for both pipelines (PyTorch and ONNX), so the report's
``settings.normalization`` always says which mean and std were used and where they came
from: the request's ``options.normalization``, or the architecture's timm pretrained config
(ImageNet's when timm does not know the name). Probe images are RGB in [0, 1]; a model
that takes one channel gets them as luma (ITU-R BT.601 weights), and a 3-entry default is
averaged to one entry for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma: the grey value of an RGB pixel (what PIL's "L" conversion uses).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Normalization:
    """Mean and std per input channel, and the source of the numbers (for the report)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"normalization needs one mean and one std per channel, got "
                f"{len(self.mean)} means and {len(self.std)} stds"
            )
        if any(not s > 0 for s in self.std):
            raise ValueError(f"normalization std must be positive, got {list(self.std)}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def apply(self, images: Tensor) -> Tensor:
        """RGB images in [0, 1] (M, 3, H, W) -> model inputs (M, channels, H, W); a new tensor."""
        x = to_channels(images, self.channels)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[None, :, None, None]
        return (x - mean) / std

    def report(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}


def to_channels(images: Tensor, channels: int) -> Tensor:
    """RGB images (M, 3, H, W) as ``channels`` channels: unchanged for 3, luma for 1."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (M, 3, H, W), got {tuple(images.shape)}")
    if channels == 3:
        return images
    if channels == 1:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
        return (images * weights[None, :, None, None]).sum(1, keepdim=True)
    raise ValueError(f"probe images can be given as 1 or 3 channels, the model takes {channels}")


def pretrained_normalization(arch: str | None) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, source) from timm's pretrained config of ``arch``, else ImageNet's."""
    if arch:
        try:
            import timm

            cfg = timm.models.get_pretrained_cfg(arch)
        # Unknown names give None; a malformed tag or a broken registry entry may raise.
        # Not `except Exception`: RQ's job-timeout alarm must not be swallowed here.
        except (RuntimeError, ValueError, KeyError, AttributeError, OSError):
            cfg = None
        if cfg is not None and cfg.mean and cfg.std:
            return tuple(cfg.mean), tuple(cfg.std), f"timm pretrained config of '{arch}'"
    return IMAGENET_MEAN, IMAGENET_STD, "ImageNet mean/std (timm default)"


def resolve_normalization(
    given: dict[str, Any] | None, arch: str | None, *, channels: int = 3
) -> Normalization:
    """The normalisation for a model of ``channels`` input channels: ``given`` (the request's
    ``{"mean": [...], "std": [...]}``) when set, else the arch's pretrained config.

    Raises ``ValueError`` when the given numbers do not match the model's channels.
    """
    if given:
        mean, std = tuple(float(v) for v in given["mean"]), tuple(float(v) for v in given["std"])
        if len(mean) != channels:
            raise ValueError(
                f"options.normalization gives {len(mean)} channel(s); the model takes {channels}"
            )
        return Normalization(mean, std, "options.normalization")
    mean, std, source = pretrained_normalization(arch)
    if channels == len(mean):
        return Normalization(mean, std, source)
    if channels == 1:
        return Normalization(
            (sum(mean) / len(mean),),
            (sum(std) / len(std),),
            f"{source}, averaged over channels for a 1-channel model",
        )
    raise ValueError(
        f"no default normalization for a {channels}-channel model; give options.normalization"
    )
