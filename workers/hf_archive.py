"""A transformers ``save_pretrained`` folder uploaded as one .zip or .tar, opened defensively.

Standard library only, so the service can read the config at submit time without torch. The
rules are the images archive's (`workers.inputs`) plus those a folder of weights needs: no
absolute or ``..`` member, no links or device files, a bounded number of members and bytes,
no member that inflates beyond `MAX_COMPRESSION_RATIO`, and only the members the model
needs are ever read (config, preprocessor config, weights), each streamed with its bytes
counted rather than trusting the archive's header.
"""

from __future__ import annotations

import json
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

ARCHIVE_SUFFIXES = (".zip", ".tar")
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
MAX_MEMBERS = 1_000
MAX_FOLDER_BYTES = 8 * 1024**3  # uncompressed; DINOv2 giant in float32 is 4.5 GB
MAX_JSON_BYTES = 4 * 1024**2  # config.json of a 21k-class ViT is about 1 MB
MAX_COMPRESSION_RATIO = 200  # as for images: weights barely compress, bombs do
RATIO_FLOOR_BYTES = 1024**2  # small members (JSON) may compress well; their size is bounded
COPY_CHUNK = 1024**2


class FolderError(ValueError):
    """The archive is not a usable transformers folder; the message names the problem."""


@dataclass(frozen=True)
class Member:
    name: str  # the name inside the archive
    size: int  # declared uncompressed size


@dataclass(frozen=True)
class Folder:
    """The checked listing of a transformers folder inside an archive."""

    path: Path
    root: str  # the folder's prefix inside the archive ("" or "name/")
    members: dict[str, Member]  # by name relative to root

    def has(self, name: str) -> bool:
        return name in self.members

    def weight_files(self) -> list[str]:
        """The weight files, relative to the root: ``model.safetensors``, the shards its index
        names, or ``pytorch_model.bin``."""
        if self.has(SAFETENSORS_NAME):
            return [SAFETENSORS_NAME]
        if self.has(SAFETENSORS_INDEX):
            index = read_json(self, SAFETENSORS_INDEX)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise FolderError(f"{SAFETENSORS_INDEX} has no weight_map")
            shards = sorted({str(v) for v in weight_map.values()})
            missing = [s for s in shards if s not in self.members]
            if missing or not all(s.endswith(".safetensors") for s in shards):
                raise FolderError(
                    f"{SAFETENSORS_INDEX} names shards the folder lacks: {', '.join(missing[:4])}"
                )
            return shards
        if self.has(TORCH_NAME):
            return [TORCH_NAME]
        raise FolderError(
            f"the transformers folder has no weights: expected {SAFETENSORS_NAME}, "
            f"{SAFETENSORS_INDEX} with its shards, or {TORCH_NAME} beside {CONFIG_NAME}"
        )


def is_archive(path: Path | str) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _safe_name(name: str) -> str:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not name:
        raise FolderError(f"the checkpoint archive has an unsafe path '{name}'")
    return str(path)


def _listing(path: Path) -> list[Member]:
    members: list[Member] = []
    total = 0

    def add(name: str, size: int) -> None:
        nonlocal total
        total += size
        if total > MAX_FOLDER_BYTES:
            raise FolderError(f"the checkpoint archive inflates beyond {MAX_FOLDER_BYTES} bytes")
        members.append(Member(name, size))
        if len(members) > MAX_MEMBERS:
            raise FolderError(f"the checkpoint archive has more than {MAX_MEMBERS} files")

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = _safe_name(info.filename)
                mode = info.external_attr >> 16
                kind = stat.S_IFMT(mode)  # 0 when the archiver wrote no file type (a plain file)
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise FolderError(
                        f"the checkpoint archive has a link or special file '{info.filename}'"
                    )
                if info.is_dir():
                    continue
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > RATIO_FLOOR_BYTES and ratio > MAX_COMPRESSION_RATIO:
                    raise FolderError(
                        f"the checkpoint archive member '{info.filename}' inflates {ratio:.0f}x; is it a zip bomb?"
                    )
                add(name, info.file_size)
        return members
    try:
        with tarfile.open(path, mode="r:") as archive:
            for info in archive:
                name = _safe_name(info.name)
                if info.isdir():
                    continue
                if not info.isfile():
                    raise FolderError(
                        f"the checkpoint archive has a link or special file '{info.name}'"
                    )
                add(name, info.size)
    except tarfile.TarError:
        raise FolderError(
            "the checkpoint is not a readable .zip or uncompressed .tar archive"
        ) from None
    return members


def open_folder(path: Path) -> Folder:
    """Check the archive at ``path`` and find the transformers folder in it: the directory of
    its shallowest ``config.json`` (the archive's root, or one folder inside it)."""
    members = _listing(path)
    configs = sorted(
        (m.name for m in members if PurePosixPath(m.name).name == CONFIG_NAME),
        key=lambda n: len(PurePosixPath(n).parts),
    )
    if not configs:
        raise FolderError(
            f"the checkpoint archive holds no {CONFIG_NAME}; zip the save_pretrained folder as it is"
        )
    depth = len(PurePosixPath(configs[0]).parts)
    if len([c for c in configs if len(PurePosixPath(c).parts) == depth]) > 1:
        raise FolderError(
            f"the checkpoint archive holds several folders with a {CONFIG_NAME}; send one"
        )
    root = configs[0][: -len(CONFIG_NAME)]
    inside = {m.name[len(root) :]: m for m in members if m.name.startswith(root)}
    return Folder(path, root, {k: v for k, v in inside.items() if "/" not in k})


@contextmanager
def _open_member(folder: Folder, name: str) -> Iterator[IO[bytes]]:
    member = folder.members[name]
    if zipfile.is_zipfile(folder.path):
        with zipfile.ZipFile(folder.path) as archive, archive.open(member.name) as handle:
            yield handle
        return
    with tarfile.open(folder.path, mode="r:") as archive:
        handle = archive.extractfile(member.name)
        if handle is None:
            raise FolderError(f"'{member.name}' is not a file")
        with handle:
            yield handle


def _read_bounded(handle: IO[bytes], limit: int, name: str) -> bytes:
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise FolderError(f"{name} is larger than {limit} bytes")
    return data


def read_json(folder: Folder, name: str) -> Any:
    """A JSON member of the folder (at most `MAX_JSON_BYTES`)."""
    with _open_member(folder, name) as handle:
        data = _read_bounded(handle, MAX_JSON_BYTES, name)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FolderError(f"{name} is not valid JSON: {exc}") from None


def read_configs(folder: Folder) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``config.json`` and, when the folder has one, ``preprocessor_config.json``."""
    config = read_json(folder, CONFIG_NAME)
    if not isinstance(config, dict):
        raise FolderError(f"{CONFIG_NAME} must hold a JSON object")
    preprocessor = read_json(folder, PREPROCESSOR_NAME) if folder.has(PREPROCESSOR_NAME) else None
    return config, preprocessor if isinstance(preprocessor, dict) else None


def extract(folder: Folder, name: str, dest: Path) -> Path:
    """Copy one member to ``dest``, counting bytes (never more than its declared size)."""
    limit = folder.members[name].size
    written = 0
    with _open_member(folder, name) as handle, dest.open("wb") as out:
        while chunk := handle.read(COPY_CHUNK):
            written += len(chunk)
            if written > limit:
                raise FolderError(f"'{name}' holds more bytes than the archive declares")
            out.write(chunk)
    return dest


def load_json_file(path: Path, name: str) -> dict[str, Any]:
    """A config uploaded beside a .safetensors file (the ``config`` part), bounded like a member."""
    with path.open("rb") as handle:
        data = _read_bounded(handle, MAX_JSON_BYTES, name)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FolderError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FolderError(f"{name} must hold a JSON object")
    return value
