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
    # Estimated from the first run's measured pace, phase by phase.
    assert f"rates measured by run {first.run_id}" in plan.message and plan.metrics["estimate_s"] > 0
    second = consolidate(store, lm, "acme", _opts(), say=lambda s: None)
    assert second.adapter.parent_id == first.adapter.id and second.adapter.version == 2
    assert "earlier_drop" in second.adapter.metrics


def test_dry_run_trains_nothing_and_foreign_sessions_are_refused(tmp_path):
    store, ids = _store_with_sessions(tmp_path)
    lm = tiny_model(seed=0)
    plan = consolidate(store, lm, "acme", _opts(dry_run=True), say=lambda s: None)
    assert plan.status == "planned" and store.list_adapters("tenant", "acme") == []
    assert store.list_runs("consolidate") == []  # a plan starts no run
    # A fresh store: the rates are calibrated on this machine, and the plan says so.
    assert "calibrated just now" in plan.message and plan.metrics["estimate_s"] > 0
    work = plan.metrics["estimate"]["work"]
    assert work["sessions"] == 1 and work["context_tokens"] > 0 and work["probes"] > 0
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
    plan = consolidate(store, lm, "acme", _opts(dry_run=True, visits=5), say=lambda s: None)
    work = plan.metrics["estimate"]["work"]
    cfg = _opts().opsd
    want = steps_for_visits(work["probes"], 5, cfg)
    assert work["probes"] > 0 and want == -(-work["probes"] * 5 // (cfg.prompts_per_step - 0))
    assert work["steps"] == want and f"; {want} steps at lr" in plan.message
    assert len(plan.sessions) == 2
    plan = consolidate(store, lm, "acme", _opts(dry_run=True, visits=10_000), say=lambda s: None)
    assert plan.metrics["estimate"]["work"]["steps"] == MAX_AUTO_STEPS
    # The real run: the steps follow from the probes the model actually wrote.
    lines = []
    out = consolidate(store, lm, "acme", _opts(visits=5, train=TrainConfig(steps=1, bf16=False)),
                      say=lines.append)
    n_probes = int(next(x for x in lines if x.startswith("probes:")).split()[1])
    assert out.metrics["steps"] == steps_for_visits(n_probes, 5, cfg)
    args = build_parser().parse_args(["consolidate", "--tenant", "acme"])
    opts = _options(args)
    assert opts.visits == VISITS and opts.opsd == recommended_opsd()
    assert opts.opsd.anchor_target == "base" and opts.opsd.divergence == "forward_kl"
    fixed = _options(build_parser().parse_args(["consolidate", "--tenant", "acme", "--steps", "7"]))
    assert fixed.visits is None and fixed.train.steps == 7


def test_gate_reuses_known_reading_and_general_scores(tmp_path, monkeypatch):
    """The parent's reading and general scores come from its own gate metrics; the bare base's
    are cached beside the models, keyed by its weight files, and invalidated when they change."""
    from types import SimpleNamespace

    from onthejob.learn import consolidate as c

    monkeypatch.setenv("ONTHEJOB_MODELS", str(tmp_path / "models"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    lm = SimpleNamespace(path=str(folder))
    assert c._known_measures(None, [], lm) == {}
    c._remember_base_measures(None, [], lm, {"reading": 0.42, "general": 0.9})
    assert c._known_measures(None, [], lm) == {"reading": 0.42, "general": 0.9}
    assert c._known_measures(None, ["shared"], lm) == {}  # a shared adapter below: measure
    parent = SimpleNamespace(metrics={"reading_after": 0.3, "general_after": 0.8})
    assert c._known_measures(parent, [], lm) == {"reading": 0.3, "general": 0.8}
    assert c._known_measures(SimpleNamespace(metrics={}), [], lm) == {}
    (folder / "model.safetensors").write_bytes(b"yy")  # new weights: the cache no longer applies
    assert c._known_measures(None, [], lm) == {}
    assert c._known_measures(None, [], SimpleNamespace(path="in-memory")) == {}


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


def test_the_gate_measures_general_questions_and_enough_reading_items(tmp_path):
    from onthejob.learn.gate import gate_general_set, general_set, retention_set

    store, ids = _store_with_sessions(tmp_path)
    out = consolidate(store, tiny_model(seed=0), "acme", _opts(), say=lambda s: None)
    m = out.adapter.metrics
    # The gate asks the questions the base answers right robustly: most, not all, of the set.
    stable = gate_general_set()
    assert m["general_items"] == len(stable) >= 75 and len(stable) < len(general_set())
    assert all(it["stable"] for it in stable)
    assert gate_general_set([{"question": "q", "answers": ["a"]}]) == [{"question": "q", "answers": ["a"]}]
    assert m["reading_items"] == len(retention_set()) >= 20
    for key in ("general_before", "general_after", "general_drop", "reading_before", "reading_after"):
        assert 0.0 <= abs(m[key]) <= 1.0, key
    assert m["thresholds"]["max_general_drop"] == GateConfig.max_general_drop
    # The decision and why are kept apart from the status a person may change later.
    assert m["gate"] == {"promote": True, "reason": out.message}
    assert set(m["phases"]) >= {"gate before training", "teacher answers and anchors", "training",
                                "gate after training"}


def test_activating_a_rejected_candidate_by_hand_keeps_the_gates_verdict(tmp_path, capsys):
    from onthejob.cli import main
    from onthejob.learn.activation import activate_checked

    store, ids = _store_with_sessions(tmp_path)
    out = consolidate(store, tiny_model(seed=0), "acme", _opts(gate=GateConfig(min_gain=10.0)),
                      say=lambda s: None)
    assert out.status == "rejected"
    active = activate_checked(store, store.get_adapter(out.adapter.id))
    assert active.status == "active"
    assert active.reason.startswith("activated by hand over the gate's verdict (rejected: did not learn")
    assert active.metrics["gate"]["promote"] is False and "did not learn" in active.metrics["gate"]["reason"]
    assert active.metrics["by_hand"]["status_before"] == "rejected"
    # Activation by hand accepts what it learned: its sessions are consolidated now, so the
    # next run does not train on them again.
    assert active.metrics["by_hand"]["sessions_marked"] == [ids["up"]]
    assert store.sessions_to_consolidate("acme") == []
    assert store.get_session("acme", ids["up"]).consolidated_adapter_id == active.id
    assert consolidate(store, tiny_model(seed=0), "acme", _opts(), say=lambda s: None).status == "nothing"
    main(["adapters", "list", "--db", store.url, "--tenant", "acme"])
    listed = capsys.readouterr().out
    assert "active" in listed and "did not learn" in listed and "by hand" in listed


def test_runs_show_prints_the_phases_of_a_consolidation(tmp_path, capsys):
    from onthejob.cli import main

    store, ids = _store_with_sessions(tmp_path)
    out = consolidate(store, tiny_model(seed=0), "acme", _opts(), say=lambda s: None)
    assert main(["runs", "show", str(out.run_id), "--db", store.url]) == 0
    shown = capsys.readouterr().out
    assert f"run {out.run_id} (consolidate) of acme: done" in shown
    for phase in ("practice material", "gate before training", "teacher answers and anchors",
                  "training", "gate after training"):
        assert f"  {phase}: " in shown
    assert "outcome: promoted" in shown
    assert main(["runs", "list", "--db", store.url, "--tenant", "acme"]) == 0
    assert "consolidate" in capsys.readouterr().out
    assert main(["runs", "show", "999", "--db", store.url]) == 1
    assert "no run 999" in capsys.readouterr().err
