"""Streaming multipart upload into the store, sha256 on the way, bounded in size.

Litestar's own multipart parsing would spool each file to a temporary file and hand it over
after the whole body arrived; here the body is parsed as it streams in, so every file part is
written exactly once, straight into the audit's folder, hashed on the way, and a request that
goes over the size limit is refused at the chunk that crosses it, before the rest is written.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO

from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser

from service.errors import (
    CheckpointError,
    ImageError,
    InsufficientStorage,
    InvalidRequest,
    TooLarge,
    UnsupportedMediaType,
)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".onnx", ".zip", ".tar")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
TEXT_FIELDS = ("arch", "options", "labels", "steps", "policy", "checkpoint_sha256", "cache")
MAX_CHECKPOINTS = 64
MAX_PARTS = 10_000


@dataclass
class StoredFile:
    field: str
    filename: str
    path: Path  # where it is staged (a path that may not exist locally when in_store)
    size: int
    sha256: str
    # Already in the artifact store (reused by its sha256 with a copy inside the store),
    # not in the local staging folder: commit_inputs has nothing to send for it.
    in_store: bool = False


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[StoredFile] = field(default_factory=list)

    def files_of(self, name: str) -> list[StoredFile]:
        return [f for f in self.files if f.field == name]


def suffix_of(filename: str, allowed: tuple[str, ...]) -> str | None:
    lower = filename.lower()
    return next((s for s in sorted(allowed, key=len, reverse=True) if lower.endswith(s)), None)


def _target(inputs: Path, segment: MultipartSegment, counts: dict[str, int]) -> Path:
    """Where a file part goes; the client's file name is never used as a path."""
    name = PurePath((segment.filename or "").replace("\\", "/")).name or "unnamed"
    if segment.name == "checkpoint":
        index = counts.get("checkpoint", 0)
        if index >= MAX_CHECKPOINTS:
            raise InvalidRequest(
                f"too many checkpoints: a trajectory holds at most {MAX_CHECKPOINTS}"
            )
        suffix = suffix_of(name, CHECKPOINT_SUFFIXES)
        if suffix is None:
            raise CheckpointError(
                f"checkpoint '{name}' has an unsupported file type; expected one of "
                + ", ".join(CHECKPOINT_SUFFIXES)
            )
        return inputs / (f"checkpoint{suffix}" if index == 0 else f"checkpoint-{index:03d}{suffix}")
    if segment.name == "images":
        index = counts.get("images", 0)
        suffix = suffix_of(name, IMAGE_SUFFIXES + ARCHIVE_SUFFIXES)
        if suffix is None:
            raise ImageError(
                f"image '{name}' has an unsupported file type; expected an image "
                f"({', '.join(IMAGE_SUFFIXES)}) or one archive ({', '.join(ARCHIVE_SUFFIXES)})"
            )
        (inputs / "images").mkdir(exist_ok=True)
        return inputs / "images" / f"{index:05d}{suffix}"
    if segment.name == "config":  # config.json of a transformers .safetensors checkpoint
        if counts.get("config", 0):
            raise InvalidRequest("send one 'config' part (the model's config.json)")
        return inputs / "config.json"
    raise InvalidRequest(
        f"unexpected file field '{segment.name}'; file fields are 'checkpoint', 'images' and 'config'"
    )


async def receive_form(
    content_type: str,
    content_length: int | None,
    body: AsyncIterator[bytes],
    inputs: Path,
    *,
    max_bytes: int,
    max_field_bytes: int,
    max_images: int,
) -> ReceivedForm:
    """Parse a multipart body into ``inputs``; raise a ServiceError naming the problem."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/form-data":
        raise UnsupportedMediaType(
            f"send the audit as multipart/form-data, not '{media.strip() or 'no content type'}'"
        )
    boundary = next(
        (
            p.split("=", 1)[1].strip().strip('"')
            for p in params.split(";")
            if p.strip().lower().startswith("boundary=")
        ),
        "",
    )
    if not boundary:
        raise InvalidRequest("multipart/form-data content type has no boundary")
    if content_length is not None and content_length > max_bytes:
        raise TooLarge(f"the request is {content_length} bytes; the limit is {max_bytes} bytes")

    form = ReceivedForm()
    counts: dict[str, int] = {}
    received = 0
    segment: MultipartSegment | None = None
    sink: IO[bytes] | None = None
    hasher = hashlib.sha256()
    size = 0
    text = bytearray()
    try:
        with PushMultipartParser(boundary, max_segment_count=MAX_PARTS) as parser:
            async for chunk in body:
                received += len(chunk)
                if received > max_bytes:
                    raise TooLarge(f"the request is larger than the limit of {max_bytes} bytes")
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        segment, size, hasher, text = event, 0, hashlib.sha256(), bytearray()
                        if event.filename is not None:
                            path = _target(inputs, event, counts)
                            counts[event.name] = counts.get(event.name, 0) + 1
                            if counts.get("images", 0) > max_images:
                                raise ImageError(f"too many images: the limit is {max_images}")
                            sink = path.open("wb")
                        elif event.name == "config":
                            raise InvalidRequest(
                                "send 'config' as a file part (curl -F config=@config.json)"
                            )
                        elif event.name not in TEXT_FIELDS:
                            raise InvalidRequest(
                                f"unexpected form field '{event.name}'; fields are "
                                + ", ".join(("checkpoint", "images") + TEXT_FIELDS + ("config",))
                            )
                    elif event:
                        size += len(event)
                        if sink is not None:
                            hasher.update(event)
                            sink.write(event)
                        else:
                            text += event
                            if len(text) > max_field_bytes:
                                raise InvalidRequest(
                                    f"form field '{segment.name if segment else '?'}' is larger "
                                    f"than {max_field_bytes} bytes"
                                )
                    elif segment is not None:
                        if sink is not None:
                            sink.close()
                            form.files.append(
                                StoredFile(
                                    segment.name,
                                    segment.filename or "",
                                    Path(sink.name),
                                    size,
                                    hasher.hexdigest(),
                                )
                            )
                            sink = None
                        else:
                            if segment.name in form.fields:
                                raise InvalidRequest(f"form field '{segment.name}' is given twice")
                            try:
                                form.fields[segment.name] = text.decode("utf-8")
                            except UnicodeDecodeError:
                                raise InvalidRequest(
                                    f"form field '{segment.name}' is not UTF-8 text"
                                ) from None
                        segment = None
    except ParserError as exc:
        raise InvalidRequest(f"malformed multipart/form-data: {exc}") from None
    except ParserLimitReached as exc:
        # The parser's own bounds: 8 headers per part, 4224 bytes of headers (so a file name
        # cannot be much longer than 4 KiB).
        raise InvalidRequest(
            f"a multipart part is over the parser's limits ({exc}): at most 8 headers "
            "and 4224 bytes of headers per part, file name included"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("the artifact store is full; try again later") from None
        raise
    finally:
        if sink is not None:
            sink.close()
    return form
