"""Demo RS: a small, real RS for trying armsproxy without an operator backend.

``twistd -n armsproxy`` without a config runs it in-process; ``armsproxy-demo-rs`` manages its
SQLite database and can serve it on its own.
"""

from __future__ import annotations

from armsproxy.demo_rs.db import DemoDB
from armsproxy.demo_rs.server import DemoRS, make_demo_rs_site

__all__ = ["DemoDB", "DemoRS", "make_demo_rs_site"]
