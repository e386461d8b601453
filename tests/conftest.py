"""Shared fixtures: a tiny random model with the real tokenizer, and a private ONTHEJOB_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The converted default model is shared across runs; everything else goes to a temporary home.
os.environ.setdefault("ONTHEJOB_MODELS", str(Path.home() / ".cache" / "onthejob" / "models"))

# Tests that take real time are marked slow here, so that `make test-fast` (`-m "not slow"`)
# stays a quick loop: every test of these modules (processes killed and resumed, benchmark
# smokes, torchrun workers, a Ray cluster), and benchmark smokes elsewhere (`test_bench_*`).
# Single slow tests (the real default model) carry @pytest.mark.slow themselves.
SLOW_MODULES = frozenset({"test_faults.py", "test_bench_knowledge.py", "test_bench_load.py",
                          "test_ddp.py", "test_envs_ray.py"})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.path.name in SLOW_MODULES or name.startswith("test_bench_"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ONTHEJOB_DB", raising=False)


@pytest.fixture(scope="session")
def tiny_lm():
    from onthejob.model import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def real_lm():
    from onthejob.model import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """The tiny model saved as a Hugging Face directory, for commands that take --model PATH."""
    from onthejob.model import tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    lm = tiny_model(seed=0)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)
