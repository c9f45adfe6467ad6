"""A corpus of hostile and broken submissions: each gets a 4xx problem or a failed job whose
reason names the problem, nothing is executed or written outside the audit, and the API keeps
answering afterwards.

Cases already covered elsewhere (counted separately): tests/test_api_errors.py (13 refused
forms, upload over the limit, truncated multipart, unknown audits) and tests/test_service_e2e.py
(pickle that runs code, truncated safetensors, another architecture, labels out of range).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Stack, audit_folders, problem, stack_env, start_stack, stop_stack
from tests.planted.models import TINY_ARCH, TINY_ARGS, save_safetensors, tiny_vit

pytestmark = pytest.mark.e2e

MAX_IMAGES = 3  # the hostile stack's VITAUDIT_MAX_IMAGES, small so "too many" is cheap to send
OPTIONS = json.dumps({"num_images": 2, "batch_size": 2, "model_args": TINY_ARGS})
BASE = {"arch": TINY_ARCH, "options": OPTIONS}


@pytest.fixture(scope="module")
def hostile(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("hostile-data")
    env = stack_env(redis_url, data_dir, VITAUDIT_MAX_IMAGES=str(MAX_IMAGES))
    running = start_stack(env, data_dir, data_dir / "logs")
    try:
        yield running
    finally:
        stop_stack(running)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = save_safetensors(tiny_vit(), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    return path.read_bytes()


# ---------------------------------------------------------------- builders of hostile files


def png_bytes(height: int = 20, width: int = 24, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A 100-byte PNG whose header declares width x height RGB pixels (7.5 GB decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def poisoned_checkpoint() -> bytes:
    """The tiny ViT with one NaN in the position table and one Inf in an MLP weight."""
    import torch
    from safetensors.torch import save

    state = {k: v.clone().contiguous() for k, v in tiny_vit().state_dict().items()}
    state["pos_embed"][0, 3, 0] = float("nan")
    state["blocks.0.mlp.fc1.weight"][0, 0] = float("inf")
    return save({k: v.to(torch.float32) for k, v in state.items()})


def onnx_pointing_outside() -> bytes:
    """An ONNX model whose one weight is 'external data' at ../../../etc/passwd."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [4], np.zeros(4, np.float32).tobytes(), raw=True
    )
    onnx.external_data_helper.set_external_data(weight, location="../../../etc/passwd")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "g", [], [output], [weight]
    )
    return helper.make_model(graph).SerializeToString()


def assert_still_serving(stack: Stack) -> None:
    with stack.client() as http:
        assert http.get("/healthz").json() == {"status": "ok", "checks": {}}
        assert http.get("/readyz").status_code == 200


# ------------------------------------------------------------------------ refused by the API

Request = Callable[[bytes], dict]


def multipart(fields: dict[str, str], files: list[tuple[str, tuple[str, bytes]]]) -> dict:
    return {"data": fields, "files": files}


def raw(content: bytes, content_type: str | None) -> dict:
    return {"content": content, "headers": {"content-type": content_type} if content_type else {}}


REFUSED: list[tuple[str, Request, int, str]] = [
    (
        "wrong content type: JSON body",
        lambda ck: raw(b'{"arch": "vit_small_patch16_224"}', "application/json"),
        415,
        "send the audit as multipart/form-data, not 'application/json'",
    ),
    (
        "no content type at all",
        lambda ck: raw(b"hello", None),
        415,
        "send the audit as multipart/form-data, not 'no content type'",
    ),
    (
        "multipart without a boundary",
        lambda ck: raw(b"--x\r\n", "multipart/form-data"),
        400,
        "multipart/form-data content type has no boundary",
    ),
    (
        "multipart that is random bytes",
        lambda ck: raw(bytes(range(256)) * 8, "multipart/form-data; boundary=XyZ"),
        400,
        "malformed multipart/form-data: Unexpected end of multipart stream (parser closed)",
    ),
    (
        "multipart part without a Content-Disposition",
        lambda ck: raw(
            b"--XyZ\r\nContent-Type: text/plain\r\n\r\nhi\r\n--XyZ--\r\n",
            "multipart/form-data; boundary=XyZ",
        ),
        400,
        "malformed multipart/form-data: Missing Content-Disposition segment header",
    ),
    (
        "huge form field",
        lambda ck: multipart(
            {**BASE, "labels": "[" + "0," * 40_000 + "0]"}, [("checkpoint", ("a.safetensors", ck))]
        ),
        400,
        "form field 'labels' is larger than 65536 bytes",
    ),
    (
        "form field given twice",
        lambda ck: multipart(
            {"arch": [TINY_ARCH, TINY_ARCH], "options": OPTIONS},  # type: ignore[dict-item]
            [("checkpoint", ("a.safetensors", ck))],
        ),
        400,
        "form field 'arch' is given twice",
    ),
    (
        "form field that is not UTF-8",
        lambda ck: raw(
            b'--XyZ\r\nContent-Disposition: form-data; name="arch"\r\n\r\n\xff\xfe\xfd\r\n--XyZ--\r\n',
            "multipart/form-data; boundary=XyZ",
        ),
        400,
        "form field 'arch' is not UTF-8 text",
    ),
    (
        "unknown JSON option inside model_args",
        lambda ck: multipart(
            {**BASE, "options": '{"model_args": {"img_size": 32, "evil": 1}}'},
            [("checkpoint", ("a.safetensors", ck))],
        ),
        400,
        "options: Object contains unknown field `evil` - at `$.model_args`",
    ),
    (
        "options that are a JSON list",
        lambda ck: multipart(
            {**BASE, "options": "[1, 2]"}, [("checkpoint", ("a.safetensors", ck))]
        ),
        400,
        "options: Expected `object`, got `array`",
    ),
    (
        "an analysis that does not exist",
        lambda ck: multipart(
            {**BASE, "options": '{"analyses": ["rm -rf /"]}'},
            [("checkpoint", ("a.safetensors", ck))],
        ),
        400,
        "options: Invalid enum value 'rm -rf /' - at `$.analyses[0]`",
    ),
    (
        "a model a million wide",
        lambda ck: multipart(
            {**BASE, "options": '{"model_args": {"embed_dim": 1000000}}'},
            [("checkpoint", ("a.safetensors", ck))],
        ),
        400,
        "options: model_args.embed_dim must be between 1 and 100000",
    ),
    (
        "labels that are fractions",
        lambda ck: multipart(
            {**BASE, "labels": "[0.5, 1]"}, [("checkpoint", ("a.safetensors", ck))]
        ),
        400,
        "labels must be a JSON list of non-negative integers (class indices)",
    ),
    (
        "labels that are booleans",
        lambda ck: multipart(
            {**BASE, "labels": "[true, false]"}, [("checkpoint", ("a.safetensors", ck))]
        ),
        400,
        "labels must be a JSON list of non-negative integers (class indices)",
    ),
    (
        "an empty label list",
        lambda ck: multipart({**BASE, "labels": "[]"}, [("checkpoint", ("a.safetensors", ck))]),
        400,
        "labels is an empty list; leave it out to use the model's own predictions",
    ),
    (
        "too many images",
        lambda ck: multipart(
            BASE,
            [("checkpoint", ("a.safetensors", ck))]
            + [("images", (f"{i}.png", png_bytes(seed=i))) for i in range(MAX_IMAGES + 1)],
        ),
        422,
        f"too many images: the limit is {MAX_IMAGES}",
    ),
    (
        "more steps than checkpoints",
        lambda ck: multipart({**BASE, "steps": "[0, 10]"}, [("checkpoint", ("a.safetensors", ck))]),
        400,
        "2 steps were given for 1 checkpoints; give one step per checkpoint",
    ),
    (
        "steps that go backwards",
        lambda ck: multipart(
            {**BASE, "steps": "[10, 5]"},
            [("checkpoint", ("a.safetensors", ck)), ("checkpoint", ("b.safetensors", ck))],
        ),
        400,
        "steps must increase: send the checkpoints of a run in training order",
    ),
    (
        "a checkpoint that is a shell script",
        lambda ck: multipart(BASE, [("checkpoint", ("run.sh", b"#!/bin/sh\nrm -rf /\n"))]),
        422,
        "checkpoint 'run.sh' has an unsupported file type; expected one of .safetensors, .pth, .pt, .bin, .onnx, .zip, .tar",
    ),
    (
        "an image that is an executable",
        lambda ck: multipart(
            BASE, [("checkpoint", ("a.safetensors", ck)), ("images", ("x.exe", b"MZ\x90\x00"))]
        ),
        422,
        "image 'x.exe' has an unsupported file type; expected an image (.png, .jpg, .jpeg, .bmp, .webp, "
        ".tif, .tiff) or one archive (.zip, .tar, .tar.gz, .tgz)",
    ),
]


@pytest.mark.parametrize(
    ("request_of", "status", "detail"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_hostile_submission_is_refused(
    hostile: Stack, checkpoint: bytes, request_of: Request, status: int, detail: str
) -> None:
    before = audit_folders(hostile)
    with hostile.client() as http:
        response = http.post("/v1/audits", **request_of(checkpoint))
    assert response.status_code == status, response.text
    assert problem(response) == {
        "status": status,
        "title": problem(response)["title"],
        "detail": detail,
    }
    assert audit_folders(hostile) == before  # nothing half-stored
    assert_still_serving(hostile)


def test_content_length_over_the_limit_is_refused_before_reading(hostile: Stack) -> None:
    """A client that declares 3 GiB is answered 413 at once, without the server waiting for the body."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(hostile.url)
    declared = 3 * 1024**3
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/audits HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
            + f"Host: {url.netloc}\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n".encode()
            + b"--XyZ\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert json.loads(body) == {
        "status": 413,
        "title": "Upload too large",
        "detail": f"the request is {declared} bytes; the limit is {2 * 1024**3} bytes",
    }
    assert_still_serving(hostile)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/audits/..%2F..%2Fetc%2Fpasswd",
        "/v1/audits/%2e%2e",
        "/v1/audits/0123456789abcdef0123456789abcdef/artifacts/..%2Frequest.json",
        "/v1/audits/0123456789abcdef0123456789abcdef/artifacts/inputs",
    ],
)
def test_path_tricks_in_urls_are_404(hostile: Stack, path: str) -> None:
    with hostile.client() as http:
        response = http.get(path)
    assert response.status_code == 404, response.text
    assert problem(response)["title"] == "Not found"


def test_artifact_names_cannot_reach_the_inputs(hostile: Stack, checkpoint: bytes) -> None:
    with hostile.client() as http:
        created = http.post(
            "/v1/audits", data=BASE, files=[("checkpoint", ("a.safetensors", checkpoint))]
        ).json()
        for name in ("request.json", "inputs", ".request.json", "inputs%2Fcheckpoint.safetensors"):
            response = http.get(f"/v1/audits/{created['id']}/artifacts/{name}")
            assert response.status_code == 404, (name, response.text)
        assert http.delete(f"/v1/audits/{created['id']}").status_code == 204


def test_client_file_names_never_become_paths(hostile: Stack, tmp_path: Path) -> None:
    checkpoint = save_safetensors(
        tiny_vit(seed=7), tmp_path / "seven.safetensors"
    ).read_bytes()  # not cached
    evil_name = "../../../../" + str(tmp_path / "escaped.safetensors")
    with hostile.client() as http:
        response = http.post(
            "/v1/audits", data=BASE, files=[("checkpoint", (evil_name, checkpoint))]
        )
    assert response.status_code == 202, response.text
    assert not (tmp_path / "escaped.safetensors").exists()
    inputs = hostile.data_dir / "audits" / response.json()["id"] / "inputs"
    assert sorted(p.name for p in inputs.iterdir()) == ["checkpoint.safetensors"]
    assert hostile.wait_for_audit(response.json()["id"])["status"] == "finished"


# ------------------------------------------------------------- accepted, then failed by the worker


ZIP_BOMB = zip_of({"a.png": b"\0" * 20_000_000})
ZIP_BOMB_RATIO = 20_000_000 / zipfile.ZipFile(io.BytesIO(ZIP_BOMB)).getinfo("a.png").compress_size

FAILED: list[tuple[str, Callable[[bytes], list], str, str]] = [
    (
        "decompression bomb PNG (50k x 50k declared)",
        lambda ck: [("images", ("bomb.png", decompression_bomb_png()))],
        "images_rejected",
        "image 'bomb.png' is a decompression bomb: Image size (2500000000 pixels) exceeds limit of 80000000 pixels, "
        "could be decompression bomb DOS attack.",
    ),
    (
        "PNG just over the pixel limit",
        lambda ck: [("images", ("big.png", decompression_bomb_png(7000, 7000)))],
        "images_rejected",
        "image 'big.png' is a decompression bomb: Image size (49000000 pixels) exceeds limit of 40000000 pixels, "
        "could be decompression bomb DOS attack.",
    ),
    (
        "zip bomb",
        lambda ck: [("images", ("photos.zip", ZIP_BOMB))],
        "images_rejected",
        f"the images archive inflates beyond its limits at 'a.png' (20000000 bytes, ratio {ZIP_BOMB_RATIO:.0f}); "
        "is it a zip bomb?",
    ),
    (
        "zip with ../ paths",
        lambda ck: [("images", ("photos.zip", zip_of({"../../evil.png": png_bytes()})))],
        "images_rejected",
        "the images archive has an unsafe path '../../evil.png'",
    ),
    (
        "zip with an absolute path",
        lambda ck: [("images", ("photos.zip", zip_of({"/etc/evil.png": png_bytes()})))],
        "images_rejected",
        "the images archive has an unsafe path '<path>'",  # /etc exists here: redacted
    ),
    (
        "tar with ../ paths",
        lambda ck: [("images", ("photos.tar", tar_of({"ok/../../evil.png": png_bytes()})))],
        "images_rejected",
        "the images archive has an unsafe path 'ok/../../evil.png'",
    ),
    (
        "too many images inside an archive",
        lambda ck: [
            (
                "images",
                (
                    "photos.zip",
                    zip_of({f"{i}.png": png_bytes(seed=i) for i in range(MAX_IMAGES + 2)}),
                ),
            )
        ],
        "images_rejected",
        f"too many images in the archive: the limit is {MAX_IMAGES}",
    ),
    (
        "zero images: an empty zip",
        lambda ck: [("images", ("photos.zip", zip_of({})))],
        "images_rejected",
        "no images found in the upload (an empty archive?)",
    ),
    (
        "zero images: a zip of text files",
        lambda ck: [("images", ("photos.zip", zip_of({"readme.txt": b"hi"})))],
        "images_rejected",
        "no images found in the upload (an empty archive?)",
    ),
    (
        "an archive that is not an archive",
        lambda ck: [("images", ("photos.tar", b"this is not a tar file" * 40))],
        "images_rejected",
        "the images archive 'photos.tar' is not a readable zip or tar",
    ),
    (
        "not an image",
        lambda ck: [("images", ("cat.png", b"<html>not a cat</html>"))],
        "images_rejected",
        "'cat.png' is not a readable image: its content is no known image format",
    ),
    (
        "a truncated PNG",
        lambda ck: [("images", ("cut.png", png_bytes(64, 64)[:300]))],
        "images_rejected",
        "'cut.png' is not a readable image: image file is truncated",
    ),
    (
        "a safetensors header that claims 2**60 bytes",
        lambda ck: [("checkpoint_override", struct.pack("<Q", 2**60) + b"{}")],
        "checkpoint_rejected",
        "the .safetensors file is corrupt or truncated: Error while deserializing header: header too large",
    ),
    (
        "ONNX with external data outside the upload",
        lambda ck: [("checkpoint_override_onnx", onnx_pointing_outside())],
        "checkpoint_rejected",
        "tensor 'w' points to external data '../../../etc/passwd', outside the upload; ",
    ),
]


def _files_of(checkpoint: bytes, extra: list) -> list:
    files = []
    overrides = dict(item for item in extra if item[0].startswith("checkpoint_override"))
    if "checkpoint_override" in overrides:
        files.append(("checkpoint", ("bad.safetensors", overrides["checkpoint_override"])))
    elif "checkpoint_override_onnx" in overrides:
        files.append(("checkpoint", ("model.onnx", overrides["checkpoint_override_onnx"])))
    else:
        files.append(("checkpoint", ("tiny.safetensors", checkpoint)))
    return files + [item for item in extra if not item[0].startswith("checkpoint_override")]


def test_hostile_files_fail_the_job_with_a_reason(hostile: Stack, checkpoint: bytes) -> None:
    """All worker-side cases are submitted first and then awaited: the worker takes them in turn."""
    submitted = []
    with hostile.client() as http:
        for name, extra_of, _, _ in FAILED:
            response = http.post(
                "/v1/audits", data=BASE, files=_files_of(checkpoint, extra_of(checkpoint))
            )
            assert response.status_code == 202, (name, response.text)
            submitted.append(response.json()["id"])
    for (name, _, code, detail), audit_id in zip(FAILED, submitted, strict=True):
        state = hostile.wait_for_audit(audit_id, timeout=120)
        assert state["status"] == "failed", (name, state)
        got = state["error"]["detail"]
        assert state["error"] == {"code": code, "detail": got} and got.startswith(detail), (
            name,
            state["error"],
        )
        with hostile.client() as http:
            report = http.get(f"/v1/audits/{audit_id}/report")
        assert (
            report.status_code == 409
            and problem(report)["detail"] == f"audit '{audit_id}' failed: {got}"
        )
    assert_still_serving(hostile)
    # The archive members with ../ paths were never written anywhere.
    assert not list(hostile.data_dir.rglob("evil.png"))


def test_nan_and_inf_weights_are_reported_not_a_crash(hostile: Stack) -> None:
    with hostile.client() as http:
        created = http.post(
            "/v1/audits",
            data=BASE,
            files=[("checkpoint", ("nan.safetensors", poisoned_checkpoint()))],
        )
    assert created.status_code == 202, created.text
    state = hostile.wait_for_audit(created.json()["id"], timeout=120)
    assert state["status"] == "finished", state
    with hostile.client() as http:
        report = http.get(created.json()["links"]["report"]).json()
    assert report["model"]["non_finite_parameters"] == ["pos_embed", "blocks.0.mlp.fc1.weight"]
    assert report["gradients"]["available"] is False
    assert report["gradients"]["reason"] == (
        "the checkpoint has NaN/Inf weights (pos_embed, blocks.0.mlp.fc1.weight); gradients would be meaningless"
    )
    assert_still_serving(hostile)
