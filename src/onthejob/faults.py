"""Fault injection for the crash tests: named points in critical sections where a process can
be told to stop and wait, so that a test can SIGKILL it at exactly that point.

    ONTHEJOB_FAULT_PAUSE=candidate-registered onthejob consolidate ...

At the named point the process prints `fault-pause: <point> pid=<pid>` to stderr and sleeps
(ONTHEJOB_FAULT_PAUSE_S seconds, default 120) before going on. Unset, a point costs one
environment lookup. Imports nothing of ours.
"""

from __future__ import annotations

import os
import sys
import time

POINTS = {
    "checkpoint-saved": "a training step's checkpoint is written (every step; training goes on)",
    "dream-gated": "a dream's tasks are written and gated (its file saved); no training yet",
    "adapter-saved": "the candidate's files are written; the registry does not know them yet",
    "candidate-registered": "the candidate is registered; the old adapter is still active",
    "promoted": "the candidate is active and its sessions marked; the run is not yet 'done'",
}
# The points of consolidation's promotion, in order (consolidate and dream pass all three;
# grind passes adapter-saved and candidate-registered).
PROMOTION = ("adapter-saved", "candidate-registered", "promoted")


def point(name: str) -> None:
    """Pause here if ONTHEJOB_FAULT_PAUSE names this point."""
    if os.environ.get("ONTHEJOB_FAULT_PAUSE") != name:
        return
    print(f"fault-pause: {name} pid={os.getpid()}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("ONTHEJOB_FAULT_PAUSE_S", "120")))
