"""The operator's schema explanations survive Twisted's test helpers being imported first.

Runs in a fresh interpreter: the failure depends on import order, which pytest's own
collection order would otherwise decide.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_explain_works_after_zope_declares_collections_abc():
    code = (
        "import twisted.internet.testing\n"  # declares an @implementer Sequence subclass
        "from armsproxy.arms import schema\n"
        "print(schema.explain(b'<arms-message><arms-request type=\"x\"/></arms-message>'))\n"
        "print(schema.explain(b'<arms-message/>'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("[")
    assert second != "[]"
