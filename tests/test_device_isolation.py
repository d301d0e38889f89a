"""The simulated device shares no code with the proxy, and the proxy none with it.

A proxy bug that the device shared would pass every end-to-end test, so the device may import
only itself and third-party libraries; the proxy and the operator's CLI must not lean on the
test device either. Checked on the source (every import statement, also inside functions).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import armsproxy

PACKAGE = Path(armsproxy.__file__).parent
DEVICE = PACKAGE / "device"


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`."""
    package = ".".join(path.relative_to(PACKAGE.parent).parent.parts)  # what "." names
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name


def _own(name: str) -> bool:
    return name == "armsproxy" or name.startswith("armsproxy.")


def _in_device(name: str) -> bool:
    return name == "armsproxy.device" or name.startswith("armsproxy.device.")


def test_the_device_imports_nothing_of_the_proxy():
    files = sorted(DEVICE.rglob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "client.py", "listener.py", "tunnel.py",
                                       "serve.py"}
    offending = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
                 for path in files for line, name in _imports(path)
                 if _own(name) and not _in_device(name)]
    assert offending == []


def test_neither_the_proxy_nor_the_operators_cli_imports_the_device():
    offending = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
                 for path in sorted(PACKAGE.rglob("*.py")) if DEVICE not in path.parents
                 for line, name in _imports(path) if _in_device(name)]
    assert offending == []


def test_relative_imports_are_resolved():
    # The check above would miss `from .. import tap` if relative imports were misread.
    lines = dict((name, line) for line, name in _imports(DEVICE / "tunnel.py"))
    assert "armsproxy.device.client" in lines and "armsproxy.device.listener" in lines
    assert set(dict(_imports(DEVICE / "__init__.py")).values()) >= {
        "armsproxy.device.client", "armsproxy.device.serve"}


def test_the_public_face_is_what_tests_and_benches_import():
    import armsproxy.device as device

    for name in device.__all__:
        assert getattr(device, name) is not None, name
    for path in sorted((PACKAGE.parent / "bench").glob("*.py")):
        for _, name in _imports_anywhere(path):
            assert not name.startswith("armsproxy.device."), f"{path.name}: import {name}"


def _imports_anywhere(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
