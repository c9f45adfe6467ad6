"""The committed contract is what the app serves, and the service never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_openapi_yaml_matches_the_app() -> None:
    from service.openapi import app_schema

    committed = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert committed == app_schema(), "openapi.yaml is stale: run `python -m service.openapi`"


def test_submit_declares_its_multipart_body() -> None:
    committed = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    body = committed["paths"]["/v1/audits"]["post"]["requestBody"]["content"][
        "multipart/form-data"
    ]["schema"]
    # The checkpoint comes as a file, or as the sha256 of one the service holds (checkpoint_sha256).
    # arch too may be left out: a transformers checkpoint's config names the model.
    assert "required" not in body
    assert body["properties"]["config"]["format"] == "binary"
    assert body["properties"]["checkpoint_sha256"]["type"] == "string"
    assert body["properties"]["checkpoint"]["items"]["format"] == "binary"


def test_the_service_never_imports_torch() -> None:
    code = "import sys, service.app, service.cli, service.client; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


def test_architecture_list_matches_installed_timm() -> None:
    import timm

    from service.architectures import supported_architectures

    assert supported_architectures() == frozenset(
        timm.list_models(module=["vision_transformer", "deit"])
    )
