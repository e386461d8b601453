import pytest

from onthejob.learn.consolidate import ConsolidateOptions, consolidate
from onthejob.learn.gate import GateConfig
from onthejob.learn.loop import TrainConfig
from onthejob.learn.opsd import OpsdConfig
from onthejob.model import tiny_model
from onthejob.model.adapters import verify
from onthejob.store import Store

PASSAGE = ("The Bluefin project ships on March 3 in Oslo. Its lead engineer is Ada Lind. "
           "The team chose Rust for the storage engine because of memory safety.")


def _store_with_sessions(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_tenant("acme")
    store.create_tenant("other")
    sessions = {}
    for name, verdict in (("up", "up"), ("down", "down"), ("unreviewed", None)):
        s = store.create_session("acme", title="Bluefin")
        store.add_message("acme", s.id, "user", f"Please remember this: {PASSAGE}")
        store.add_message("acme", s.id, "assistant", "I will remember it.")
        store.add_message("acme", s.id, "user", "Who leads Bluefin?")
        store.add_message("acme", s.id, "assistant", "Ada Lind leads it.")
        if verdict:
            store.set_review("acme", s.id, verdict, "good" if verdict == "up" else "wrong")
        sessions[name] = s.id
    return store, sessions


def _opts(**kw):
    base = dict(train=TrainConfig(steps=2, lr=1e-3, bf16=False),
                opsd=OpsdConfig(prompts_per_step=2, samples_per_prompt=1, max_new_tokens=4,
                                teacher_tokens=4, batch=8),
                visits=None,
                gate=GateConfig(min_gain=-1.0, max_kl=100, max_retention_drop=1.0,
                                max_earlier_drop=1.0))
    base.update(kw)
    return ConsolidateOptions(**base)


@pytest.mark.parametrize("method", ["opsd", "sft", "notes"])
def test_consolidate_promotes_only_approved_sessions_once(tmp_path, method):
    store, ids = _store_with_sessions(tmp_path)
    lm = tiny_model(seed=0)
    out = consolidate(store, lm, "acme", _opts(method=method), say=lambda s: None)
    assert out.status == "promoted", out.message
    assert out.sessions == [ids["up"]]
    verify(out.adapter.path)
    assert store.active_adapter("acme").id == out.adapter.id
    assert store.get_session("acme", ids["up"]).consolidated_adapter_id == out.adapter.id
    assert store.get_session("acme", ids["down"]).consolidated_adapter_id is None
    for key in ("gain", "kl_to_base", "retention_drop", "held_out", "tokens_student"):
        assert key in out.adapter.metrics
    # Idempotent: nothing left to learn; the run row says done.
    again = consolidate(store, lm, "acme", _opts(method=method), say=lambda s: None)
    assert again.status == "nothing"
    assert store.get_run(out.run_id).status == "done"


def test_gate_rejects_and_keeps_sessions_eligible(tmp_path):
    store, ids = _store_with_sessions(tmp_path)
    lm = tiny_model(seed=0)
    strict = GateConfig(min_gain=10.0)
    out = consolidate(store, lm, "acme", _opts(gate=strict), say=lambda s: None)
    assert out.status == "rejected" and "did not learn" in out.message
    assert store.active_adapter("acme") is None
    assert store.get_adapter(out.adapter.id).status == "rejected"
    assert [s.id for s in store.sessions_to_consolidate("acme")] == [ids["up"]]


def test_second_version_has_the_first_as_parent(tmp_path):
    store, ids = _store_with_sessions(tmp_path)
    lm = tiny_model(seed=0)
    first = consolidate(store, lm, "acme", _opts(), say=lambda s: None)
    s = store.create_session("acme", title="More")
    store.add_message("acme", s.id, "user", f"Also: {PASSAGE}")
    store.set_review("acme", s.id, "up", "")
    plan = consolidate(store, lm, "acme", _opts(dry_run=True), say=lambda s: None)
    assert "s/step measured by run" in plan.message  # estimated from the first run's pace
    second = consolidate(store, lm, "acme", _opts(), say=lambda s: None)
    assert second.adapter.parent_id == first.adapter.id and second.adapter.version == 2
    assert "earlier_drop" in second.adapter.metrics


def test_dry_run_trains_nothing_and_foreign_sessions_are_refused(tmp_path):
    store, ids = _store_with_sessions(tmp_path)
    lm = tiny_model(seed=0)
    plan = consolidate(store, lm, "acme", _opts(dry_run=True), say=lambda s: None)
    assert plan.status == "planned" and store.list_adapters("tenant", "acme") == []
    assert "no earlier run" in plan.message
    with pytest.raises(ValueError, match="not eligible"):
        consolidate(store, lm, "other", _opts(session_ids=[ids["up"]]), say=lambda s: None)
    with pytest.raises(ValueError, match="not eligible"):
        consolidate(store, lm, "acme", _opts(session_ids=[ids["down"]]), say=lambda s: None)


def test_default_steps_give_each_probe_its_visits_and_the_cli_uses_the_recipe(tmp_path):
    from onthejob.cli import build_parser
    from onthejob.learn.cli import _options
    from onthejob.learn.consolidate import MAX_AUTO_STEPS, VISITS, recommended_opsd
    from onthejob.learn.opsd import steps_for_visits

    store, ids = _store_with_sessions(tmp_path)
    s2 = store.create_session("acme", title="more")
    store.add_message("acme", s2.id, "user", f"Also remember: {PASSAGE}")
    store.add_message("acme", s2.id, "assistant", "Noted.")
    store.set_review("acme", s2.id, "up", "")
    lm = tiny_model(seed=0)
    lines = []
    plan = consolidate(store, lm, "acme", _opts(dry_run=True, visits=5), say=lines.append)
    n_probes = int(next(x for x in lines if x.startswith("probes:")).split()[1])
    cfg = _opts().opsd
    want = steps_for_visits(n_probes, 5, cfg)
    assert n_probes > 0 and want == -(-n_probes * 5 // (cfg.prompts_per_step - 0))
    assert plan.message.startswith(f"plan: {want} steps") and len(plan.sessions) == 2
    plan = consolidate(store, lm, "acme", _opts(dry_run=True, visits=10_000), say=lambda s: None)
    assert plan.message.startswith(f"plan: {MAX_AUTO_STEPS} steps")
    args = build_parser().parse_args(["consolidate", "--tenant", "acme"])
    opts = _options(args)
    assert opts.visits == VISITS and opts.opsd == recommended_opsd()
    assert opts.opsd.anchor_target == "base" and opts.opsd.divergence == "forward_kl"
    fixed = _options(build_parser().parse_args(["consolidate", "--tenant", "acme", "--steps", "7"]))
    assert fixed.visits is None and fixed.train.steps == 7


def test_gate_reuses_known_reading_scores(tmp_path, monkeypatch):
    """The parent's reading comes from its own gate metrics; the bare base's is cached beside
    the models, keyed by its weight files, and invalidated when they change."""
    from types import SimpleNamespace

    from onthejob.learn import consolidate as c

    monkeypatch.setenv("ONTHEJOB_MODELS", str(tmp_path / "models"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    lm = SimpleNamespace(path=str(folder))
    assert c._known_reading(None, [], lm) is None
    c._remember_base_reading(None, [], lm, 0.42)
    assert c._known_reading(None, [], lm) == 0.42
    assert c._known_reading(None, ["shared"], lm) is None  # a shared adapter below: measure
    parent = SimpleNamespace(metrics={"reading_after": 0.3})
    assert c._known_reading(parent, [], lm) == 0.3
    assert c._known_reading(SimpleNamespace(metrics={}), [], lm) is None
    (folder / "model.safetensors").write_bytes(b"yy")  # new weights: the cache no longer applies
    assert c._known_reading(None, [], lm) is None
    assert c._known_reading(None, [], SimpleNamespace(path="in-memory")) is None


def test_lessons_hold_back_a_phrasing_training_never_sees(tmp_path):
    from onthejob.learn.consolidate import lesson_from

    lm = tiny_model(seed=0)
    context = [{"role": "user", "content": f"Please remember this: {PASSAGE}"},
               {"role": "assistant", "content": "I will remember it."}]
    lesson = lesson_from(lm, "s1", context, held_out_share=0.25)
    assert lesson.held_out and lesson.probes
    assert not set(lesson.held_out) & set(lesson.probes)
    assert {p.text for p in lesson.practice} == set(lesson.held_out) | set(lesson.probes)
    assert lesson_from(lm, "s1", context, held_out_share=0.0).held_out == []
