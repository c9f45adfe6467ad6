"""A transformers checkpoint (a save_pretrained folder as one archive, or its .safetensors with
the config beside it) -> the equivalent timm model, through `workers.analysis.hf_mapping`."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor

from workers.analysis.hf_mapping import (
    TimmSpec,
    TransformersConfigError,
    timm_spec,
    timm_state_dict,
)
from workers.analysis.loading import (
    CheckpointError,
    LoadedModel,
    ModelTooLarge,
    build_model,
    read_state_dict,
)
from workers.hf_archive import (
    FolderError,
    extract,
    is_archive,
    load_json_file,
    open_folder,
    read_configs,
)


def _folder_weights(path: Path) -> tuple[TimmSpec, dict[str, Tensor]]:
    """The spec of the folder's config (an unsupported model fails before any weights are
    copied) and its weights, each file copied out next to the archive (the audit's own disk,
    not /tmp) and removed once read."""
    folder = open_folder(path)
    spec = timm_spec(*read_configs(folder))
    state_dict: dict[str, Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="vitaudit-hf-", dir=path.parent) as tmp:
        for index, name in enumerate(folder.weight_files()):
            local = extract(folder, name, Path(tmp) / f"{index:05d}{Path(name).suffix}")
            part = read_state_dict(local)
            local.unlink()
            overlap = state_dict.keys() & part.keys()
            if overlap:
                raise FolderError(f"the weight shards both hold '{sorted(overlap)[0]}'")
            state_dict.update(part)
    return spec, state_dict


def load_transformers(
    path: Path,
    model_args: dict[str, Any] | None = None,
    *,
    config_path: Path | None = None,
    batch_size: int = 1,
) -> LoadedModel:
    """Build the timm model equivalent to a transformers checkpoint and load its weights.

    ``path`` is a .zip/.tar of the folder, or a .safetensors (.bin) file whose config.json is at
    ``config_path``. ``model_args`` (the request's) override the mapped ones, e.g. a smaller
    ``img_size``: the stored position table is then resampled by timm on load, as for any
    checkpoint. The model's normalisation is the folder's preprocessor config, or the family's.
    """
    try:
        if is_archive(path):
            spec, state_dict = _folder_weights(path)
        else:
            if config_path is None:
                raise FolderError("a transformers .safetensors checkpoint needs its config.json")
            spec = timm_spec(load_json_file(config_path, "config.json"))
            state_dict = read_state_dict(path)
        mapped, notes = timm_state_dict(spec, state_dict)
    except (FolderError, TransformersConfigError) as exc:
        raise CheckpointError(str(exc)) from None
    return _build(spec, mapped, notes, model_args or {}, batch_size)


def _build(
    spec: TimmSpec,
    mapped: dict[str, Tensor],
    notes: list[str],
    overrides: dict[str, Any],
    batch_size: int = 1,
) -> LoadedModel:
    from timm.layers import LayerNorm, Mlp, SwiGLUPacked

    args = {**spec.model_args, **overrides}
    if "head.weight" not in mapped:
        args.setdefault("num_classes", 0)  # a backbone: features, no classifier
    layers = {
        "norm_layer": partial(LayerNorm, eps=spec.layer_norm_eps),
        "mlp_layer": SwiGLUPacked if spec.mlp_layer == "swiglu" else Mlp,
    }
    try:
        loaded = build_model(spec.arch, {**args, **layers}, mapped, batch_size=batch_size)
    except (RuntimeError, CheckpointError) as exc:  # names or shapes that do not fit
        if isinstance(exc, ModelTooLarge):
            raise
        raise CheckpointError(
            f"the {spec.model_type} weights do not fit their config mapped to '{spec.arch}': "
            f"{str(exc).splitlines()[-1].strip()}"
        ) from None
    loaded.model_args = args
    notes.append(
        f"transformers: inputs normalised with mean {list(spec.mean)} and std {list(spec.std)} "
        f"({spec.normalization_source})"
    )
    loaded.notes = notes + loaded.notes
    loaded.source = {"format": "transformers", **spec.facts}
    model = loaded.model
    model.pretrained_cfg = {**(model.pretrained_cfg or {}), "mean": spec.mean, "std": spec.std}
    return loaded
