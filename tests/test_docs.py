"""Docs are part of the feature: the README renders, and CI runs the README's own command."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import docutils.core
import docutils.nodes

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


# -- the RS contract: the README's lists are the code's ------------------------------------


def _rs_section() -> docutils.nodes.section:
    doctree = docutils.core.publish_doctree(README, settings_overrides={"report_level": 5})
    for section in doctree.findall(docutils.nodes.section):
        if section[0].astext() == "The RS interface":
            return section
    raise AssertionError("README has no 'The RS interface' section")


def _table(section: docutils.nodes.section, first_header: str) -> list[list[docutils.nodes.entry]]:
    """The body rows (lists of cells) of the table whose first column is ``first_header``."""
    for table in section.findall(docutils.nodes.table):
        head = next(table.findall(docutils.nodes.thead))
        if head.astext().split()[0] == first_header:
            body = next(table.findall(docutils.nodes.tbody))
            return [list(row.findall(docutils.nodes.entry)) for row in
                    body.findall(docutils.nodes.row)]
    raise AssertionError(f"no table headed {first_header!r}")


def _names(cell: docutils.nodes.Node) -> list[str]:
    """The ``literal`` names of a cell, in order (explanations in parentheses are text)."""
    return [lit.astext() for lit in cell.findall(docutils.nodes.literal)]


def test_readme_lists_every_event_member_the_code_declares():
    from armsproxy.push.outbox import EVENT_ENVELOPE, EVENT_MEMBERS

    documented = {}
    for kind_cell, always, sometimes in _table(_rs_section(), "kind"):
        kind = _names(kind_cell)[0] if _names(kind_cell) else "*"
        documented[kind] = (set(_names(always)), set(_names(sometimes)))
    assert documented.pop("*") == (set(EVENT_ENVELOPE), set())
    assert documented == {kind: (set(m.always), set(m.sometimes))
                          for kind, m in EVENT_MEMBERS.items()}


def test_readme_names_the_operations_that_emit_operation_started():
    from armsproxy.push.operations import OPERATIONS

    section = _rs_section()
    (paragraph,) = [p for p in section.findall(docutils.nodes.paragraph)
                    if p.astext().startswith("operation.started is emitted only by")]
    named = {name for name in _names(paragraph) if name in OPERATIONS}
    assert named == {name for name, spec in OPERATIONS.items() if spec.two_way}


def test_readme_lists_the_config_solicitation_members_the_code_reads():
    from armsproxy.sa_gate.rs_structs import CONFIG_SOLICITATION_MEMBERS

    rows = _table(_rs_section(), "member")
    documented = {_names(member)[0]: presence.astext() for member, presence, _ in rows}
    assert documented == {name: "required" if required else "optional"
                          for name, required in CONFIG_SOLICITATION_MEMBERS.items()}


class _Recording(Mapping):
    """A struct that notes which members are looked at, under their README names."""

    def __init__(self, data: dict, seen: set[str], prefix: str = "") -> None:
        self._data, self._seen, self._prefix = data, seen, prefix

    def _wrap(self, key: str, value: object) -> object:
        if isinstance(value, list):
            return [_Recording(v, self._seen, f"{self._prefix}{key}[].")
                    if isinstance(v, dict) else v for v in value]
        return value

    def __getitem__(self, key: str) -> object:
        self._seen.add(self._prefix + key)
        return self._wrap(key, self._data[key])

    def __contains__(self, key: object) -> bool:
        self._seen.add(f"{self._prefix}{key}")
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _full_answer() -> dict:
    return {
        "result_code": 100, "sa_certificate": "PEM", "sa_private_key": "PEM",
        "push_port": 10443, "push_timeout": 30,
        "heartbeats": [{"host": "192.0.2.9", "port": 10000, "passphrase": "s",
                        "interval": 60, "algorithms": ["md5"]}],
        "rs_push_server_addresses": ["192.0.2.10"],
        "modules": [{"id": 1, "version": "1.0", "install_order": 1, "location": "m"}],
        "md_configs": [{"id": 1, "content_type": "text/plain", "commit_order": 1,
                        "data": "hostname x\n"}],
        "proxy_urls": ["https://192.0.2.1/arms"],
    }


def _answer_without(name: str) -> dict:
    answer = _full_answer()
    if "[]." in name:
        outer, inner = name.split("[].")
        for item in answer[outer]:
            del item[inner]
    else:
        del answer[name]
    return answer


def _device_accepts(answer: Mapping) -> bool:
    """What the SA gate would do: read the RS struct, build and check the device's answer."""
    from armsproxy.arms.codec import UnsafeMessageError, serialise
    from armsproxy.arms.messages import ArmsResponse
    from armsproxy.sa_gate.rs_structs import (
        RSAnswerError,
        config_solicitation_body,
        result_code,
    )

    try:
        code = result_code(answer, "test")
        body = config_solicitation_body(answer, ["https://192.0.2.1/arms"])
        serialise(ArmsResponse(type="config-solicitation", result_code=code,
                               description="OK", body=body))
    except (RSAnswerError, UnsafeMessageError):
        return False
    return True


def test_config_solicitation_members_are_what_the_reader_reads_and_requires():
    from armsproxy.sa_gate.rs_structs import CONFIG_SOLICITATION_MEMBERS

    seen: set[str] = set()
    assert _device_accepts(_Recording(_full_answer(), seen))
    assert seen == set(CONFIG_SOLICITATION_MEMBERS)  # reads exactly the declared members
    for name, required in CONFIG_SOLICITATION_MEMBERS.items():
        assert _device_accepts(_answer_without(name)) is not required, name
