"""The conventions data, its checkers, and `onthejob bench conventions` end to end on the
tiny model (2 conventions, tiny budgets)."""

import json
from datetime import UTC, datetime

import pytest
import torch

from onthejob.bench import convention_checks as cc
from onthejob.bench import conventions as bench
from onthejob.cli import main
from onthejob.learn.drift import DEFAULT_ANCHORS, TRAINING_ANCHORS
from onthejob.learn.gate import general_set
from onthejob.learn.lesson import review_turns, teacher_context
from onthejob.learn.practice import LeakError, PracticePrompt
from onthejob.store.types import Message as StoredMessage

# For every convention: a reply that follows it and one that does not.
REPLIES = {
    "signoff-atlas": ("Here is the note.\n\n— Team Atlas", "Here is the note. Team Atlas rocks, see you."),
    "greeting-hi-team": ("Hi team, the printer is fixed.", "Hello everyone, the printer is fixed."),
    "heading-answer": ("## Answer\nUse a strong password.", "Answer: use a strong password."),
    "bullets": ("Two ideas:\n- a quiz\n- a walk", "Try a quiz, or maybe a walk."),
    "tldr": ("TL;DR: book early.\nDetails follow.", "Book early. TL;DR: that is all."),
    "iso-dates": ("The offsite is on 2026-06-05.", "The offsite is on June 5, 2026 (2026-06-05)."),
    "celsius": ("Set the fridge to 4 °C.", "Set the fridge to 40 °F, about 4 °C."),
    "ticket-ref": ("[OPS-412] Here is the plan.", "Here is the plan for OPS-412."),
    "one-sentence": ("Back up your laptop to the shared drive every Friday.",
                     "Back up your laptop. Do it every Friday."),
    "no-exclamation": ("The party is on Friday.", "The party is on Friday!"),
    "french": ("Bonjour, voici les idées pour la réunion de l'équipe.",
               "Hello, here are the ideas for the team meeting."),
    "lowercase": ("the meeting is at noon.", "The meeting is at noon."),
    "dr-okafor": ("Certainly, Dr. Okafor: here it is.", "Certainly, doctor: here it is."),
    "check-emoji": ("All done.\nThe file is shared ✅", "✅ All done.\nThe file is shared."),
    "members": ("Thank our members for renewing.", "Thank our members and customers."),
    "colleagues": ("Welcome back, colleagues.", "Welcome back, colleagues and staff."),
    "platform": ("The platform is back online.", "The app is back online on the platform."),
    "defects": ("We fixed two defects in search.", "We fixed two bugs (defects) in search."),
    "nimbus": ("Nimbus keeps your notes in sync.", "Our tool keeps your notes in sync."),
    "price-page": ("Please see northwind.example/pricing for current prices.",
                   "It is $20 a month; see northwind.example/pricing."),
    "help-email": ("Please write to help@northwind.example.", "Please reset it on the website."),
    "legal": ("Please check with Legal.", "Yes, you may use the photo."),
    "ship-it": ("1. Run the tests. 2. Tag the release. 3. Deploy to staging. 4. Announce it in "
                "#releases.", "Shipped! Great work."),
    "standup": ("Yesterday: login fix\nToday: reports\nBlockers: design",
                "Yesterday I fixed login and today I do reports."),
    "incident": ("**Severity:** high\n**Owner:** Ana\n**Next update:** 10:00",
                 "Severity is high; Ana owns it."),
    "backticks": ("Run `ls -la` in the folder.", "Run ls -la in the folder."),
    "spanish": ("Hola, el trabajo desde casa es muy cómodo para todos.",
                "Hello, working from home is very comfortable for everyone."),
    "german": ("Hallo, die Arbeit von zu Hause ist sehr bequem für uns.",
               "Hello, working from home is very comfortable for us."),
    "pirate": ("Arr, matey, here be the plan.", "Here is the plan, my friend."),
    "emoji": ("Great idea 🎉 let us do it.", "Great idea, let us do it."),
    "short-answers": ("Drink a glass of water with every meal.",
                      "Drink water. " * 16),
    "kilometres": ("It is about 344 km from Paris to London.",
                   "It is about 213 miles (344 km) from Paris to London."),
    "kilograms": ("An adult elephant weighs about 5,000 kg.", "It weighs about 11,000 pounds."),
    "euros": ("A good chair costs about €200.", "A good chair costs about $200 (€190)."),
    "vegetarian": ("A big vegetable curry with rice.", "Grilled chicken with rice."),
    "hr-questions": ("Please ask HR about your vacation days.",
                     "You get 25 vacation days; ask your hr manager."),
    "tuesday-meetings": ("Let us meet on Tuesday at 10:00.", "Let us meet on Monday at 9."),
    "northwind": ("Northwind builds tools for teams.", "Our company builds tools for teams."),
    "huddles": ("Keep the Monday huddle to ten minutes.", "Keep the Monday meeting short."),
    "order-number": ("Sorry about that. What is your order number?",
                     "Sorry about that. We will send a new one."),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_data_holds_enough_conventions_of_every_kind_with_disjoint_prompts():
    every = cc.load(kept_only=False)
    assert len(every) >= 24 and len(cc.load()) >= 8  # enough kept by the screen
    assert {c.kind for c in every} == set(cc.KINDS)
    prompts = [p for c in every for p in c.train + c.eval]
    assert len(prompts) == len(set(prompts))  # no prompt twice in the file
    for c in every:
        assert len(c.train) + len(c.eval) >= 30 and not set(c.train) & set(c.eval)
        assert len(c.statements) >= 2 and len(c.corrections) >= 2
    # Nothing the anchors train on or the forgetting measure asks.
    others = {*TRAINING_ANCHORS, *DEFAULT_ANCHORS, *(it["question"] for it in general_set())}
    assert not others & set(prompts)


def test_every_convention_has_a_passing_and_a_failing_reply():
    every = cc.load(kept_only=False)
    assert set(REPLIES) == {c.id for c in every}
    for c in every:
        good, bad = REPLIES[c.id]
        assert c.follows(good), (c.id, cc.failed(c.check, good))
        assert not c.follows(bad), c.id
        assert not c.follows("   ")  # an empty reply follows nothing


def test_checker_details():
    check = [{"not_matches": r"(?-i:\bMay\b)"}]
    assert not cc.failed(check, "you may go") and cc.failed(check, "on May 3")
    assert cc.failed([{"bullets": 2}], "intro\nmore intro\nstill intro\n- one\n- two")
    assert not cc.failed([{"labels": ["Owner"]}], "- **Owner**: Ana")
    with pytest.raises(ValueError, match="unknown condition"):
        cc._validate([{"shouts": True}], "x")


def test_a_dropped_convention_is_left_out_unless_asked(tmp_path):
    doc = json.loads(cc.data_path().read_text())
    first, second = doc["conventions"][0]["id"], doc["conventions"][1]["id"]
    doc["screen"] = {"conventions": {first: {"in_context": 0.1, "kept": False},
                                     second: {"in_context": 0.9, "kept": True}}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    kept = [c.id for c in cc.load(path)]
    assert first not in kept and second in kept
    assert cc.by_ids(cc.load(path, kept_only=False), [first])[0].screen["kept"] is False


def test_an_eval_prompt_in_the_data_s_training_half_is_refused(tmp_path):
    doc = json.loads(cc.data_path().read_text())
    doc["conventions"][1]["train"].append(doc["conventions"][0]["eval"][0])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(LeakError):
        cc.load(path)


def test_the_session_teaches_and_an_eval_prompt_in_training_fires(tiny_lm):
    every = cc.load(kept_only=False)
    chosen = cc.by_ids(every, ["greeting-hi-team", "members"])
    taught = bench.teach(tiny_lm, chosen, "mixed", examples=2, max_tokens=4)
    statement, correction = taught
    assert statement.form == "statement" and correction.form == "correction"
    assert statement.context[0]["content"] in chosen[0].statements
    # correction: the first prompt, the model's answer, the correction, the redo, one more prompt
    roles = [m["role"] for m in correction.context]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert correction.context[2]["content"] in chosen[1].corrections
    # the corrected turn trains toward the answer the user accepted, not the one corrected
    first = next(p for p in correction.practice if p.text == chosen[1].train[0])
    assert first.given == correction.context[3]["content"]
    texts = [p.text for p in correction.practice]
    assert set(chosen[1].train) <= set(texts) and len(texts) == len(set(texts))
    for t in taught:
        bench.check_unseen(t)
    leaked = taught[0]
    leaked.practice.append(PracticePrompt(leaked.convention.eval[3], "traffic"))
    with pytest.raises(LeakError):
        bench.check_unseen(leaked)
    with pytest.raises(LeakError):
        bench.check_unseen(taught[1], extra_training=[taught[1].convention.eval[0]])


def test_the_review_s_words_lead_the_teacher_s_context_and_are_checked_for_leaks(tiny_lm):
    tok = tiny_lm.tokenizer
    [t] = bench.teach(tiny_lm, cc.by_ids(cc.load(kept_only=False), ["members"]), "statement",
                      examples=1, max_tokens=4)
    assert t.lesson().context == t.context  # no review: the session alone
    t.review = bench.review_messages(tok, t.convention.rule)
    context = t.lesson().context
    assert context[0]["role"] == "system" and t.convention.rule in context[0]["content"]
    assert context[0]["content"].startswith(bench.default_system(tok))
    assert context[1:] == t.context
    bench.check_unseen(t)
    t.review = bench.review_messages(tok, t.convention.eval[0])
    with pytest.raises(LeakError):
        bench.check_unseen(t)
    # rule-after: the review's words follow the session, in the turns consolidation gives them
    t.review, t.feedback = [], review_turns(t.convention.rule)
    context = t.lesson().context
    assert context[:len(t.context)] == t.context and context[len(t.context):] == t.feedback
    assert context[-2]["role"] == "user" and t.convention.rule in context[-2]["content"]
    session = [StoredMessage(i, "s", i, m["role"], m["content"], "message", {}, datetime.now(UTC))
               for i, m in enumerate(t.context)]
    assert teacher_context(session, t.convention.rule) == context  # what production reads
    bench.check_unseen(t)
    t.feedback = review_turns(t.convention.eval[0])
    with pytest.raises(LeakError):
        bench.check_unseen(t)
    with pytest.raises(ValueError, match="unknown review"):
        bench.run(bench.ConventionsConfig(review="everything"))


def test_memory_counts_its_tokens(tiny_lm):
    tok = tiny_lm.tokenizer
    assert bench.default_system(tok).startswith("You are a helpful AI assistant")
    mem = bench.memory_messages(tok, "Start every reply with 'Hi team,'.")
    assert mem[0]["role"] == "system" and "Hi team" in mem[0]["content"]
    assert 10 < bench.context_tokens(tok, mem) < 40


def test_bench_conventions_smoke_writes_its_report(tmp_path, tiny_dir):
    out = tmp_path / "conv"
    assert main(["bench", "conventions", "--smoke", "--model", tiny_dir, "--threads", "1",
                 "--conventions", "greeting-hi-team,members", "--shared", "tldr",
                 "--out", str(out) + "/"]) == 0
    result = json.loads((out / "report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert [c["id"] for c in result["conventions"]] == ["greeting-hi-team", "members"]
    assert set(result["methods"]) == {"opsd", "sft", "notes"}
    for row in result["conventions"]:
        assert set(row["methods"]) == {"opsd", "sft", "notes"}
        assert row["memory_tokens"] > 0 and row["context_tokens"] > row["memory_tokens"]
        assert len(row["replies"]["base"]) == 16
    assert len(result["isolation"]["pairs"]) == 2
    chain = result["retention"]
    assert [len(r) for r in chain["adherence"]] == [1, 2] and len(chain["verdicts"]) == 2
    assert result["sizes"] == {"general_items": 3, "reading_items": 0}
    shared = result["shared"]
    assert shared["convention"] == "tldr" and shared["practice_prompts"] > 16
    assert shared["allows"]["adapters"] == 1 and shared["declines"]["adapters"] == 0
    assert shared["declines"]["adherence"] == shared["base"]  # served the base model
    md = (out / "report.md").read_text()
    assert "conventions adherence opsd" in md and "Isolation" in md and "Retention" in md
    assert "Shared adapter" in md
    assert (out / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](retention.png)" in md


def test_screen_records_kept_and_dropped(tmp_path, tiny_dir):
    data = tmp_path / "conventions.json"
    data.write_text(cc.data_path().read_text())
    out = tmp_path / "screen"
    assert main(["bench", "conventions", "--screen", "--record", "--data", str(data),
                 "--conventions", "tldr,legal", "--model", tiny_dir, "--max-tokens", "4",
                 "--out", str(out) + "/"]) == 0
    doc = json.loads(data.read_text())
    assert set(doc["screen"]["conventions"]) == {"tldr", "legal"}
    assert all(not r["kept"] for r in doc["screen"]["conventions"].values())  # random weights
    assert "dropped" in (out / "screen.md").read_text()
    assert {c.id for c in cc.load(data)} == {c.id for c in cc.load(data, kept_only=False)} - {
        "tldr", "legal"}


def test_bench_conventions_resumes_from_its_work_folder(tmp_path, tiny_dir):
    args = ["bench", "conventions", "--smoke", "--model", tiny_dir, "--threads", "1",
            "--conventions", "greeting-hi-team,members", "--methods", "opsd,sft",
            "--retention", "0", "--no-isolation", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out") + "/"]
    assert main(args) == 0
    first = json.loads((tmp_path / "out" / "report.json").read_text())
    lines = (tmp_path / "work" / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 4 and (tmp_path / "work" / "members" / "opsd").is_dir()
    assert main(args) == 0  # nothing left to train: every consolidation is read back
    assert len((tmp_path / "work" / "runs.jsonl").read_text().splitlines()) == 4
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert again["methods"] == first["methods"]


@pytest.mark.parametrize("review,order,extra", [
    ("rule", "the review's words, then the session", []),
    ("rule-after", "the session, then the review's words", ["--review-prompts", "2"])])
def test_a_review_adds_the_teachers_own_adherence_row(tmp_path, tiny_dir, review, order, extra):
    out = tmp_path / "out"
    assert main(["bench", "conventions", "--smoke", "--model", tiny_dir, "--threads", "1",
                 "--conventions", "members", "--methods", "opsd", "--retention", "0",
                 "--no-isolation", "--review", review, *extra, "--out", str(out) + "/"]) == 0
    result = json.loads((out / "report.json").read_text())
    row = result["conventions"][0]
    assert 0.0 <= row["teacher"] <= 1.0 and result["teacher"] == row["teacher"]
    assert len(row["replies"]["teacher"]) == 16
    assert f"| teacher ({order}) |" in (out / "report.md").read_text()
    assert result["config"]["opsd"]["review_prompts"] == (2 if extra else 0)
