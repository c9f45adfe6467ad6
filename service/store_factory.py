"""Which artifact store the settings select. Its own module so that neither store imports the
other: `service.store` (the interface and the local directory) and `service.s3store` (S3)
both stay below it.
"""

from __future__ import annotations

from typing import Any

from service.store import ArtifactStore, LocalStore


def open_store(settings: Any) -> ArtifactStore:
    """The store ``settings`` select: S3 for an ``s3://`` store URL, the local directory otherwise."""
    if settings.store_url:
        from service.s3store import S3Store  # boto3 is only imported when S3 is used

        return S3Store(
            settings.store_url, endpoint_url=settings.s3_endpoint_url, scratch=settings.scratch_dir
        )
    return LocalStore(settings.data_dir)
