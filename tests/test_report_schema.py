"""The report contract (`workers.report_schema`): the shipped JSON Schema is the generated
one, changes need the right semver bump, reports validate, and `vitaudit diff` refuses to
compare across major versions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from service.policy import diff_reports
from tests.planted.reports import minimal_report
from workers.report_schema import (
    SCHEMA_VERSION,
    SHIPPED_SCHEMA,
    ReportInvalid,
    bump_is_enough,
    report_json_schema,
    required_bump,
    validate_report,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_schema_is_the_generated_one() -> None:
    shipped = json.loads((ROOT / SHIPPED_SCHEMA).read_text())
    generated = report_json_schema()
    needed = required_bump(shipped, generated)
    assert shipped == generated, (
        f"the report schema changed ({needed} change); raise SCHEMA_VERSION accordingly and "
        "run `make openapi` (it refuses a bump that is too small)"
    )
    assert shipped["version"] == SCHEMA_VERSION


def test_adding_a_field_is_minor_removing_or_retyping_one_is_major() -> None:
    old = report_json_schema()
    added = copy.deepcopy(old)
    added["$defs"]["HeadStats"]["properties"]["new_score"] = {"type": "number"}
    removed = copy.deepcopy(old)
    del removed["$defs"]["HeadStats"]["properties"]["entropy"]
    retyped = copy.deepcopy(old)
    retyped["$defs"]["ReportSettings"]["properties"]["seed"] = {"type": "string"}
    reworded = copy.deepcopy(old)
    reworded["$defs"]["HeadStats"]["properties"]["entropy"]["description"] = "other words"
    assert required_bump(old, added) == "minor"
    assert required_bump(old, removed) == "major"
    assert required_bump(old, retyped) == "major"
    assert required_bump(old, reworded) == "patch"
    assert required_bump(old, copy.deepcopy(old)) is None


def test_a_bump_must_reach_the_part_the_change_needs() -> None:
    assert bump_is_enough("2.0.0", "3.0.0", "major")
    assert not bump_is_enough("2.0.0", "2.1.0", "major")
    assert bump_is_enough("2.0.0", "2.1.0", "minor")
    assert not bump_is_enough("2.1.0", "2.1.1", "minor")
    assert bump_is_enough("2.1.0", "2.1.1", "patch")
    assert not bump_is_enough("2.1.0", "2.1.0", "patch")
    assert bump_is_enough("2.1.0", "2.1.0", None)


def test_a_minimal_report_validates_and_a_wrong_type_names_its_field() -> None:
    report = minimal_report()
    validate_report(report)
    report["settings"]["seed"] = "zero"
    with pytest.raises(ReportInvalid, match=r"\$\.settings\.seed"):
        validate_report(report)
    missing = minimal_report()
    del missing["heads"]
    with pytest.raises(ReportInvalid, match="heads"):
        validate_report(missing)


def test_diff_refuses_reports_of_different_major_versions() -> None:
    a = minimal_report()
    b = {**minimal_report(), "schema_version": "1.0"}
    with pytest.raises(ValueError, match="major version changes what fields mean"):
        diff_reports(a, b)
    assert diff_reports(a, {**a, "schema_version": "2.5.0"}) == []


def test_the_json_schema_alone_accepts_a_report_and_rejects_a_wrong_type() -> None:
    """The served schema works without msgspec: a CI job validates stored reports with any
    JSON Schema validator."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(report_json_schema())
    report = minimal_report()
    validator.validate(report)
    report["heads"] = {"available": True, "layers": [{"layer": 0, "heads": [{"head": "zero"}]}]}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(report)
