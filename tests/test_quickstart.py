"""The README's quick start, run as a newcomer runs it: its own commands, in its own order.

The commands are read from README.rst's "Quick start" literal blocks (docutils), so the README
cannot drift from what works. They run as real processes in a fresh directory that holds a
``.venv`` link to this venv: armsproxy (twistd) and the simulated device in the background,
then the Python example and the operator's command line. Every output the README shows must
appear in what the processes printed (numbers and fingerprints differ from run to run and are
compared as placeholders). The README's ports are used when they are free, free ones otherwise.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import docutils.core
import docutils.nodes

ROOT = Path(__file__).parent.parent
README = ROOT / "README.rst"
#: The ports of the embedded default the quick start relies on, and twistd's options for them.
PORT_OPTIONS = {8443: "--port", 8790: "--rs-port", 8780: "--rs-gate-port",
                8781: "--management-port"}
DEVICE_PORT = 10443
#: Commands the quick start shows that this test does not run (it runs inside their result).
SETUP_STEPS = ("python3 -m venv", ".venv/bin/pip install", ".venv/bin/python -m pytest")


@dataclass
class QuickStart:
    """The quick start's blocks, sorted: shell commands, the Python example, shown outputs."""

    commands: list[str] = field(default_factory=list)  # one logical line each, in order
    python: str = ""
    outputs: list[list[str]] = field(default_factory=list)


def quick_start() -> QuickStart:
    doctree = docutils.core.publish_doctree(README.read_text(),
                                            settings_overrides={"report_level": 5})
    section = next(s for s in doctree.findall(docutils.nodes.section)
                   if s[0].astext() == "Quick start")
    found = QuickStart()
    for block in section.findall(docutils.nodes.literal_block):
        text = block.astext()
        if text.startswith("import "):
            assert not found.python, "one Python example"
            found.python = text
            continue
        lines = text.replace("\\\n", " ").splitlines()
        if all(line.startswith((".venv/bin/", "python3 ", "curl ")) for line in lines):
            found.commands += [" ".join(line.split()) for line in lines]
        else:
            found.outputs.append(lines)
    return found


def test_readme_quick_start_has_the_round_trip():
    qs = quick_start()
    run = [c for c in qs.commands if "twistd -n armsproxy" in c]
    assert len(run) == 1 and run[0].startswith("python3 -m venv .venv && ")
    assert any(" serve " in c and "armsproxy-sasim" in c for c in qs.commands)
    assert "request_id" in qs.python and "uuid" in qs.python
    assert '.get("result")' in qs.python  # every final state printed, never a KeyError
    assert len(qs.outputs) >= 4


# -- running it ------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_map() -> dict[int, int]:
    """The README's ports if all are free, else a free port for each."""
    ports = [*PORT_OPTIONS, DEVICE_PORT]
    if all(_port_free(p) for p in ports):
        return {p: p for p in ports}
    return {p: _free_port() for p in ports}


def _substitute(text: str, ports: dict[int, int]) -> str:
    for old, new in ports.items():
        text = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), text)
    return text


class Background:
    """A process whose output is collected by a thread, so that it can be waited for."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output, re.M):
                return
            assert self.proc.poll() is None, f"{self.argv[0]} exited:\n{self.output}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} from {self.argv[0]} within {timeout} s:\n"
                             f"{self.output}")

    def terminate(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def _normalized(line: str) -> str:
    """Numbers (ids, times) and fingerprints vary between runs; so do table column widths."""
    line = re.sub(r"\b[0-9a-f]{16,}\b", "<hex>", line)
    line = re.sub(r"\d+(\.\d+)?", "<n>", line)
    line = re.sub(r"<n>(-<n>)+T<n>(:<n>)+Z", "<time>", line)
    return " ".join(line.split())


def _wait_listening(port: int, proc: Background, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, f"armsproxy exited:\n{proc.output}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout} s:\n{proc.output}")


def test_quick_start_round_trip(tmp_path):
    qs = quick_start()
    ports = _port_map()
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    # With an editable install the twistd plugin (twisted/plugins/) is found through the
    # checkout on the path; `pip install .` (the README's) puts it in site-packages instead.
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    printed: list[str] = []  # everything the quick start's processes printed
    background: list[Background] = []
    started = time.monotonic()
    try:
        for command in qs.commands:
            step = command.split(" && ")[-1]
            if step.startswith(SETUP_STEPS):
                continue
            argv = shlex.split(_substitute(step, ports))
            if "twistd" in argv[0]:
                assert argv[1:] == ["-n", "armsproxy"], "the embedded default, as it is"
                for port, option in PORT_OPTIONS.items():
                    if ports[port] != port:
                        argv += [option, str(ports[port])]
                proxy = Background(argv, tmp_path, env)
                background.append(proxy)
                _wait_listening(ports[8443], proxy, 30)
                _wait_listening(ports[8780], proxy, 30)
            elif "armsproxy-sasim" in argv[0]:
                assert argv[1] == "serve"
                if ports[DEVICE_PORT] != DEVICE_PORT:
                    argv += ["--listen", f"127.0.0.1:{ports[DEVICE_PORT]}"]
                device = Background(argv, tmp_path, env)
                background.append(device)
                device.wait_for(r"^serving: https-simple on ", 30)
                # The device confirmed: now the RS's part, the Python example.
                example = subprocess.run(
                    [str(tmp_path / ".venv/bin/python"), "-c", _substitute(qs.python, ports)],
                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
                assert example.returncode == 0, example.stdout + example.stderr
                assert example.stdout.startswith("succeeded:\n"), example.stdout
                assert "'status_reports': [{'data': 'id=1: get_status_cb() result'" in \
                    example.stdout
                printed.append(example.stdout)
                device.wait_for(r"^done: read-status-done .* -> 100 \(success\)$", 15)
            elif argv[0] == "curl":
                with urllib.request.urlopen(argv[-1], timeout=10) as answer:
                    assert answer.status == 200
                    assert b"armsproxy_sa_gate_requests_total" in answer.read()
            else:
                assert argv[0].startswith(".venv/bin/armsproxy"), f"unknown step {step!r}"
                done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True,
                                      text=True, timeout=30)
                assert done.returncode == 0, f"{step}\n{done.stdout}{done.stderr}"
                printed.append(done.stdout)
        assert len(background) == 2, "armsproxy and the device ran"
    finally:
        codes = [proc.terminate() for proc in reversed(background)]  # device first
    device_code, proxy_code = codes
    printed += [proc.output for proc in background]
    assert device_code == 0, background[1].output
    assert background[1].lines[-1] == "stopped"
    # twistd re-raises the signal after its orderly shutdown.
    assert proxy_code in (0, -signal.SIGTERM), background[0].output
    assert "Traceback" not in background[0].output, background[0].output

    seen = {_normalized(line) for text in printed for line in text.splitlines()}
    for shown in qs.outputs:
        for line in shown:
            assert _normalized(_substitute(line, ports)) in seen, (
                f"the README shows {line!r}, the quick start printed:\n" + "\n".join(printed))
    assert time.monotonic() - started < 40
