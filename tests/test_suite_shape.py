"""The suite's shape: `make test-fast` (`-m "not slow"`) leaves out every test that takes real
time (tests/conftest.py: the slow modules and the benchmark smokes), and keeps the rest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import SLOW_MODULES

TESTS = Path(__file__).resolve().parent


def test_make_test_fast_leaves_out_the_slow_tests():
    assert SLOW_MODULES <= {p.name for p in TESTS.glob("test_*.py")}  # no stale names
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src") + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-m", "not slow", *sorted(SLOW_MODULES),
                           "test_learn_cli.py"], cwd=TESTS, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    kept = [line.split("/")[-1] for line in done.stdout.splitlines() if "::" in line]
    assert kept and all(node.startswith("test_learn_cli.py::") for node in kept), kept
    assert "test_learn_cli.py::test_bench_knowledge_smoke" not in kept
    assert "test_learn_cli.py::test_demo_runs_the_whole_loop_and_never_asks_what_it_trained_on" in kept
