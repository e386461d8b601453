"""Shared fixtures: a tiny random model with the real tokenizer, and a private ONTHEJOB_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The converted default model is shared across runs; everything else goes to a temporary home.
os.environ.setdefault("ONTHEJOB_MODELS", str(Path.home() / ".cache" / "onthejob" / "models"))


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



@pytest.fixture
def register_env():
    """`register_env(name, factory)` registers an environment for one test (the name must be
    new); every name it registered is removed from the global registry afterwards."""
    from onthejob.envs import registry

    added: list[str] = []

    def add(name: str, factory) -> None:
        assert name not in registry.list_envs(), f"{name!r} is registered already"
        registry.register(name, factory)
        added.append(name)

    yield add
    for name in added:
        registry.unregister(name)
