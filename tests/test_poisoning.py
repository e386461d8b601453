"""Poisoning: only thumbs-up sessions are learned, as reviewed at the moment of promotion. A
review turned thumbs-down while consolidation trains stops the promotion (the candidate is
rejected and the active adapter stays); a review can change until consolidation, not after."""

from __future__ import annotations

import pytest

from onthejob.learn.consolidate import ConsolidateOptions, _eligible, consolidate
from onthejob.learn.gate import GateConfig
from onthejob.learn.loop import TrainConfig
from onthejob.learn.opsd import OpsdConfig
from onthejob.model import tiny_model
from onthejob.store import Conflict, Store


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'p.db'}")
    s.create_tenant("acme")
    yield s
    s.close()


def _session(store, verdicts, content="The vault code is 7341."):
    s = store.create_session("acme", title="t")
    store.add_message("acme", s.id, "user", content)
    store.add_message("acme", s.id, "assistant", "Noted.")
    for verdict in verdicts:
        store.set_review("acme", s.id, verdict, "")
    return s.id


def test_only_sessions_whose_last_review_is_up_are_eligible(store):
    ids = {name: _session(store, verdicts) for name, verdicts in {
        "up": ["up"], "down": ["down"], "none": [], "up-then-down": ["up", "down"],
        "down-then-up": ["down", "up"]}.items()}
    eligible = {s.id for s in _eligible(store, "acme", ConsolidateOptions())}
    assert eligible == {ids["up"], ids["down-then-up"]}
    for name in ("down", "up-then-down", "none"):
        with pytest.raises(ValueError, match="not eligible"):
            _eligible(store, "acme", ConsolidateOptions(session_ids=[ids[name]]))


def test_promotion_is_refused_when_a_review_turned_down(store):
    sid = _session(store, ["up"])
    old = store.add_adapter("tenant", "acme", method="t", path="/old", checksum="a")
    store.activate_adapter(old.id)
    new = store.add_adapter("tenant", "acme", method="t", path="/new", checksum="b",
                            parent_id=old.id)
    store.set_review("acme", sid, "down", "that was wrong")
    with pytest.raises(Conflict, match="not approved"):
        store.promote_adapter(new.id, {"acme": [sid]})
    # One transaction: neither the activation nor the marking happened.
    assert store.active_adapter("acme").id == old.id
    assert store.get_adapter(new.id).status == "candidate"
    assert store.get_session("acme", sid).consolidated_adapter_id is None
    store.set_review("acme", sid, "up", "")
    assert store.promote_adapter(new.id, {"acme": [sid]}).status == "active"
    assert store.get_session("acme", sid).consolidated_adapter_id == new.id
    with pytest.raises(Conflict, match="no longer change"):
        store.set_review("acme", sid, "down", "too late")


def test_review_turned_down_during_training_is_not_promoted(store):
    sid = _session(store, ["up"])
    lm = tiny_model(seed=0)
    flipped = []

    def say(line: str) -> None:  # called as training starts: the user changes their mind
        if line.startswith("probes:") and not flipped:
            store.set_review("acme", sid, "down", "actually, that was wrong")
            flipped.append(line)

    opts = ConsolidateOptions(
        method="sft", train=TrainConfig(steps=1, lr=1e-3, bf16=False),
        opsd=OpsdConfig(prompts_per_step=2, samples_per_prompt=1, max_new_tokens=4),
        gate=GateConfig(min_gain=-1.0, max_kl=100, max_retention_drop=1.0, max_earlier_drop=1.0))
    out = consolidate(store, lm, "acme", opts, say=say)
    assert flipped
    assert out.status == "rejected" and "not approved" in out.message
    assert store.active_adapter("acme") is None
    assert store.get_adapter(out.adapter.id).status == "rejected"
    assert store.get_session("acme", sid).consolidated_adapter_id is None
    assert store.get_run(out.run_id).status == "done"
    assert consolidate(store, lm, "acme", opts, say=lambda s: None).status == "nothing"
