"""A transformers ``save_pretrained`` folder as one reproducible .zip, for the client to upload."""

from __future__ import annotations

import zipfile
from pathlib import Path

ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same folder zips to the same bytes (and sha256)


def zip_folder(folder: Path, archive: Path) -> Path:
    """A transformers ``save_pretrained`` folder as one .zip to upload: its regular files at
    the archive's root, sorted, stored without compression (weights barely compress) and with
    fixed timestamps, so that the service's content addressing sees the same folder as the
    same checkpoint. Links and sub-folders are left out; the service reads the files beside
    config.json only."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    if not any(p.name == "config.json" for p in files):
        raise ValueError(f"folder '{folder}' holds no config.json; is it a save_pretrained folder?")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in files:
            info = zipfile.ZipInfo(path.name, ZIP_TIME)
            info.external_attr = 0o100644 << 16
            large = path.stat().st_size >= 2**31  # zip64 is decided before the bytes are written
            with path.open("rb") as source, zf.open(info, "w", force_zip64=large) as target:
                while chunk := source.read(1024 * 1024):
                    target.write(chunk)
    return archive
