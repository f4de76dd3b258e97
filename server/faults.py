"""Failpoints: named places where a test can have this process killed with SIGKILL, to prove that a crash there
loses nothing acknowledged and leaves a consistent state (``tests/test_process_faults.py``).

``ALIGND_FAILPOINT`` names one or more points, comma-separated (e.g. ``promote:after-database``). Unset, as in every
deployment, :func:`failpoint` is one dictionary lookup. The points are listed in docs/operations.md.
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAILPOINT_ENV", "failpoint"]

FAILPOINT_ENV = "ALIGND_FAILPOINT"


def failpoint(name: str) -> None:
    """SIGKILL this process here if ``ALIGND_FAILPOINT`` names ``name`` (no cleanup, no flush: a crash)."""
    armed = os.environ.get(FAILPOINT_ENV)
    if armed and name in (part.strip() for part in armed.split(",")):
        os.kill(os.getpid(), signal.SIGKILL)
