"""Dreaming: task parsing, the DreamEnv contract, every gate rejection, budgets, a dream run
end to end on the tiny model, and the CLI."""

import json

import pytest

from onthejob.dream.env import DreamEnv, match_reward
from onthejob.dream.gate import DreamGateConfig, EnvVerdict, GateReport, gate, judge
from onthejob.dream.run import Budget, Budgeted, DreamOptions, dream, load_dream
from onthejob.dream.tasks import DreamTask, DreamWriting, parse_task, write_tasks
from onthejob.envs.base import EnvError
from onthejob.learn.consolidate import StopTraining
from onthejob.learn.gate import GateConfig
from onthejob.learn.loop import TrainConfig
from onthejob.learn.opsd import OpsdConfig
from onthejob.store import Store

MATERIAL = ("The Bluefin project ships on March 3 in Oslo. Its lead engineer is Ada Lind. "
            "The team chose Rust for the storage engine because of memory safety.")
SENTENCE = "Its lead engineer is Ada Lind."


def _task(answer="Ada Lind", checker="match", program=""):
    return DreamTask("t1", "Who is the lead engineer of Bluefin?", [answer], checker, program)


# -- parsing ---------------------------------------------------------------------------------
def test_parse_a_well_formed_task_and_a_program_check():
    t = parse_task(" Who is the lead engineer?\nAnswer: Ada Lind.\n", SENTENCE, MATERIAL)
    assert not t.problem and t.question == "Who is the lead engineer?" and t.answers == ["Ada Lind"]
    p = parse_task(' Who leads it?\nAnswer: Ada Lind\nCheck: "ada" in answer.lower()', SENTENCE,
                   MATERIAL, checker="program")
    assert not p.problem and p.checker == "program" and p.program == '"ada" in answer.lower()'
    # Text after a blank line or a new "Sentence:" is not part of the task.
    q = parse_task(" Where does it ship?\nAnswer: Oslo\n\nSentence: x\nQuestion: y?\nAnswer: z",
                   SENTENCE, MATERIAL)
    assert q.answers == ["Oslo"] and not q.problem


@pytest.mark.parametrize("text,problem", [
    (" the lead engineer\nAnswer: Ada Lind", "no question"),
    (" Who is the lead engineer?", "no 'Answer:' line"),
    (" Who is the lead?\nAnswer: " + "word " * 9, "longer than 8 words"),
    (" Who is Ada Lind?\nAnswer: Ada Lind", "gives its own answer away"),
    (" Who is the lead engineer?\nAnswer: Grace Hopper", "not found in the session"),
    (" Who is the lead engineer?\nAnswer: the", "only punctuation or articles"),
])
def test_parse_rejects_with_the_reason(text, problem):
    assert problem in parse_task(text, SENTENCE, MATERIAL).problem


@pytest.mark.parametrize("check,problem", [
    ("", "no 'Check:' line"), ("import os", "not a Python expression"),
    ("1 == 1", "does not look at the answer")])
def test_parse_rejects_bad_program_checks(check, problem):
    text = f" Who leads it?\nAnswer: Ada Lind\nCheck: {check}" if check else \
        " Who leads it?\nAnswer: Ada Lind"
    assert problem in parse_task(text, SENTENCE, MATERIAL, checker="program").problem


def test_write_tasks_accounts_for_every_sentence(tiny_lm):
    out = write_tasks(tiny_lm, MATERIAL, "Bluefin", max_new_tokens=8)
    assert len(out.tasks) + len(out.dropped) == 3
    assert all(t.problem for t in out.dropped) and out.tokens > 0
    assert 0.0 <= out.parse_rate <= 1.0
    with pytest.raises(ValueError, match="checker"):
        write_tasks(tiny_lm, MATERIAL, checker="regex")


# -- the environment -------------------------------------------------------------------------
def test_dream_env_contract_and_match_rewards():
    env = DreamEnv(tasks=[_task().to_dict(), _task("Oslo").to_dict()])
    with pytest.raises(EnvError):
        env.step("x")
    obs = env.reset(0)
    assert obs.startswith("Who is the lead engineer") and env.reset(2) == obs
    h = env.state_hash()
    assert DreamEnv(tasks=env.options["tasks"]).reset(0) == obs
    state = env.snapshot()
    a, b = env.fork(2)
    assert a.step("It is Ada Lind.").reward == 1.0 and b.step("Ada").reward == pytest.approx(2 / 3)
    env.restore(state)
    assert env.state_hash() == h
    assert env.step("nobody").reward == 0.0 and env.snapshot()[1] is True
    with pytest.raises(EnvError, match="over"):
        env.step("again")
    assert match_reward("", ["Ada Lind"]) == 0.0
    with pytest.raises(EnvError):
        DreamEnv(tasks=[])


def test_program_checker_runs_in_the_sandbox():
    t = _task(checker="program", program='"ada" in answer.lower()')
    env = DreamEnv(tasks=[t])
    env.reset(0)
    r = env.step("ADA LIND")
    assert r.reward == 1.0 and r.info["isolation"] in ("jail", "rlimits")
    env.reset(0)
    assert env.step("Grace").reward == 0.0
    broken = DreamEnv(tasks=[_task(checker="program", program="answer.nope()")])
    broken.reset(0)
    r = broken.step("x")
    assert r.reward == 0.0 and "AttributeError" in r.info["error"] and "fault" not in r.info


# -- the gate: every rejection reason, judged without a model --------------------------------
CFG = DreamGateConfig(min_spread=0.2)
WRONG = ["no idea", "maybe Paris", "I do not know"]


@pytest.mark.parametrize("task,teacher,students,decoy,reason", [
    (_task(), "Ada Lind", ["Ada Lind", "no idea", "Ada"], None, "passed"),
    (_task(checker="program", program="__import__('random').random() + len(answer) * 0"),
     "Ada Lind", WRONG, None, "not deterministic"),
    (_task(), "It is Grace Hopper.", WRONG, None, "the teacher (with the session) fails it"),
    (_task(checker="program", program="len(answer) >= 0"), "Ada Lind", WRONG, None,
     "accepts an empty answer"),
    (_task(checker="program", program="len(answer) > 0"), "Ada Lind", WRONG, None,
     "accepts a random answer"),
    (_task(checker="program", program="answer.strip().istitle()"), "Ada Lind", WRONG,
     "Bluefin Oslo", "accepts a decoy answer"),
    (_task(), "Ada Lind", WRONG, None, "all fail"),
    (_task(), "Ada Lind", ["Ada Lind"] * 3, None, "all pass"),
    (_task(checker="program", program="[x for x in iter(int, 1)]"), "Ada Lind", WRONG, None,
     "checker fault"),
])
def test_gate_rejects_each_kind_of_bad_environment(task, teacher, students, decoy, reason):
    v = judge(task, CFG, teacher, students, "zq xv", decoy)
    assert reason in v.reason, v
    assert v.passed == (reason == "passed")


def test_gate_with_the_tiny_model_judges_every_task(tiny_lm):
    tasks = [_task(), DreamTask("t2", "Where does Bluefin ship?", ["Oslo"])]
    context = [{"role": "user", "content": MATERIAL}, {"role": "assistant", "content": "Noted."}]
    report = gate(tiny_lm, context, tasks, DreamGateConfig(group=2, max_new_tokens=4))
    assert [v.task for v in report.verdicts] == ["t1", "t2"] and report.tokens > 0
    assert all(v.reason for v in report.verdicts)
    assert all(len(v.state_hash) == 64 for v in report.verdicts)


# -- budgets ---------------------------------------------------------------------------------
def test_budget_parsing():
    assert Budget.parse("20") == Budget("steps", 20) and Budget.parse("7steps").amount == 7
    assert Budget.parse("5min") == Budget("minutes", 5.0)
    assert Budget.parse("50000tokens") == Budget("tokens", 50000.0)
    for bad in ("0", "ten", "5 parsecs", "-3"):
        with pytest.raises(ValueError, match="budget"):
            Budget.parse(bad)


def test_budgeted_rule_stops_at_the_token_budget():
    class Rule:
        name, tokens_student, tokens_teacher = "fake", 0, 0

        def prepare(self, trainer):
            pass

        def step(self, trainer, step):
            self.tokens_student += 60
            return 0.0, {}

    rule = Budgeted(Rule(), Budget("tokens", 100))
    rule.step(None, 0)
    rule.step(None, 1)
    with pytest.raises(StopTraining, match="100 tokens"):
        rule.step(None, 2)


# -- a dream run end to end ------------------------------------------------------------------
def _store(tmp_path, review="up"):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_tenant("acme")
    store.create_tenant("other")
    s = store.create_session("acme", title="Bluefin")
    store.add_message("acme", s.id, "user", f"Please remember this: {MATERIAL}")
    store.add_message("acme", s.id, "assistant", "I will remember it.")
    if review:
        store.set_review("acme", s.id, review, "")
    return store, s.id


def _loose(**kw):
    base = dict(budget=Budget("steps", 2), train=TrainConfig(lr=1e-3, bf16=False),
                opsd=OpsdConfig(prompts_per_step=2, samples_per_prompt=1, max_new_tokens=4,
                                teacher_pool=1),
                gate=GateConfig(min_gain=-1.0, max_kl=100, max_retention_drop=1.0,
                                max_earlier_drop=1.0),
                env_gate=DreamGateConfig(group=2, max_new_tokens=4))
    base.update(kw)
    return DreamOptions(**base)


def _fake_dreams(monkeypatch, n_pass=3):
    """The tiny random model writes nothing usable; stand in for the writer and the gate."""
    tasks = [DreamTask(f"t{i}", q, [a]) for i, (q, a) in enumerate(
        [("Who leads Bluefin?", "Ada Lind"), ("Where does Bluefin ship?", "Oslo"),
         ("What language is the storage engine in?", "Rust"), ("When does it ship?", "March 3")])]
    verdicts = [EnvVerdict(t.id, i < n_pass, "passed" if i < n_pass else "the teacher fails it")
                for i, t in enumerate(tasks)]
    monkeypatch.setattr("onthejob.dream.run.dream_session", lambda lm, context, title, opts, say:
                        (DreamWriting(tasks, [DreamTask("x", "?", [], raw="junk",
                                                        problem="no question")], 10),
                         GateReport(verdicts, 5), 0.1))


def test_dream_trains_registers_and_persists(tmp_path, tiny_lm, monkeypatch):
    store, sid = _store(tmp_path, review=None)
    _fake_dreams(monkeypatch)
    out = dream(store, tiny_lm, "acme", sid, _loose(), say=lambda s: None)
    assert out.status == "promoted" and (out.written, out.parsed, out.passed) == (5, 4, 3)
    adapter = store.active_adapter("acme")
    assert adapter.method == "dream" and adapter.version == out.adapter_version
    assert adapter.metrics["steps"] == 2 and out.metrics["tokens_dream"] == 15
    run = store.get_run(out.run_id)
    assert run.kind == "dream" and run.status == "done" and run.progress["phase"] == "done"
    record = load_dream(out.run_id)
    assert len(record["tasks"]) == 4 and record["dropped"][0]["problem"] == "no question"
    assert [t["gate"]["passed"] for t in record["tasks"]] == [True, True, True, False]
    assert record["outcome"]["status"] == "promoted"
    # Not approved: the session is not marked consolidated, and can still be reviewed.
    assert store.get_session("acme", sid).consolidated_adapter_id is None
    store.set_review("acme", sid, "up", "fine")


def test_dream_budget_in_tokens_and_nothing_to_train(tmp_path, tiny_lm, monkeypatch):
    store, sid = _store(tmp_path)
    _fake_dreams(monkeypatch)
    out = dream(store, tiny_lm, "acme", sid, _loose(budget=Budget("tokens", 1)),
                say=lambda s: None)
    assert store.active_adapter("acme").metrics["steps"] == 1  # at least one step, then stop
    assert store.get_session("acme", sid).consolidated_adapter_id is not None  # approved: marked
    _fake_dreams(monkeypatch, n_pass=0)
    s2 = store.create_session("acme", title="x")
    store.add_message("acme", s2.id, "user", MATERIAL)
    none = dream(store, tiny_lm, "acme", s2.id, _loose(), say=lambda s: None)
    assert none.status == "nothing" and "no dreamed environment" in none.message
    assert out.run_id != none.run_id


@pytest.mark.parametrize("mode", ["grpo", "both"])
def test_dream_grpo_and_both_modes_train_on_dreamed_rewards(tmp_path, tiny_lm, monkeypatch, mode):
    store, sid = _store(tmp_path)
    _fake_dreams(monkeypatch)
    opts = _loose(mode=mode, grpo_starts=1)
    out = dream(store, tiny_lm, "acme", sid, opts, say=lambda s: None)
    assert out.status == "promoted" and out.metrics["steps"] == 2
    # GRPO rolled out groups on the dreamed environments, logged and rewarded by their checker.
    from onthejob import config

    lines = (config.home() / "runs" / f"dream-{out.run_id}" / "rollouts.jsonl").read_text()
    rollouts = [json.loads(x) for x in lines.splitlines()]
    assert rollouts and {r["env"] for r in rollouts} == {"dream"}
    assert all(r["rewards"] and 0.0 <= r["rewards"][0] <= 1.0 for r in rollouts)


def test_dream_refuses_foreign_sessions_and_unwired_modes(tmp_path, tiny_lm):
    from onthejob.store import NotFound

    store, sid = _store(tmp_path)
    with pytest.raises(NotFound):
        dream(store, tiny_lm, "other", sid, _loose(), say=lambda s: None)
    with pytest.raises(ValueError, match="mode"):
        dream(store, tiny_lm, "acme", sid, _loose(mode="dance"), say=lambda s: None)


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_dream_then_show(tmp_path, tiny_dir, capsys):
    from onthejob.cli import main

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store, sid = _store(tmp_path)
    assert main(["dream", "--db", db, "--tenant", "acme", "--session", sid, "--budget", "1",
                 "--group", "2", "--max-tasks", "3", "--model", tiny_dir]) == 0
    out = capsys.readouterr().out
    run_id = int(out.split("run ")[1].split(":")[0])
    assert "tasks written 3" in out
    assert main(["dream", "show", str(run_id), "--db", db]) == 0
    shown = capsys.readouterr().out
    assert f"dream run {run_id}" in shown and "3 written" in shown
    assert main(["dream", "show", str(run_id), "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["session"] == sid
    assert main(["dream", "show", str(run_id), "--db", db, "--tenant", "other"]) == 1
    assert main(["dream", "--db", db, "--tenant", "acme", "--session", sid, "--budget", "x",
                 "--model", tiny_dir]) == 2
    assert main(["dream", "--db", db, "--tenant", "other", "--session", sid,
                 "--model", tiny_dir]) == 1
    assert "error" in capsys.readouterr().err


def test_bench_dream_smoke(tmp_path, tiny_dir):
    from onthejob.cli import main

    data = tmp_path / "squad.json"
    article = {"title": "Bluefin", "context": MATERIAL,
               "questions": [{"question": "Who leads Bluefin?", "answer": "Ada Lind"}]}
    data.write_text(json.dumps([article] * 201))
    out = tmp_path / "d"
    assert main(["bench", "dream", "--data", str(data), "--sessions", "1", "--budgets", "1",
                 "--methods", "compact,dream", "--group", "2", "--model", tiny_dir,
                 "--out", str(out)]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    assert [t["method"] for t in result["table"]] == ["compact", "dream"]
    assert result["dream_totals"]["written"] == 5 and result["questions"] == 1
    assert "transfer ratio" in (tmp_path / "d.md").read_text()
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "dream", "--data", str(data), "--methods", "nap",
                 "--model", tiny_dir, "--out", str(out)]) == 2
