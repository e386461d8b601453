"""Dreaming: task parsing, the DreamEnv contract, every gate rejection, budgets, a dream run
end to end on the tiny model, and the CLI."""

import json

import pytest

from onthejob.dream.env import DreamEnv, match_reward
from onthejob.dream.run import Budget, Budgeted, DreamOptions, dream, load_dream
from onthejob.dream.tasks import (
    DreamTask,
    DreamWriting,
    cloze_task,
    parse_span_question,
    parse_task,
    rule_task,
    write_tasks,
)
from onthejob.dream.validity import DreamGateConfig, EnvVerdict, GateReport, gate, judge
from onthejob.envs.base import EnvError
from onthejob.learn.consolidate import StopTraining
from onthejob.learn.gate import GateConfig
from onthejob.learn.loop import TrainConfig
from onthejob.learn.opsd import OpsdConfig
from onthejob.learn.spans import answer_spans, question_lead, span_kind, split_sentences, window
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


def test_write_tasks_qa_accounts_for_every_sentence(tiny_lm):
    out = write_tasks(tiny_lm, MATERIAL, "Bluefin", max_new_tokens=8, style="qa", attempts=1,
                      fallback="none")
    assert len(out.tasks) + len(out.dropped) == 3 == out.units == out.written
    assert all(t.problem for t in out.dropped) and out.tokens > 0
    assert 0.0 <= out.parse_rate <= 1.0
    with pytest.raises(ValueError, match="checker"):
        write_tasks(tiny_lm, MATERIAL, checker="regex")
    with pytest.raises(ValueError, match="style"):
        write_tasks(tiny_lm, MATERIAL, style="poem")
    with pytest.raises(ValueError, match="program"):
        write_tasks(tiny_lm, MATERIAL, checker="program")  # the span writer writes match tasks


# -- the answer-first ("span") writer --------------------------------------------------------
def test_answer_spans_are_verbatim_and_ranked():
    s = ("The game was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay "
         "Area at Santa Clara, California.")
    spans = answer_spans(s)
    assert spans[0] == "February 7, 2016"  # numbers and dates first
    assert spans[1:4] == ["Levi's Stadium", "San Francisco Bay Area", "Santa Clara"]
    assert all(x in s for x in spans) and "February" not in spans  # not inside a better span
    # A leading "The"/"In"/"Though" is not part of a name; a capitalized first word alone is
    # no span; the session's title is no answer.
    t = ("Though Chopin was born in the village of Żelazowa Wola, he moved to the University "
         "of Warsaw.")
    assert answer_spans(t, avoid="Warsaw") == ["Żelazowa Wola", "University of Warsaw", "Chopin"]
    assert answer_spans(t, avoid="University of Warsaw") == ["Żelazowa Wola", "Chopin"]
    assert answer_spans("Buildings represent examples of every style and period.") == []
    assert answer_spans('It was called an "electric ray" by 12 engineers.') == \
        ["12", "electric ray"]


def test_noun_phrases_are_the_content_words_after_an_opener():
    from onthejob.learn.practice import span_units
    from onthejob.learn.spans import noun_phrases

    s = ("Tesla viewed the signal on a fluorescent screen, and the navy later adopted radar "
         "for detecting submarines quickly.")
    got = [text for _, text in noun_phrases(s)]
    assert got == ["signal", "fluorescent screen", "navy", "detecting submarines"]
    assert all(text in s for text in got)
    # names and numbers come first and are not repeated as phrases; phrases only when asked
    t = "In 1917 Tesla proposed a radio detector for the Navy."
    assert answer_spans(t) == ["1917", "Tesla", "Navy"]
    assert answer_spans(t, phrases=True) == ["1917", "Tesla", "Navy", "radio detector"]
    assert [a for _, a in span_units(t)] == ["1917", "Tesla", "Navy"]
    assert [a for _, a in span_units(t, 2, 1)] == ["1917", "Tesla", "radio detector"]
    assert [a for _, a in span_units(s + " " + t, 4, 1)] == [
        "signal", "1917", "Tesla", "Navy", "radio detector"]


def test_a_sentence_without_names_gets_noun_phrases_with_bare_phrases_only():
    from onthejob.learn.practice import practice_prompts, span_units
    from onthejob.learn.spans import noun_phrases

    bare = "In general, the running time of the best algorithm depends on the input size."
    named = "In 1917 Tesla proposed a radio detector for the Navy."
    text = bare + " " + named
    # by default a sentence that names nothing gives no span, so no rule or span prompt
    assert [a for _, a in span_units(text)] == ["1917", "Tesla", "Navy"]
    # with bare_phrases its noun phrases are asked; a sentence with a name is unchanged
    got = span_units(text, bare_phrases=2)
    assert got == [(bare, "running time"), (bare, "best algorithm"),
                   (named, "1917"), (named, "Tesla"), (named, "Navy")]
    # phrases_per_sentence, when larger, still applies to every sentence
    assert len(span_units(text, 4, 1, bare_phrases=2)) == 6
    # sentence adverbials are not phrases ("In general", "for instance")
    assert "general" not in [p for _, p in noun_phrases(bare)]
    assert [p for _, p in noun_phrases("For instance, see the graph.")] == ["graph"]
    prompts = practice_prompts(None, [{"role": "user", "content": bare}], ("rule",), bare_phrases=1)
    assert [(p.kind, p.answer) for p in prompts] == [("rule", "running time")]
    assert "what" in prompts[0].text.lower()
    assert practice_prompts(None, [{"role": "user", "content": bare}], ("rule",)) == []
    # the assistant's own wording gives no bare phrase (its names and numbers still count)
    said = [{"role": "user", "content": bare},
            {"role": "assistant", "content": "These notes provide a comprehensive overview. "
                                             "The limit was set in 1917."}]
    got = [p.answer for p in practice_prompts(None, said, ("rule",), bare_phrases=2)]
    assert got == ["running time", "best algorithm", "1917"]


def test_split_sentences_keeps_abbreviations_and_any_capital():
    text = ("Tesla was wrong but Émile Girardeau noted it in 1953. The U.S. Army built it in "
            "St. Louis. Short one. Władysław Szpilman played there in 1939.")
    assert split_sentences(text) == [
        "Tesla was wrong but Émile Girardeau noted it in 1953.",
        "The U.S. Army built it in St. Louis.",
        "Władysław Szpilman played there in 1939."]


@pytest.mark.parametrize("text,problem", [
    (" Who is the lead engineer? Answer: Ada", ""),
    (" Who is the lead engineer\nAnswer: x", "no question"),
    (" Who?", "no question"),
    (" Who is Ada Lind, the lead?", "gives its own answer away"),
    (" What colour are the clouds over the sea today?", "shares no word with the sentence"),
    (" Who " + "really " * 30 + "leads?", "longer than 30 words"),
])
def test_parse_span_question(text, problem):
    t = parse_span_question(text, SENTENCE + " The engineer leads.", "Ada Lind")
    assert t.source == "span" and t.answers == ["Ada Lind"]
    assert (problem in t.problem) if problem else (not t.problem and
                                                   t.question == "Who is the lead engineer?")


def test_cloze_fallback_blanks_the_answer_in_a_window():
    long = " ".join(f"w{i}" for i in range(40)) + " Ada Lind " + " ".join(f"v{i}" for i in range(40))
    w = window(long, "Ada Lind", words=10)
    assert "Ada Lind" in w and w.startswith("... ") and w.endswith(" ...")
    assert len(w.split()) <= 12
    t = cloze_task(SENTENCE, "Ada Lind", "Bluefin")
    assert t.source == "cloze" and t.answers == ["Ada Lind"] and "___" in t.question
    assert "Ada Lind" not in t.question and "Bluefin" in t.question


def _completion(text):
    from onthejob.model import Completion

    return Completion([1, 2], [3], [0.0], text, "stop")


def test_span_writer_retries_then_falls_back_to_a_rule_question(tiny_lm, monkeypatch):
    calls, leads = [], {}

    def fake_generate(lm, prompts, params):
        calls.append(params.temperature)
        out = []
        for ids in prompts:
            prompt = lm.tokenizer.decode(ids)
            answer, lead = prompt.rsplit("Answer: ", 1)[1].split("\nQuestion: ")
            leads[answer] = lead  # the prompt ends with the question's first words
            if answer == "Oslo" and params.temperature > 0:  # the retry writes a good question
                out.append(_completion(" city does the Bluefin project ship from?\nSentence: x"))
            elif answer == "Ada Lind":
                out.append(_completion(" is the lead engineer?"))
            else:
                out.append(_completion(" Oslo Oslo"))
        return out

    monkeypatch.setattr("onthejob.dream.tasks.generate", fake_generate)
    out = write_tasks(tiny_lm, MATERIAL, "Bluefin", attempts=2)
    by_answer = {t.answers[0]: t for t in out.tasks}
    # Spans: March 3, Oslo (sentence 1), Ada Lind (2), Rust (3); "Bluefin" is the title.
    assert set(by_answer) == {"March 3", "Oslo", "Ada Lind", "Rust"} and out.units == 4
    assert by_answer["Ada Lind"].source == "span" and by_answer["Ada Lind"].attempt == 0
    assert by_answer["Oslo"].source == "span" and by_answer["Oslo"].attempt == 1
    assert by_answer["Oslo"].question == "What city does the Bluefin project ship from?"
    assert by_answer["Ada Lind"].question == "Who is the lead engineer?"
    assert leads == {"March 3": "When", "Oslo": "What", "Ada Lind": "Who", "Rust": "What"}
    assert by_answer["Rust"].source == by_answer["March 3"].source == "rule"
    assert by_answer["March 3"].question == "The Bluefin project ships on what date in Oslo?"
    # Every failed attempt is kept; retries were sampled and only for units still without a task.
    assert calls == [0.0, 0.8] and len(out.dropped) == 3 + 2
    assert all(t.problem and t.raw for t in out.dropped)
    assert (out.written, len(out.model_tasks), len(out.rule_tasks)) == (7, 2, 2)
    assert out.parse_rate == pytest.approx(2 / 7)  # the fallbacks do not count as parsed
    c = out.counts()
    assert (c["parsed_first_attempt"], c["usable"], c["by_rule"]) == (1, 4, 2)
    none = write_tasks(tiny_lm, MATERIAL, "Bluefin", attempts=1, fallback="none")
    assert {t.source for t in none.tasks} == {"span"} and len(none.tasks) == 1
    cloze = write_tasks(tiny_lm, MATERIAL, "Bluefin", attempts=1, fallback="cloze")
    assert {t.source for t in cloze.tasks} == {"span", "cloze"} and len(cloze.rule_tasks) == 3
    calls.clear()
    ruled = write_tasks(tiny_lm, MATERIAL, "Bluefin", style="rule")
    assert calls == [] and ruled.written == 0 and ruled.units == 4  # no model writing at all
    assert {t.source for t in ruled.tasks} == {"rule"} and len(ruled.tasks) == 4


@pytest.mark.parametrize("span,kind,lead", [
    ("1889", "year", "When"), ("March 3", "date", "When"), ("10 July 1856", "date", "When"),
    ("45%", "percent", "What percentage"), ("120,000", "number", "How many"),
    ("Ada Lind", "person", "Who"), ("Roman Catholic Church", "name", "What"),
    ("University of Warsaw", "name", "What"), ("Oslo", "name", "What"),
])
def test_span_kinds_and_question_leads(span, kind, lead):
    assert span_kind(span) == kind and question_lead(span) == lead


@pytest.mark.parametrize("sentence,span,question", [
    ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris.", "1889",
     "The Eiffel Tower was completed in what year for the World's Fair in Paris?"),
    ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris.", "Eiffel Tower",
     "What was completed in 1889 for the World's Fair in Paris?"),
    ("The bridge carries 120,000 cars a day.", "120,000",
     "Paris: The bridge carries how many cars a day?"),
    ("Paris had 2.1 million people in 2020.", "2.1 million", "Paris had how many people in 2020?"),
    ("Its lead engineer is Ada Lind.", "Ada Lind", "Paris: Its lead engineer is who?"),
])
def test_rule_questions_put_a_question_phrase_in_place_of_the_answer(sentence, span, question):
    t = rule_task(sentence, span, "Paris")
    assert t.source == "rule" and t.answers == [span] and t.question == question
    assert span not in t.question


def test_span_writer_on_the_tiny_model_records_every_attempt(tiny_lm):
    out = write_tasks(tiny_lm, MATERIAL, "Bluefin", attempts=2, max_new_tokens=6)
    assert out.units == 4 and out.written == len(out.model_tasks) + len(out.dropped)
    assert len(out.dropped) >= 4 and all(t.problem for t in out.dropped)
    assert len(out.tasks) == out.units  # each unit: the model's task or its rule question
    assert all(a in MATERIAL for t in out.tasks for a in t.answers)


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


def test_opsd_mode_keeps_tasks_the_teacher_solves_when_every_student_sample_fails():
    opsd_cfg = DreamGateConfig(min_spread=0.2, require_spread=False)
    v = judge(_task(), opsd_cfg, "Ada Lind", WRONG, "zq xv", None)
    assert v.passed and not v.spread and "all fail" in v.reason and "for OPSD" in v.reason
    # ... but not one the teacher fails, nor one with spread marked as without it.
    assert not judge(_task(), opsd_cfg, "Grace Hopper", WRONG, "zq xv", None).passed
    assert judge(_task(), opsd_cfg, "Ada Lind", ["Ada Lind", "no"], "zq xv", None).spread


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
                                teacher_tokens=4),
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
    verdicts = [EnvVerdict(t.id, i < n_pass, "passed" if i < n_pass else "the teacher fails it",
                           spread=i < n_pass)
                for i, t in enumerate(tasks)]
    monkeypatch.setattr("onthejob.dream.run.dream_session", lambda lm, context, title, opts, say:
                        (DreamWriting(tasks, [DreamTask("x", "?", [], raw="junk",
                                                        problem="no question")], 10),
                         GateReport(verdicts, 5), 0.1))


def test_dream_end_to_end_with_the_real_writer_and_gate(tmp_path, taught_dir):
    # No stand-ins: the model writes (span style, rule fallback) and the gate runs the
    # teacher, the empty/random/decoy answers and the student's samples. The taught tiny model
    # answers "Ada Lind" to anything, so exactly the task about the lead engineer passes.
    from onthejob.model import load_model

    lm = load_model(taught_dir)
    store, sid = _store(tmp_path, review=None)
    opts = _loose(max_tasks=3, attempts=1, env_gate=DreamGateConfig(group=8, max_new_tokens=6))
    out = dream(store, lm, "acme", sid, opts, say=lambda s: None)
    record = load_dream(out.run_id)
    verdicts = {t["answers"][0]: t["gate"] for t in record["tasks"]}
    assert len(verdicts) == 3 and verdicts["Ada Lind"]["passed"]
    assert verdicts["Ada Lind"]["teacher_answer"].startswith("Ada Lind")
    assert 0 < sum(verdicts["Ada Lind"]["group_rewards"]) < 8  # the student's samples spread
    for answer, verdict in verdicts.items():
        if answer != "Ada Lind":
            assert not verdict["passed"] and "the teacher" in verdict["reason"], answer
    assert (out.written, out.passed) == (3, 1) and record["counts"]["written"] == 3
    assert all(t["problem"] for t in record["dropped"])  # the model's attempts, kept with why
    assert out.status == "promoted" and record["outcome"]["status"] == "promoted"
    adapter = store.active_adapter("acme")
    assert adapter.method == "dream" and adapter.version == out.adapter_version
    assert adapter.metrics["steps"] == 2 and out.metrics["tokens_dream"] > 0
    run = store.get_run(out.run_id)
    assert run.kind == "dream" and run.status == "done" and run.progress["phase"] == "done"
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
    with pytest.raises(ValueError, match="style 'rule'"):
        dream(store, tiny_lm, "acme", sid, _loose(style="rule", checker="program"),
              say=lambda s: None)
    assert store.list_runs(kind="dream") == []  # refused before a run was created


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_dream_then_show(tmp_path, tiny_dir, capsys):
    from onthejob.cli import main

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store, sid = _store(tmp_path)
    assert main(["dream", "--db", db, "--tenant", "acme", "--session", sid, "--budget", "1",
                 "--group", "2", "--max-tasks", "3", "--model", tiny_dir]) == 0
    out = capsys.readouterr().out
    run_id = int(out.split("run ")[1].split(":")[0])
    # 3 answer spans (--max-tasks), 3 attempts each by default: the tiny model parses none,
    # so each became a rule-made question.
    assert "tasks written 9, parsed 0, rule-made 3" in out
    assert main(["dream", "show", str(run_id), "--db", db]) == 0
    shown = capsys.readouterr().out
    assert f"dream run {run_id}" in shown and "9 written by the model" in shown
    assert "(rule) Bluefin: " in shown and "(attempt 3)" in shown
    assert "3 made by rule (fallback rule)" in shown
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
    d = result["dream_totals"]
    # The co-work session's sentences (bench/knowledge.py session_for): 3 of MATERIAL with
    # answer spans (4 spans), 3 of the user's and the model's framing turns without any
    # ("What stands out ...", "Good. Keep these notes ...", "Understood, I will ...").
    assert (d["units"], d["no_span"]) == (4, 3) and result["questions"] == 1
    assert d["written"] == d["parsed"] + len(result["rows"][0]["dream"]["dropped"])
    assert d["usable"] == d["parsed"] + d["by_rule"] == 4  # what did not parse: rule questions
    assert "transfer ratio" in (tmp_path / "d.md").read_text()
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "dream", "--data", str(data), "--methods", "nap",
                 "--model", tiny_dir, "--out", str(out)]) == 2


def test_bench_dream_tasks_only(tmp_path, tiny_dir):
    from onthejob.cli import main

    data = tmp_path / "squad.json"
    other = {"title": "Oslo", "context": "Oslo is the capital of Norway since 1814. It lies on a "
             "fjord called the Oslofjord.", "questions": []}
    data.write_text(json.dumps([{"title": "Bluefin", "context": MATERIAL, "questions": []},
                                other] * 100 + [other] * 200))
    out = tmp_path / "t"
    args = ["bench", "dream", "--data", str(data), "--tasks-only", "--articles", "0,1",
            "--split", "dev", "--attempts", "2", "--group", "2", "--model", tiny_dir,
            "--out", str(out)]
    assert main(args) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["tasks_only"] and [r["article"] for r in result["rows"]] == ["Bluefin", "Oslo"]
    t = result["totals"]
    assert t["units"] == sum(r["dream"]["units"] for r in result["rows"]) and t["units"] >= 6
    assert t["written"] >= t["units"]  # every unit asked at least once, retried when it failed
    assert t["usable"] == t["parsed"] + t["by_rule"] == t["units"]
    assert t["passed"] == t["passed_model"] + t["passed_by_rule"]
    assert sum(result["rejections"].values()) == t["usable"] - t["passed"]
    assert sum(result["parse_problems"].values()) == t["written"] - t["parsed"]
    md = (tmp_path / "t.md").read_text()
    assert "parse rate" in md and "rule-made tasks" in md and "| Oslo |" in md
    assert main([*args[:-2], "--articles", "250", "--out", str(out)]) == 2
    assert main([*args[:-2], "--articles", "x", "--out", str(out)]) == 2


def test_bench_dream_compares_opsd_grpo_and_both_on_the_dreams(tmp_path, tiny_dir, monkeypatch):
    """dream (OPSD), dream-grpo and dream-both are separate rows, trained on the same dreams."""
    from onthejob.bench import dream as bench

    tasks = [DreamTask(f"t{i}", q, [a], source="span") for i, (q, a) in enumerate(
        [("Who leads Bluefin?", "Ada Lind"), ("Where does Bluefin ship?", "Oslo")])]
    monkeypatch.setattr(bench, "dream_session", lambda lm, context, title, opts, say: (
        DreamWriting(tasks, [], 10, units=2),
        GateReport([EnvVerdict(t.id, True, "passed") for t in tasks], 5), 0.5))
    data = [{"title": "Bluefin", "context": MATERIAL,
             "questions": [{"question": "Who leads Bluefin?", "answer": "Ada Lind"}]}] * 201
    cfg = bench.DreamBenchConfig(data="", split="test", sessions=1,
                                 methods=["dream", "dream-grpo", "dream-both"], budgets=[1, 2],
                                 group=2, grpo_starts=1, model=tiny_dir,
                                 opsd=OpsdConfig(prompts_per_step=2, samples_per_prompt=1,
                                                 max_new_tokens=4, teacher_tokens=4))
    monkeypatch.setattr(bench, "load_data", lambda path: data)
    monkeypatch.setattr(bench, "load_articles", lambda path, split, n: data[200:200 + n])
    result = bench.run(cfg, log=lambda s: None)
    rows = {(t["method"], t["budget_steps"]): t for t in result["table"]}
    assert set(rows) == {(m, b) for m in cfg.methods for b in (1, 2)}
    assert not any(t["untrained_sessions"] for t in result["table"])
    for m in cfg.methods:  # each trained: tokens beyond the dreams' 15, growing with the budget
        assert 15 < rows[(m, 1)]["tokens_per_session"] < rows[(m, 2)]["tokens_per_session"]
    from onthejob import config

    for m in ("dream-grpo", "dream-both"):  # GRPO rolled out on the dreamed environments
        lines = (config.home() / "runs" / f"bench-dream-0-{m}" / "rollouts.jsonl").read_text()
        assert {json.loads(x)["env"] for x in lines.splitlines()} == {"dream"}
    md = bench.markdown(result, "onthejob bench dream", "d.png")
    assert "| dream-grpo | 2 |" in md and "| dream-both | 1 |" in md
