"""A client generated from openapi.yaml by openapi-python-client (what a CI team would do)
drives one audit: submit, poll, a typed report, the artifacts route."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.planted.models import TINY_ARCH, TINY_OPTIONS, save_safetensors, tiny_vit

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
GENERATE_TIMEOUT_S = 120
AUDIT_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory):
    """The generated package, imported as `vitaudit_client` from a temporary folder."""
    folder = tmp_path_factory.mktemp("generated")
    generator = Path(sys.executable).with_name("openapi-python-client")
    subprocess.run(
        [str(generator), "generate", "--path", str(ROOT / "openapi.yaml"), "--meta", "none"]
        + ["--output-path", str(folder / "vitaudit_client")],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=GENERATE_TIMEOUT_S,
    )
    sys.path.insert(0, str(folder))
    try:
        import vitaudit_client

        yield vitaudit_client
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m.split(".")[0] == "vitaudit_client"]:
            del sys.modules[name]
        shutil.rmtree(folder, ignore_errors=True)


def test_generated_client_has_typed_report_models_and_the_artifacts_route(generated) -> None:
    from vitaudit_client.api.audits import v1_audits_audit_id_artifacts_name_artifact  # noqa: F401
    from vitaudit_client.models import HeadStats, PositionEmbedding, Report

    assert "grid_structure_score" in PositionEmbedding.__annotations__
    assert "label" in HeadStats.__annotations__ and "position_embedding" in Report.__annotations__


def test_one_audit_through_the_generated_client(generated, stack: Stack, tmp_path: Path) -> None:
    from vitaudit_client import Client
    from vitaudit_client.api.audits import (
        v1_audits_audit_id_artifacts_name_artifact,
        v1_audits_audit_id_report_report,
        v1_audits_audit_id_status,
        v1_audits_submit,
    )
    from vitaudit_client.models import Report, V1AuditsSubmitBody
    from vitaudit_client.types import File

    checkpoint = save_safetensors(tiny_vit(seed=5), tmp_path / "tiny.safetensors")
    client = Client(base_url=stack.url, timeout=60)
    with checkpoint.open("rb") as handle:
        body = V1AuditsSubmitBody(
            arch=TINY_ARCH,
            checkpoint=[File(payload=handle, file_name=checkpoint.name)],
            options=json.dumps(TINY_OPTIONS),
            cache="false",
        )
        created = v1_audits_submit.sync(client=client, body=body)
    audit_id = created.id
    deadline = time.monotonic() + AUDIT_TIMEOUT_S
    while (state := v1_audits_audit_id_status.sync(audit_id, client=client)).status not in (
        "finished",
        "failed",
    ):
        assert time.monotonic() < deadline, "the audit did not end"
        time.sleep(0.3)
    assert state.status == "finished", state
    report = v1_audits_audit_id_report_report.sync(audit_id, client=client)
    assert isinstance(report, Report)
    assert report.model.grid == [4, 4] and report.position_embedding.available is True
    assert isinstance(report.position_embedding.grid_structure_score, float)
    png = v1_audits_audit_id_artifacts_name_artifact.sync_detailed(
        audit_id, "pos_similarity_grid.png", client=client
    )
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
