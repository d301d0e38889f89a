"""``python -m armsproxy.device``: the same as ``armsproxy-sasim``."""

import sys

from .client import main

sys.exit(main())
