"""Checkpoint -> model. Loaders that cannot run code: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub that is not there

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from workers.analysis.checkpoint_errors import CheckpointError, ModelTooLarge  # noqa: E402, F401

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
MAX_KEYS_NAMED = 8


@dataclass
class LoadedModel:
    model: nn.Module
    arch: str
    model_args: dict[str, Any]
    num_classes: int
    notes: list[str] = field(default_factory=list)
    non_finite_parameters: list[str] = field(default_factory=list)
    # facts of a checkpoint format mapped onto timm, for the report's model section
    # (transformers: format, model_type, its own architectures; see workers.hf_checkpoint)
    source: dict[str, Any] = field(default_factory=dict)
    # The checkpoint's own pos_embed when loading resampled it to the model's grid (the
    # position section judges the table as stored); None when it was loaded as is.
    stored_pos_embed: Tensor | None = None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors by name from a .safetensors file or a .pth/.pt/.bin state dict (never unpickled)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"the .safetensors file is corrupt or truncated: {exc}") from None
    if suffix in TORCH_SUFFIXES:
        _check_zip_records(path, suffix)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only raises UnpicklingError, RuntimeError, ...
            raise CheckpointError(
                f"the {suffix} file is not a plain state dict of tensors (loaded with "
                f"torch.load(weights_only=True), which refuses arbitrary objects): {_unpickler_reason(exc)}"
            ) from None
        for key in NESTED_KEYS:
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(
                f"the {suffix} file holds no state dict (a mapping of names to tensors)"
            )
        return {str(k).removeprefix("module."): v for k, v in obj.items()}
    raise CheckpointError(f"unsupported checkpoint type '{suffix}'")


def _check_zip_records(path: Path, suffix: str) -> None:
    """A torch zip checkpoint stores its records uncompressed; a compressed record that
    inflates more than ``MAX_COMPRESSION_RATIO`` times (what images archives obey too) is a
    bomb, refused from the zip directory before torch inflates it."""
    import zipfile

    from workers.inputs import MAX_COMPRESSION_RATIO

    if not zipfile.is_zipfile(path):
        return  # the legacy format: raw storages, nothing inflates
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"the {suffix} file is a corrupt zip: {exc}") from None
    for info in records:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.compress_type != zipfile.ZIP_STORED and ratio > MAX_COMPRESSION_RATIO:
            raise CheckpointError(
                f"the {suffix} file's record '{info.filename}' inflates {ratio:.0f}x "
                f"({info.file_size} bytes), over the limit of {MAX_COMPRESSION_RATIO}x; "
                "is it a zip bomb?"
            )


def write_state_dict(state_dict: dict[str, Tensor], path: Path) -> Path:
    """Save tensors by name as ``.safetensors`` (the inverse of `read_state_dict`).

    safetensors stores dense buffers only, so views (e.g. a slice of a fused qkv weight) are
    made contiguous first; the caller's tensors are not modified.
    """
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in state_dict.items()}, str(path))
    return path


def _unpickler_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused, without its advice to turn it off.

    torch's message opens with "Re-running torch.load with weights_only set to False will
    likely succeed"; for a service that loads strangers' files that is the wrong advice, so
    only the line that names the refused thing is kept.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            return reason or (lines[index + 1] if index + 1 < len(lines) else line)
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
    kept = [line for line in lines if not line.startswith(advice)]
    return kept[0] if kept else type(exc).__name__


def build_model(
    arch: str,
    model_args: dict[str, Any],
    state_dict: dict[str, Tensor],
    *,
    batch_size: int = 1,
) -> LoadedModel:
    """Create ``arch`` with ``model_args`` and load ``state_dict`` into it, strictly.

    Nothing is allocated before the model is known to fit: it is first built on the meta
    device, its cost estimated against the worker's limits (`workers.analysis.budget`,
    ModelTooLarge with the numbers) and the state dict's names and shapes checked against
    it; only then is it built and initialised for real. A position table trained for
    another grid is resampled the way timm does (``checkpoint_filter_fn``) and the report
    says so. ``num_classes`` is read from the checkpoint's head when not given (capped; 0, a
    backbone, when the checkpoint has no head), and ``in_chans`` from its patch embedding.
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    from workers.analysis.budget import (
        Limits,
        check_estimate,
        check_model_args,
        derived_num_classes,
        estimate,
        meta_model,
    )
    from workers.analysis.posembed import prepare_stored_pos_embed

    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model_args.items()}
    check_model_args(args)
    classes = derived_num_classes(state_dict)
    if "num_classes" not in args and classes is not None:
        args["num_classes"] = classes
    elif (
        "num_classes" not in args
        and "head.weight" not in state_dict
        and ("patch_embed.proj.weight" in state_dict)
    ):
        args["num_classes"] = 0
    proj = state_dict.get("patch_embed.proj.weight")
    if "in_chans" not in args and proj is not None and proj.ndim == 4 and proj.shape[1] != 3:
        args["in_chans"] = int(proj.shape[1])
    try:
        skeleton = meta_model(arch, args)
    except Exception as exc:
        raise CheckpointError(f"cannot build '{arch}' with {model_args}: {exc}") from None
    check_estimate(arch, estimate(skeleton), batch_size, Limits.from_env())
    notes: list[str] = []
    pos = state_dict.get("pos_embed")
    own_pos = getattr(skeleton, "pos_embed", None)
    stored_pos = None
    if isinstance(pos, Tensor) and isinstance(own_pos, Tensor) and pos.shape != own_pos.shape:
        stored_pos = pos
        state_dict = checkpoint_filter_fn(
            prepare_stored_pos_embed(dict(state_dict), skeleton), skeleton
        )
        notes.append(
            f"pos_embed {tuple(pos.shape)} was trained for another grid and was resampled to "
            f"{tuple(own_pos.shape)} (timm checkpoint_filter_fn)"
        )
    _check_fits(arch, skeleton.state_dict(), state_dict)
    del skeleton
    try:
        model = timm.create_model(arch, pretrained=False, **args)
    except Exception as exc:
        raise CheckpointError(f"cannot build '{arch}' with {model_args}: {exc}") from None
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(_mismatch_message(arch, result.missing_keys, result.unexpected_keys))
    model.eval()
    non_finite = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    return LoadedModel(
        model,
        arch,
        dict(model_args),
        int(getattr(model, "num_classes", 0)),
        notes,
        non_finite,
        stored_pos_embed=stored_pos,
    )


def _check_fits(arch: str, own: dict[str, Tensor], state_dict: dict[str, Tensor]) -> None:
    """The checkpoint's names and shapes against the (meta) model's, before allocating it."""
    missing = [name for name in own if name not in state_dict]
    unexpected = [name for name in state_dict if name not in own]
    if missing or unexpected:
        raise CheckpointError(_mismatch_message(arch, missing, unexpected))
    for name, tensor in own.items():
        if state_dict[name].shape != tensor.shape:
            raise CheckpointError(
                f"the state dict does not fit '{arch}': size mismatch for {name}: copying a param "
                f"with shape {state_dict[name].shape} from checkpoint, the shape in current model "
                f"is {tensor.shape}."
            )


def _mismatch_message(arch: str, missing: list[str], unexpected: list[str]) -> str:
    def names(keys: list[str]) -> str:
        shown = ", ".join(keys[:MAX_KEYS_NAMED])
        return shown + (
            f" and {len(keys) - MAX_KEYS_NAMED} more" if len(keys) > MAX_KEYS_NAMED else ""
        )

    parts = [f"the state dict does not fit '{arch}'"]
    if missing:
        parts.append(f"missing keys: {names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {names(unexpected)}")
    return "; ".join(parts)


def load_checkpoint(
    path: Path, arch: str, model_args: dict[str, Any] | None = None, *, batch_size: int = 1
) -> LoadedModel:
    """Read a torch checkpoint and build the model it belongs to (`build_model`)."""
    state_dict = read_state_dict(path)
    try:
        return build_model(arch, model_args or {}, state_dict, batch_size=batch_size)
    except RuntimeError as exc:  # size mismatches from load_state_dict
        raise CheckpointError(
            f"the state dict does not fit '{arch}': {str(exc).splitlines()[-1].strip()}"
        ) from None
