"""A transformers save_pretrained folder through the API and the CLI, as it is."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import Stack, audit_folders, problem

pytestmark = pytest.mark.e2e

transformers = pytest.importorskip("transformers")

SMALL_OPTIONS = {"num_images": 2, "batch_size": 2, "analyses": ["position_embedding", "heads"]}


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViTForImageClassification saved as transformers saves it."""
    import torch

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def test_the_cli_zips_a_folder_to_the_same_bytes_every_time(
    vit_folder: Path, tmp_path: Path
) -> None:
    """Fixed member order and timestamps: the same folder is the same checkpoint (sha256) to
    the service's content addressing, so an unchanged model is not uploaded again."""
    from service.folder_zip import zip_folder

    first = zip_folder(vit_folder, tmp_path / "a.zip").read_bytes()
    (vit_folder / "config.json").touch()  # a new mtime changes nothing
    assert zip_folder(vit_folder, tmp_path / "b.zip").read_bytes() == first
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        assert sorted(zf.namelist()) == ["config.json", "model.safetensors"]


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _post(stack: Stack, files: list, data: dict | None = None):
    with stack.client() as http:
        return http.post("/v1/audits", data=data or {}, files=files)


def test_zipped_folder_is_audited_without_an_arch(
    stack: Stack, vit_folder: Path, tmp_path: Path
) -> None:
    from service.folder_zip import zip_folder

    archive = zip_folder(vit_folder, tmp_path / "tiny-vit.zip")
    with archive.open("rb") as handle:
        response = _post(
            stack,
            [("checkpoint", ("tiny-vit.zip", handle))],
            {"options": json.dumps(SMALL_OPTIONS)},
        )
    assert response.status_code == 202, response.text
    state = stack.wait_for_audit(response.json()["id"])
    assert state["status"] == "finished", state
    assert state["arch"] == "vit_base_patch16_224"  # no timm name for this shape: the base, resized
    with stack.client() as http:
        report = http.get(f"/v1/audits/{state['id']}/report").json()
    model = report["model"]
    assert model["format"] == "transformers"
    assert model["model_type"] == "vit"
    assert model["arch"] == "vit_base_patch16_224"
    assert model["model_args"]["embed_dim"] == 32 and model["grid"] == [4, 4]
    assert model["num_classes"] == 3
    assert report["position_embedding"]["table_grid"] == [4, 4]


def test_safetensors_with_a_config_part_is_a_transformers_checkpoint(
    stack: Stack, vit_folder: Path
) -> None:
    files = [
        ("checkpoint", ("model.safetensors", (vit_folder / "model.safetensors").read_bytes())),
        ("config", ("config.json", (vit_folder / "config.json").read_bytes())),
    ]
    response = _post(
        stack, files, {"options": json.dumps({**SMALL_OPTIONS, "analyses": ["position_embedding"]})}
    )
    assert response.status_code == 202, response.text
    state = stack.wait_for_audit(response.json()["id"])
    assert state["status"] == "finished", state
    with stack.client() as http:
        report = http.get(f"/v1/audits/{state['id']}/report").json()
    assert report["model"]["format"] == "transformers" and report["model"]["model_type"] == "vit"


def test_a_config_sent_as_text_is_told_to_come_as_a_file(stack: Stack, vit_folder: Path) -> None:
    files = [("checkpoint", ("model.safetensors", (vit_folder / "model.safetensors").read_bytes()))]
    response = _post(stack, files, {"config": (vit_folder / "config.json").read_text()})
    assert response.status_code == 400
    assert (
        problem(response)["detail"] == "send 'config' as a file part (curl -F config=@config.json)"
    )


@pytest.mark.parametrize(
    ("members", "data", "status", "detail"),
    [
        (
            {"config.json": b'{"model_type": "swin"}', "model.safetensors": b"x"},
            {},
            422,
            "transformers checkpoint: model_type 'swin' is not a transformers model vitaudit can map "
            "to timm; supported model types: vit, deit, dinov2, dinov2_with_registers, "
            "clip_vision_model, clip",
        ),
        (
            {"../config.json": b'{"model_type": "vit"}'},
            {},
            422,
            "transformers checkpoint: the checkpoint archive has an unsafe path '../config.json'",
        ),
        (
            {"config.json": b'{"model_type": "vit"}'},
            {},
            422,
            "transformers checkpoint: the transformers folder has no weights: expected "
            "model.safetensors, model.safetensors.index.json with its shards, or pytorch_model.bin "
            "beside config.json",
        ),
        (
            {"config.json": b'{"model_type": "vit"}', "model.safetensors": b"x"},
            {"arch": "vit_small_patch16_224"},
            400,
            "arch 'vit_small_patch16_224' contradicts the checkpoint's config (vit, which maps to "
            "'vit_base_patch16_224'); leave 'arch' out for a transformers checkpoint",
        ),
    ],
    ids=["unsupported-model-type", "traversal", "no-weights", "contradicting-arch"],
)
def test_bad_transformers_folders_are_refused_at_submit(
    stack: Stack, tmp_path: Path, members: dict, data: dict, status: int, detail: str
) -> None:
    before = audit_folders(stack)
    archive = _zip(tmp_path / "folder.zip", members)
    response = _post(stack, [("checkpoint", ("folder.zip", archive.read_bytes()))], data)
    body = problem(response)
    assert response.status_code == status and body["status"] == status
    assert body["detail"] == detail
    assert audit_folders(stack) == before


def _cli_audit(stack: Stack, folder: Path, out: Path) -> subprocess.CompletedProcess:
    options = json.dumps({**SMALL_OPTIONS, "analyses": ["position_embedding"], "seed": 21})
    command = [
        "audit",
        f"{folder}/",
        "--out",
        str(out),
        "--server",
        stack.url,
        "--options",
        options,
    ]
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *command],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_zips_the_folder_as_it_is(stack: Stack, vit_folder: Path, tmp_path: Path) -> None:
    first = _cli_audit(stack, vit_folder, tmp_path / "first")
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    assert report["model"]["format"] == "transformers"
    # The same folder zips to the same bytes: the service knows the checkpoint by its sha256
    # and answers the identical request with the earlier audit.
    again = _cli_audit(stack, vit_folder, tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert "cached: an identical request was already answered" in again.stderr
    assert "checkpoint already on the service, not uploaded" in again.stderr
