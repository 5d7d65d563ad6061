"""README.md stays true to the command and within its bounds.

Every option the argparse grammar gives `taskpool run`, `dispatch`, `results` and `report`
(taskpool/cli/options.py) must be named in README.md, so that a new option cannot be added
without its reference; the two set-up commands must be there; README stays a user's page
(under 20 KB), and the pages it links to exist.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from taskpool.cli.options import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_BYTES = 20 * 1024


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("taskpool's parser has no subcommands")


def option_strings(command: str) -> list[str]:
    parser = subcommands()[command]
    return sorted({option for action in parser._actions for option in action.option_strings})


def named_in_readme(option: str) -> bool:
    """`option` is named as README names options, in code (after a backtick) or in a
    synopsis (after a bracket), and as a word of its own: `-q` is not found in `ulimit -q`,
    nor `--resume` inside `--force-resume`."""
    pattern = rf"[`\[]{re.escape(option)}(?![\w-])"
    return re.search(pattern, README.read_text()) is not None


@pytest.mark.parametrize("command", ["run", "dispatch", "results", "report"])
def test_every_option_of_a_command_is_in_readme(command: str) -> None:
    options = option_strings(command)
    assert "--help" in options  # the grammar was read, not an empty list
    missing = [option for option in options if not named_in_readme(option)]
    assert missing == [], f"taskpool {command}: options missing from README.md: {missing}"


def test_every_command_is_in_readme() -> None:
    text = README.read_text()
    for command in subcommands():
        assert f"taskpool {command}" in text, command


def test_readme_keeps_the_two_set_up_commands() -> None:
    text = README.read_text()
    assert "make run" in text
    assert "make test" in text


def test_readme_is_under_20_kb() -> None:
    assert README.stat().st_size < README_MAX_BYTES


def test_readme_links_to_pages_that_exist() -> None:
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
    assert links, "README.md links to no page of the project"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
