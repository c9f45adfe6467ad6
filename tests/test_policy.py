"""The policy gate, pure: parsing, verdicts, baselines, report diffs, JUnit and Markdown."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from service.policy import (
    PolicyError,
    diff_reports,
    evaluate,
    lookup,
    parse_policy,
    to_junit,
    to_markdown,
)

REPORT = {
    "schema_version": 1,
    "position_embedding": {"grid_structure_score": 0.72, "decodability_r2": 0.9, "kind": "learned"},
    "heads": {
        "counts": {"global": 3, "local": 1},
        "layers": [
            {"layer": 0, "heads": [{"head": 0, "entropy": 1.5}, {"head": 1, "entropy": 2.5}]}
        ],
    },
    "gradients": {"available": False, "reason": "not requested in options.analyses"},
    "timings": {"total": 3.2},
}

POLICY = """
[[rule]]
path = "position_embedding.grid_structure_score"
min = 0.6

[[rule]]
path = "heads.counts.global"
min = 2
max = 10

[[rule]]
name = "entropy of layer 0 head 1"
path = "heads.layers.0.heads.1.entropy"
max = 2.0
"""


def verdicts(evaluation: dict) -> list[str]:
    return [r["verdict"] for r in evaluation["rules"]]


def test_rules_are_parsed_with_their_bounds() -> None:
    rules = parse_policy(POLICY)
    assert [(r.index, r.path, r.bounds()) for r in rules] == [
        (1, "position_embedding.grid_structure_score", {"min": 0.6}),
        (2, "heads.counts.global", {"min": 2.0, "max": 10.0}),
        (3, "heads.layers.0.heads.1.entropy", {"max": 2.0}),
    ]
    assert rules[2].label == "entropy of layer 0 head 1"


def test_thresholds_pass_and_fail_on_the_report_values() -> None:
    evaluation = evaluate(parse_policy(POLICY), REPORT)
    assert verdicts(evaluation) == ["pass", "pass", "fail"]
    assert (
        evaluation["passed"] is False and evaluation["failures"] == 1 and evaluation["errors"] == 0
    )
    failed = evaluation["rules"][2]
    assert failed["value"] == 2.5 and failed["max"] == 2.0
    assert failed["message"] == "heads.layers.0.heads.1.entropy: 2.5 > max 2"
    assert (
        evaluation["rules"][0]["message"]
        == "position_embedding.grid_structure_score: 0.72 >= min 0.6"
    )


def test_a_value_on_the_threshold_passes() -> None:
    evaluation = evaluate(
        parse_policy('[[rule]]\npath = "heads.counts.global"\nmin = 3\nmax = 3'), REPORT
    )
    assert evaluation["passed"] is True


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("position_embedding.grid_score", "no 'grid_score' under position_embedding"),
        ("heads.layers.5.heads.0.entropy", "no '5' under heads.layers"),
        ("position_embedding.kind", "is a str, not a number"),
        ("heads.counts", "is a dict, not a number"),
        ("gradients.formula_check.min_cosine_q", "that section is not available: not requested"),
    ],
)
def test_unknown_or_non_numeric_paths_are_errors_not_passes(path: str, reason: str) -> None:
    evaluation = evaluate(parse_policy(f'[[rule]]\npath = "{path}"\nmin = -1e9'), REPORT)
    (rule,) = evaluation["rules"]
    assert rule["verdict"] == "error" and rule["value"] is None
    assert reason in rule["message"]
    assert evaluation["passed"] is False and evaluation["errors"] == 1


def test_booleans_are_not_numbers() -> None:
    with pytest.raises(KeyError, match="is a bool, not a number"):
        lookup({"a": {"b": True}}, "a.b")


def test_baseline_drop_beyond_max_drop_fails_and_within_passes() -> None:
    rules = parse_policy('[[rule]]\npath = "position_embedding.decodability_r2"\nmax_drop = 0.05')
    worse = {"position_embedding": {"decodability_r2": 0.8}}
    slightly = {"position_embedding": {"decodability_r2": 0.87}}
    regression = evaluate(rules, worse, baseline=REPORT)
    assert verdicts(regression) == ["fail"]
    assert regression["rules"][0]["baseline"] == 0.9
    assert regression["rules"][0]["change"] == pytest.approx(-0.1)
    assert (
        "dropped by 0.1 from baseline 0.9 (more than max_drop 0.05)"
        in regression["rules"][0]["message"]
    )
    assert verdicts(evaluate(rules, slightly, baseline=REPORT)) == ["pass"]
    improved = {"position_embedding": {"decodability_r2": 0.99}}
    assert verdicts(evaluate(rules, improved, baseline=REPORT)) == ["pass"]


def test_max_rise_bounds_an_increase() -> None:
    rules = parse_policy('[[rule]]\npath = "heads.counts.local"\nmax_rise = 1')
    assert verdicts(evaluate(rules, {"heads": {"counts": {"local": 3}}}, baseline=REPORT)) == [
        "fail"
    ]
    assert verdicts(evaluate(rules, {"heads": {"counts": {"local": 2}}}, baseline=REPORT)) == [
        "pass"
    ]


def test_a_relative_rule_without_baseline_is_an_error() -> None:
    rules = parse_policy('[[rule]]\npath = "position_embedding.decodability_r2"\nmax_drop = 0.05')
    (rule,) = evaluate(rules, REPORT)["rules"]
    assert rule["verdict"] == "error" and "none was given" in rule["message"]


def test_a_path_missing_from_the_baseline_is_an_error() -> None:
    rules = parse_policy('[[rule]]\npath = "heads.counts.global"\nmax_drop = 1')
    (rule,) = evaluate(rules, REPORT, baseline={"heads": {"counts": {}}})["rules"]
    assert rule["verdict"] == "error" and rule["message"].startswith(
        "baseline: 'heads.counts.global' is not in"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]]\npath = 'a'\nmin = ", "policy is not valid TOML"),
        ("", "the policy has no rules"),
        ("[rules]\npath = 'a'", "unknown top-level key(s) 'rules'"),
        ("[[rule]]\nmin = 1", "rule 1: 'path' is missing"),
        ("[[rule]]\npath = 'a.b'\nmin = 1\n[[rule]]\npath = 'c'", "rule 2 (c): no bound"),
        ("[[rule]]\npath = 'a'\nminimum = 1", "rule 1 (a): unknown key(s) 'minimum'"),
        (
            "[[rule]]\npath = 'a'\nmin = '0.5'",
            "rule 1 (a): 'min' must be a finite number, got '0.5'",
        ),
        ("[[rule]]\npath = 'a'\nmin = true", "rule 1 (a): 'min' must be a finite number, got True"),
        ("[[rule]]\npath = 'a'\nmin = nan", "rule 1 (a): 'min' must be a finite number"),
        ("[[rule]]\npath = 'a'\nmax_drop = -0.1", "rule 1 (a): 'max_drop' must be >= 0"),
        ("[[rule]]\npath = 'a'\nmin = 2\nmax = 1", "rule 1 (a): min 2.0 is above max 1.0"),
        ("[[rule]]\npath = 'a..b'\nmin = 1", "rule 1 (a..b): 'path' has an empty segment"),
    ],
)
def test_invalid_policies_say_which_rule_and_why(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy(text)
    assert message in str(raised.value)


def test_junit_has_one_testcase_per_rule_with_failures_and_errors() -> None:
    rules = parse_policy(POLICY + '\n[[rule]]\npath = "nope.nothing"\nmin = 0\n')
    root = ET.fromstring(to_junit(evaluate(rules, REPORT)))
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "position_embedding.grid_structure_score",
        "heads.counts.global",
        "entropy of layer 0 head 1",
        "nope.nothing",
    ]
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "1", "1")
    assert [(c.find("failure") is not None, c.find("error") is not None) for c in cases] == [
        (False, False),
        (False, False),
        (True, False),
        (False, True),
    ]
    assert cases[2].find("failure").get("message") == "heads.layers.0.heads.1.entropy: 2.5 > max 2"


def test_markdown_has_a_row_per_rule_and_plot_links() -> None:
    evaluation = evaluate(parse_policy(POLICY), REPORT)
    text = to_markdown(
        evaluation, audit_id="abc", plots={"posembed_similarity": "out/posembed_similarity.png"}
    )
    assert "**Policy violated**: 1 failed, 0 in error, of 3 rules." in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 3
    assert rows[2].startswith("| `entropy of layer 0 head 1` | 2.5 | - | <= 2 | **FAIL** |")
    assert "[posembed_similarity](out/posembed_similarity.png)" in text


def test_diff_lists_changes_beyond_tolerance_and_one_sided_fields() -> None:
    other = {
        **REPORT,
        "position_embedding": {
            "grid_structure_score": 0.7201,
            "decodability_r2": 0.7,
            "effective_dim": 4,
        },
        "timings": {"total": 99.0},
    }
    changes = diff_reports(REPORT, other, tolerance=0.001)
    assert [(c["path"], c["a"], c["b"]) for c in changes] == [
        ("position_embedding.decodability_r2", 0.9, 0.7),
        ("position_embedding.effective_dim", None, 4.0),
    ]
    assert changes[0]["change"] == pytest.approx(-0.2)
    assert [c["path"] for c in diff_reports(REPORT, other, tolerance=0.0)][:2] == [
        "position_embedding.decodability_r2",
        "position_embedding.effective_dim",
    ]
    assert (
        len(diff_reports(REPORT, other, tolerance=0.0)) == 3
    )  # grid score's 1e-4 change counts at 0
    assert diff_reports(REPORT, REPORT) == []
