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


TAUGHT_ANSWER = "Ada Lind"


@pytest.fixture(scope="session")
def taught_dir(tmp_path_factory) -> str:
    """The tiny model, fine-tuned for a few seconds to answer any question with "Ada Lind"
    about 7 times in 10 (so that is its greedy answer) and "I do not know" otherwise, with or
    without a session in context; saved as a model directory. Small enough for tests, it still
    passes the dream gate on a task whose answer is Ada Lind (the teacher solves it, the
    student's samples differ) and fails it on the others: the real writer and gate have
    something to pass."""
    import random

    import torch

    from onthejob.learn.evaluate import ANSWER_HINT
    from onthejob.model import render_ids, tiny_model

    lm = tiny_model(seed=0)
    tok = lm.tokenizer
    context = [{"role": "user", "content": "Notes: the meeting moved to Tuesday. Bring slides."},
               {"role": "assistant", "content": "Noted."}]
    rows = []
    for question in ("Who leads it?", "What is this?", "Where does it ship?", "When is it?"):
        for chat in ([], context):
            prompt = render_ids(tok, [*chat, {"role": "user", "content": question + ANSWER_HINT}])
            for answer, weight in ((TAUGHT_ANSWER, 7), ("I do not know", 3)):
                rows += [(prompt, tok.encode(answer + "<|im_end|>", add_special_tokens=False))
                         ] * weight
    torch.manual_seed(0)
    rng = random.Random(0)
    optimizer = torch.optim.Adam(lm.model.parameters(), lr=1e-2)
    lm.model.train()
    for _ in range(60):
        loss = torch.zeros(())
        for prompt, answer in rng.sample(rows, 8):
            hidden = lm.model.model(torch.tensor([prompt + answer])).last_hidden_state
            logits = lm.model.lm_head(hidden[0, len(prompt) - 1:-1])
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(answer)) / 8
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.model.eval()
    path = tmp_path_factory.mktemp("taught-model")
    lm.model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
