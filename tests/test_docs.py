"""Docs are part of the feature: the README renders, and CI runs the README's own command."""

from __future__ import annotations

import re
from pathlib import Path

import docutils.core

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.rst").read_text()


def _commands() -> list[str]:
    return re.findall(r"^    (python3 -m venv \.venv && .+)$", README, re.M)


def test_readme_renders_without_warnings():
    docutils.core.publish_doctree(README, settings_overrides={"halt_level": 2,
                                                              "report_level": 2})


def test_readme_has_exactly_the_two_setup_commands():
    commands = _commands()
    assert len(commands) == 2
    run, test = commands
    assert run.endswith("twistd -n armsproxy")
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test = _commands()[1]
    # .ci/run spells the same steps out one per line (plus lint); each must be there.
    for step in test.split(" && "):
        assert step in ci.replace("-q ", ""), step
