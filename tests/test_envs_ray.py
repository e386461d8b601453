"""The Ray backend: the same rollouts as the process pool, and faults recorded as faults.

Connects to RAY_ADDRESS when set (.ci/run starts a head on loopback, with a token of its
own), else starts a local Ray with 2 CPUs for this module. Skipped only when ray cannot be
imported. Marked slow (tests/conftest.py): `make test-fast` leaves it out.
"""

from __future__ import annotations

import os
import sys

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: pip install ray==2.60.0")

from onthejob.envs.policies import Action, RandomPolicy, ScriptedPolicy  # noqa: E402
from onthejob.envs.replay import replay  # noqa: E402
from onthejob.envs.rollout import read_rollouts, run_group  # noqa: E402
from onthejob.envs.workers import RayBackend  # noqa: E402


class CrashPolicy:
    def act(self, observations: list[str]) -> list[Action]:
        os._exit(13)


@pytest.fixture(scope="module")
def backend():
    # Ray workers cannot import this test module: ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield RayBackend()
    ray.shutdown()


def test_ray_runs_the_same_rollouts_as_inline(backend):
    a = run_group("shop", 4, 6, RandomPolicy("shop", 2), backend=backend, max_steps=20,
                  run_id="ray1")
    b = run_group("shop", 4, 6, RandomPolicy("shop", 2), backend="inline", max_steps=20,
                  log=False)
    assert a.stats["backend"] == "ray" and a.stats["faults"] == 0
    assert [r.state_hashes for r in a.rollouts] == [r.state_hashes for r in b.rollouts]
    won = run_group("shop", 4, 4, ScriptedPolicy("shop"), backend=backend, log=False)
    assert [r.reward for r in won.rollouts] == [1.0] * 4
    assert all(replay(r).ok for r in read_rollouts("ray1"))


def test_ray_worker_crash_is_a_fault(backend):
    group = run_group("arith", 0, 2, CrashPolicy(), backend=backend, log=False)
    assert all(r.fault and r.reward is None for r in group.rollouts)
    assert group.trainable == []
