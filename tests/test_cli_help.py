"""`vitaudit --help` and each subcommand's help say what the command does, its defaults, its
exit codes and the environment it reads."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from service.cli import build_parser

# Subcommands that end with a verdict say what each exit code means.
WITH_EXIT_CODES = {"audit", "diff", "demo", "up"}
# Subcommands that talk to or configure a service name the variables they read.
WITH_ENVIRONMENT = {"serve", "up", "worker", "cleanup", "audit", "demo"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_every_subcommand_has_a_summary_and_a_description() -> None:
    parser = build_parser()
    top = parser.format_help()
    for name, sub in _subcommands().items():
        assert name in top, f"`vitaudit --help` does not list {name}"
        assert sub.description and len(sub.description) > 40, f"{name} has no description"
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"


@pytest.mark.parametrize("name", sorted(WITH_EXIT_CODES))
def test_help_states_exit_codes(name: str) -> None:
    text = _subcommands()[name].format_help()
    assert "exit" in text.lower() and ("1" in text)


@pytest.mark.parametrize("name", sorted(WITH_ENVIRONMENT))
def test_help_names_the_environment(name: str) -> None:
    text = _subcommands()[name].format_help()
    assert "VITAUDIT_URL" in text or "REDIS_URL" in text


def test_help_shows_defaults_of_host_and_port() -> None:
    for name in ("serve", "up"):
        text = _subcommands()[name].format_help()
        assert "127.0.0.1" in text and "8000" in text, text


def test_audit_help_names_the_api_key_and_the_three_exit_codes() -> None:
    text = _subcommands()["audit"].format_help()
    assert "VITAUDIT_API_KEY" in text
    for code in ("0  the audit finished", "1  the policy is violated", "2  usage or service"):
        assert code in text


def test_the_installed_command_prints_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, check=True
    )
    for name in ("serve", "up", "worker", "cleanup", "audit", "diff", "demo"):
        assert name in result.stdout


def test_progress_lines_name_the_stage_only_when_it_differs_from_the_status() -> None:
    import io

    from service.client import ProgressPrinter

    stream = io.StringIO()
    printer = ProgressPrinter("audit x", stream)
    printer({"status": "started", "stage": "heads", "progress": 0.5})
    printer({"status": "finished", "stage": "finished", "progress": 1.0})
    assert stream.getvalue().splitlines() == [
        "audit x: started (heads) 50%",
        "audit x: finished 100%",
    ]
