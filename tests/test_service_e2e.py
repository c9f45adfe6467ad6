"""The walking skeleton end to end: real HTTP server, real Redis, real worker process."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.planted.models import TINY_ARCH, TINY_ARGS, save_safetensors, tiny_vit

pytestmark = pytest.mark.e2e

SMALL_OPTIONS = {"num_images": 4, "batch_size": 2, "model_args": TINY_ARGS}

# The report contract of DESIGN.md: every report keeps these paths.
CONTRACT = [
    "schema_version",
    *(
        f"model.{k}"
        for k in (
            "arch",
            "grid",
            "patch_size",
            "num_prefix_tokens",
            "num_layers",
            "num_heads",
            "checkpoint_sha256",
            "format",
        )
    ),
    *(f"settings.{k}" for k in ("probe_set", "num_images", "batch_size", "seed", "labels_source")),
    *(
        f"position_embedding.{k}"
        for k in (
            "kind",
            "grid_structure_score",
            "decodability_r2",
            "similarity_distance_spearman",
            "neighbour_recall.k4",
            "neighbour_recall.k8",
            "neighbour_recall.k4_random",
            "neighbour_recall.k8_random",
            "row_col_anisotropy",
            "effective_dim",
        )
    ),
    "heads.layers",
    "heads.counts.local",
    "heads.counts.horizontal",
    "heads.counts.vertical",
    "heads.counts.global",
    "heads.counts.texture",
    "heads.counts.prefix",
    "heads.counts.mixed",
    "gradients.loss",
    "gradients.formula_check.min_cosine_q",
    "gradients.formula_check.min_cosine_k",
    *(
        f"gradients.sgd_step_check.{k}"
        for k in (
            "loss_before",
            "loss_after",
            "loss_change_real",
            "loss_change_predicted",
            "relative_error",
            "passed",
        )
    ),
    *(
        f"gradients.verdict.{k}"
        for k in ("story_holds", "margin", "margin_ci95", "undecided_reason")
    ),
    "gradients.layers",
    "gradients.position_embedding",
    "timings",
    *(f"versions.{k}" for k in ("vitaudit", "torch", "timm", "onnxruntime", "analysis_code")),
]
HEAD_FIELDS = (
    "head",
    "label",
    "mean_distance_px",
    "mean_distance_patches",
    "entropy",
    "local_mass",
    "horizontal",
    "vertical",
    "prefix_mass",
    "content_dependence",
    "texture_lift",
)


def missing_paths(report: dict, paths: list[str]) -> list[str]:
    missing = []
    for path in paths:
        node = report
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                missing.append(path)
                break
            node = node[key]
    return missing


def submit(
    stack: Stack,
    checkpoint: Path,
    *,
    arch: str = TINY_ARCH,
    options: dict | None = None,
    **fields: str,
):
    data = {
        "arch": arch,
        "options": json.dumps(options if options is not None else SMALL_OPTIONS),
        **fields,
    }
    with stack.client() as http, checkpoint.open("rb") as handle:
        return http.post("/v1/audits", data=data, files={"checkpoint": (checkpoint.name, handle)})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_safetensors(tiny_vit(), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_checkpoint_in_report_out(stack: Stack, tiny_checkpoint: Path) -> None:
    created = submit(stack, tiny_checkpoint)
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["status"] == "queued" and len(body["id"]) == 32
    assert body["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()

    state = stack.wait_for_audit(body["id"])
    assert state["status"] == "finished", state
    assert state["progress"] == 1.0 and state["error"] is None
    with stack.client() as http:
        report = http.get(body["links"]["report"]).json()
        artifacts = http.get(body["links"]["artifacts"]).json()["artifacts"]
        assert "report.json" in artifacts
        for name in artifacts:
            assert http.get(f"{body['links']['artifacts']}/{name}").status_code == 200
    assert report["schema_version"]
    # The report keeps the schema the service serves (checked by an independent validator).
    import jsonschema

    with stack.client() as http:
        served = http.get("/v1/schema/report")
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("application/schema+json")
    jsonschema.Draft202012Validator(served.json()).validate(report)
    model = report["model"]
    assert model["grid"] == [4, 4] and model["patch_size"] == 8 and model["num_layers"] == 2
    assert (
        model["num_heads"] == 2 and model["num_prefix_tokens"] == 1 and model["format"] == "torch"
    )
    assert model["checkpoint_sha256"] == body["checkpoint_sha256"]
    assert report["settings"]["probe_set"] == "natural-v1" and report["settings"]["num_images"] == 4
    assert report["settings"]["labels_source"] == "model_predictions"
    assert set(report["versions"]) >= {"torch", "timm", "onnxruntime", "vitaudit"}
    assert missing_paths(report, CONTRACT) == []
    heads = report["heads"]["layers"]
    assert [layer["layer"] for layer in heads] == [0, 1]
    assert all(set(HEAD_FIELDS) <= set(head) for layer in heads for head in layer["heads"])
    assert sum(report["heads"]["counts"].values()) == 4  # 2 layers x 2 heads, each labelled once
    assert report["gradients"]["formula_check"]["min_cosine_q"] > 0.999
    assert report["timings"]["total"] > 0
    assert {
        "pos_similarity.npy",
        "pos_similarity_grid.png",
        "head_distance_vs_depth.png",
        "gradient_logit_pressure.png",
    } <= set(artifacts)


def test_same_checkpoint_and_settings_give_the_same_numbers(
    stack: Stack, tiny_checkpoint: Path
) -> None:
    # cache=false: an identical request would otherwise be answered by the first audit.
    ids = [submit(stack, tiny_checkpoint, cache="false").json()["id"] for _ in range(2)]
    assert ids[0] != ids[1]
    reports = []
    with stack.client() as http:
        for audit_id in ids:
            assert stack.wait_for_audit(audit_id)["status"] == "finished"
            reports.append(http.get(f"/v1/audits/{audit_id}/report").json())
    for section in ("position_embedding", "heads", "gradients"):
        assert reports[0][section] == reports[1][section]


def test_state_dict_of_another_architecture_fails_with_the_keys_named(
    stack: Stack, tmp_path: Path
) -> None:
    other = save_safetensors(tiny_vit(depth=3), tmp_path / "deeper.safetensors")
    audit_id = submit(stack, other).json()["id"]
    state = stack.wait_for_audit(audit_id)
    assert state["status"] == "failed"
    assert state["error"]["code"] == "checkpoint_rejected"
    assert "unexpected keys: blocks.2." in state["error"]["detail"]
    with stack.client() as http:
        report = http.get(f"/v1/audits/{audit_id}/report")
    assert report.status_code == 409 and "failed" in report.json()["detail"]


def test_truncated_safetensors_fails_with_a_reason(
    stack: Stack, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    state = stack.wait_for_audit(submit(stack, broken).json()["id"])
    assert state["status"] == "failed"
    assert "corrupt or truncated" in state["error"]["detail"]


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_never_runs(stack: Stack, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"pos_embed": _RunsShell(marker)}))
    state = stack.wait_for_audit(submit(stack, evil).json()["id"])
    assert state["status"] == "failed" and state["error"]["code"] == "checkpoint_rejected"
    assert "weights_only" in state["error"]["detail"]
    assert "set to `False`" not in state["error"]["detail"]  # never advise turning the guard off
    assert not marker.exists()


def test_pth_state_dict_is_accepted(stack: Stack, tmp_path: Path) -> None:
    import torch

    path = tmp_path / "tiny.pth"
    torch.save({"model": tiny_vit(seed=1).state_dict()}, path)
    state = stack.wait_for_audit(submit(stack, path).json()["id"])
    assert state["status"] == "finished", state


def test_uploaded_images_and_labels_are_used(
    stack: Stack, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import numpy as np
    from PIL import Image

    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(
            np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)
        ).save(path)
        paths.append(path)
    data = {"arch": TINY_ARCH, "options": json.dumps(SMALL_OPTIONS), "labels": "[0, 1, 4]"}
    with stack.client() as http, tiny_checkpoint.open("rb") as handle:
        files = [("checkpoint", (tiny_checkpoint.name, handle))] + [
            ("images", (p.name, p.read_bytes())) for p in paths
        ]
        created = http.post("/v1/audits", data=data, files=files)
    assert created.status_code == 202, created.text
    state = stack.wait_for_audit(created.json()["id"])
    assert state["status"] == "finished", state
    with stack.client() as http:
        report = http.get(f"/v1/audits/{created.json()['id']}/report").json()
    assert report["settings"]["probe_set"] == "uploaded"
    assert report["settings"]["num_images"] == 3
    assert report["settings"]["labels_source"] == "given"


def test_labels_out_of_range_fail_with_a_reason(stack: Stack, tiny_checkpoint: Path) -> None:
    created = submit(
        stack, tiny_checkpoint, options={**SMALL_OPTIONS, "num_images": 2}, labels="[0, 9]"
    )
    state = stack.wait_for_audit(created.json()["id"])
    assert state["status"] == "failed"
    assert state["error"]["detail"] == "label 9 is out of range: the model has 5 classes (0..4)"


def test_delete_removes_the_audit_and_its_files(stack: Stack, tiny_checkpoint: Path) -> None:
    audit_id = submit(stack, tiny_checkpoint).json()["id"]
    stack.wait_for_audit(audit_id)
    with stack.client() as http:
        assert http.delete(f"/v1/audits/{audit_id}").status_code == 204
        assert http.get(f"/v1/audits/{audit_id}").status_code == 404
        assert http.get(f"/v1/audits/{audit_id}/report").status_code == 404
    assert not (stack.data_dir / "audits" / audit_id).exists()


def test_trajectory_audit_reports_numbers_per_step(stack: Stack, tmp_path: Path) -> None:
    paths = [
        save_safetensors(tiny_vit(seed=s), tmp_path / f"step{s}.safetensors") for s in range(3)
    ]
    options = {**SMALL_OPTIONS, "analyses": ["position_embedding", "heads"]}
    with stack.client() as http:
        files = [("checkpoint", (p.name, p.read_bytes())) for p in paths]
        data = {"arch": TINY_ARCH, "options": json.dumps(options), "steps": "[0, 10, 20]"}
        created = http.post("/v1/audits", data=data, files=files)
        assert created.status_code == 202, created.text
        audit_id = created.json()["id"]
        assert stack.wait_for_audit(audit_id)["status"] == "finished"
        report = http.get(f"/v1/audits/{audit_id}/report").json()
        step_report = http.get(f"/v1/audits/{audit_id}/artifacts/step-000010.json").json()
        bad = http.post("/v1/audits", data={**data, "steps": "[0, 20, 10]"}, files=files)
    trajectory = report["trajectory"]
    assert trajectory["steps"] == [0, 10, 20]
    scores = trajectory["headlines"]["grid_structure_score"]
    assert scores[1] == step_report["position_embedding"]["grid_structure_score"]
    assert report["model"]["training_step"] == 20
    assert (
        report["model"]["checkpoint_sha256"] == hashlib.sha256(paths[-1].read_bytes()).hexdigest()
    )
    assert bad.status_code == 400
    assert (
        bad.json()["detail"]
        == "steps must increase: send the checkpoints of a run in training order"
    )


def test_list_shows_recent_audits(stack: Stack, tiny_checkpoint: Path) -> None:
    audit_id = submit(stack, tiny_checkpoint).json()["id"]
    with stack.client() as http:
        listed = http.get("/v1/audits").json()
    assert audit_id in [a["id"] for a in listed]
    stack.wait_for_audit(audit_id)


def test_a_report_from_other_analysis_code_does_not_answer_an_identical_request(
    stack: Stack, tmp_path: Path
) -> None:
    """The worker stamps its analysis code into the report; the API reuses a finished
    report only when the stamp equals the code it recorded at submit. Another worker's
    report is simulated by rewriting the stamp in the store."""
    # A seed no other test uses: the stack and its checkpoint index are shared by the session.
    checkpoint = save_safetensors(tiny_vit(seed=41), tmp_path / "skew.safetensors")
    options = {**SMALL_OPTIONS, "analyses": ["position_embedding"], "seed": 41}
    first = submit(stack, checkpoint, options=options)
    assert first.status_code == 202, first.text
    audit_id = first.json()["id"]
    assert stack.wait_for_audit(audit_id)["status"] == "finished"
    folder = stack.data_dir / "audits" / audit_id
    request = json.loads((folder / "request.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    assert report["versions"]["analysis_code"] == request["analysis_code"]
    assert not any(note.startswith("analysis code differs") for note in report["notes"])

    again = submit(stack, checkpoint, options=options)
    assert (again.status_code, again.json()["id"], again.json()["cached"]) == (200, audit_id, True)

    report["versions"]["analysis_code"] = "0.1.0+0000000000000000"
    (folder / "report.json").write_text(json.dumps(report))
    third = submit(stack, checkpoint, options=options)
    assert third.status_code == 202, third.text
    assert third.json()["id"] != audit_id and third.json()["cached"] is False
    assert stack.wait_for_audit(third.json()["id"])["status"] == "finished"


def test_sign_in_is_not_needed_in_local_mode(stack: Stack) -> None:
    with stack.client() as http:
        response = http.get("/login", params={"next": "/v1/audits"})
        landing = http.get("/")
    assert (response.status_code, response.headers["location"]) == (303, "/v1/audits")
    assert landing.status_code == 200 and 'id="sign-out"' not in landing.text
