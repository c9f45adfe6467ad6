"""Submit-time checks of a transformers checkpoint: which timm model its config names.

A checkpoint part that is a .zip/.tar of a ``save_pretrained`` folder, or a .safetensors file
sent with a ``config`` part (its config.json), is a transformers checkpoint. Its config is read
here (bounded, through `workers.hf_archive`, standard library only: no torch in the API), so
an unsupported model type, a hostile archive or an arch that contradicts the config is a 4xx
at once, and ``arch`` may be left out: the config names the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.errors import CheckpointError, InvalidRequest
from service.uploads import StoredFile
from workers.analysis.hf_mapping import TimmSpec, TransformersConfigError, timm_spec
from workers.hf_archive import FolderError, is_archive, load_json_file, open_folder, read_configs


def is_transformers(checkpoints: list[StoredFile], config: StoredFile | None) -> bool:
    return config is not None or any(is_archive(f.path) for f in checkpoints)


def transformers_model(
    checkpoints: list[StoredFile], config: StoredFile | None, arch: str | None
) -> tuple[str, str]:
    """The timm arch and model_type the checkpoints' config maps to (every checkpoint of a
    trajectory must map to the same); CheckpointError (422) for a config or an archive that
    cannot be used, InvalidRequest (400) for a request that mixes formats or names another arch."""
    if config is not None and any(is_archive(f.path) for f in checkpoints):
        raise InvalidRequest(
            "a 'config' part goes with .safetensors weights; an archive holds its own config.json"
        )
    if config is None and not all(is_archive(f.path) for f in checkpoints):
        raise InvalidRequest("the checkpoints of one trajectory must all have the same file type")
    if config is not None and not all(f.path.suffix == ".safetensors" for f in checkpoints):
        raise InvalidRequest(
            "a 'config' part goes with .safetensors weights of a transformers model"
        )
    if any(f.in_store for f in checkpoints) and not arch:
        # reused by sha256 from the object store, not here to read: checked when first sent
        raise InvalidRequest("name the 'arch' when reusing a transformers archive by its sha256")
    try:
        if config is not None:
            specs = [timm_spec(load_json_file(config.path, "the config part"))]
        else:
            specs = [_archive_spec(f.path) for f in checkpoints if not f.in_store]
    except (FolderError, TransformersConfigError) as exc:
        raise CheckpointError(f"transformers checkpoint: {exc}") from None
    mapped = {(spec.arch, spec.model_type) for spec in specs}
    if len(mapped) > 1:
        raise InvalidRequest(
            "the checkpoints of one trajectory map to different models: "
            + ", ".join(sorted(f"{a} ({t})" for a, t in mapped))
        )
    if not mapped:
        return str(arch), "unknown"
    ((mapped_arch, model_type),) = mapped
    if arch and arch != mapped_arch:
        raise InvalidRequest(
            f"arch '{arch}' contradicts the checkpoint's config ({model_type}, which maps to "
            f"'{mapped_arch}'); leave 'arch' out for a transformers checkpoint"
        )
    return mapped_arch, model_type


def _archive_spec(path: Path) -> TimmSpec:
    """The spec of an archived folder's config, once the folder shows weights to load."""
    folder = open_folder(path)
    spec = timm_spec(*read_configs(folder))
    folder.weight_files()
    return spec


def mark_transformers(
    record: dict[str, Any], model_type: str, config: StoredFile | None, root: Path
) -> None:
    """Say in each checkpoint record that it is a transformers checkpoint, and where its config is."""
    path = str(config.path.relative_to(root)) if config is not None else None
    for checkpoint in [record["checkpoint"], *(record.get("trajectory") or [])]:
        checkpoint["format"] = "transformers"
        checkpoint["model_type"] = model_type
        if path is not None:
            checkpoint["config_path"] = path
    if config is not None:
        record["config"] = {
            "filename": config.filename,
            "path": path,
            "bytes": config.size,
            "sha256": config.sha256,
        }
