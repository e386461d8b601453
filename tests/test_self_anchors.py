"""Prompts the base model writes itself (learn/self_anchors.py): more anchors, and the ordinary
prompts on which a review's words are taught as an instruction (learn/lesson.py review_lesson)."""

from dataclasses import dataclass

import torch

from onthejob.learn import opsd as opsd_module
from onthejob.learn import self_anchors as sa
from onthejob.learn.evaluate import ANSWER_HINT
from onthejob.learn.gate import general_set
from onthejob.learn.lesson import Lesson
from onthejob.learn.loop import TrainConfig, Trainer
from onthejob.learn.opsd import Opsd, OpsdConfig
from onthejob.model import tiny_model
from onthejob.model.chat import render_text

CONTEXT = [
    {"role": "user", "content": "Our project codename is Bluefin. It ships on March 3 in Oslo."},
    {"role": "assistant", "content": "Noted: Bluefin ships on March 3 in Oslo."},
]


def test_the_user_turn_head_is_the_template_up_to_the_users_words(tiny_lm):
    tok = tiny_lm.tokenizer
    head = tok.decode(sa.user_turn_ids(tok))
    whole = render_text(tok, [{"role": "user", "content": "Hello there"}], add_generation_prompt=False)
    assert whole.startswith(head) and whole[len(head):].startswith("Hello there")
    assert head.endswith("user\n")


def test_resembles_catches_a_contained_or_half_shared_question():
    asked = ["What is the capital of France?"]
    assert sa.resembles("Tell me: what is the capital of France? Thanks.", asked)
    assert sa.resembles("What is the capital city of France?", asked)
    assert not sa.resembles("How do I bake sourdough bread at home?", asked)


@dataclass
class _Done:
    text: str
    finish_reason: str


def test_self_written_keeps_finished_distinct_prompts_unlike_the_evaluation(monkeypatch, tiny_lm):
    general = general_set()[0]["question"]
    said = iter([
        ("Can you help me plan a week of healthy dinners?", "stop"),  # kept
        ("Can you help me plan a week of healthy dinners?", "stop"),  # duplicate
        ("I was wondering whether you could tell me more about", "length"),  # unfinished
        ("Hi", "stop"),  # too short
        (general, "stop"),  # a general question (what measures forgetting)
        ("Write a poem about Bluefin and its launch.", "stop"),  # names a session fact
        ("Please summarize the plot of a famous novel for me.", "stop"),  # an avoided eval prompt
        (" does a violin bow have hair made from?", "stop"),  # after the starter "What": kept
    ])
    more = iter(range(1000))

    def fake_generate(lm, prompts, params):
        return [_Done(*next(said, (f"Suggest {next(more)} names for a bakery.", "stop")))
                for _ in prompts]

    monkeypatch.setattr(sa, "generate", fake_generate)
    monkeypatch.setattr(sa, "STARTERS", ("", "", "", "", "", "", "", "What"))
    texts, counts = sa.self_written(tiny_lm, 8, avoid=["Summarize the plot of a famous novel."],
                                    facts={"bluefin", "oslo"}, batch=8)
    assert texts[0] == "Can you help me plan a week of healthy dinners?"
    assert texts[1] == "What does a violin bow have hair made from?" + ANSWER_HINT
    # the first round of 8 kept 2; the second, of 8 more, filled the rest
    assert counts == {"written": 16, "unfinished": 1, "size": 1, "duplicate": 1, "resembles": 2,
                      "names_fact": 1}
    assert len(texts) == len(set(texts)) == 8
    assert all(not sa.resembles(t, sa.forbidden_texts()) for t in texts)
    assert sa.self_written(tiny_lm, 0) == ([], {"written": 0, "unfinished": 0, "size": 0,
                                               "duplicate": 0, "resembles": 0, "names_fact": 0})


def test_opsd_holds_the_self_written_prompts_to_the_base_beside_the_fixed_anchors(monkeypatch):
    lm = tiny_model(seed=4)
    calls = {}

    def fake_self_written(lm_, n, seed, *, avoid, facts, batch):
        calls.update(n=n, avoid=list(avoid), facts=set(facts))
        return [f"Suggest a name for bakery number {k}." for k in range(n)], {"written": n + 3}

    monkeypatch.setattr(opsd_module, "self_written", fake_self_written)
    lesson = Lesson("s1", CONTEXT, ["What is the codename?", "When does it ship?"])
    trainer = Trainer(lm, TrainConfig(steps=1, bf16=False))
    rule = Opsd([lesson], ["Name three colors."], OpsdConfig(teacher_tokens=4, self_anchors=3,
                                                             reading_anchors=0),
                avoid=["Where do we launch?"])
    rule.prepare(trainer)
    anchors = [p.prompt.text for p in rule.probes if p.anchor]
    assert anchors == ["Name three colors.", *(f"Suggest a name for bakery number {k}." for k in range(3))]
    assert all(i in rule.targets for i, p in enumerate(rule.probes) if p.anchor)  # base answers
    assert rule.self_written == anchors[1:]
    assert rule.counts["self_anchors"] == 3 and rule.counts["self_anchors_dropped"] == 3
    assert calls["n"] == 3 and "Where do we launch?" in calls["avoid"]
    assert "Name three colors." in calls["avoid"] and "bluefin" in calls["facts"]
    with torch.no_grad():
        loss, metrics = rule.step(trainer, 0)
    assert float(loss) >= 0 and "anchor_loss" in metrics


def test_no_self_anchors_by_default():
    assert OpsdConfig().self_anchors == 0


def test_the_tiny_model_writes_through_the_real_generator(tiny_lm):
    texts, counts = sa.self_written(tiny_lm, 4, seed=1, batch=4)
    assert len(texts) <= 4 and all(isinstance(t, str) and t for t in texts)
    assert counts["written"] - sum(v for k, v in counts.items() if k != "written") == len(texts)


def test_resembles_agrees_with_the_f1_of_evaluate():
    from onthejob.learn.evaluate import f1

    others = [it["question"] for it in general_set()][:20]
    for text in ["What is the capital city of Peru?", "Name a large planet.", "Who painted it?",
                 "How many legs does an insect have?", "Write a story about a dragon."]:
        want = any(sa.normalize(o) in sa.normalize(text) or f1(text, o) >= 0.5 for o in others)
        assert sa.resembles(text, others) == want


def test_a_reviews_words_are_taught_as_an_instruction_on_ordinary_prompts(monkeypatch):
    from onthejob.learn.lesson import REVIEW_HEADER, default_system
    from onthejob.learn.opsd import planned_probes

    lm = tiny_model(seed=5)
    seeds = []

    def fake_self_written(lm_, n, seed, *, avoid, facts, batch):
        seeds.append(seed)
        return [f"Write a line for banner {k}." for k in range(n)], {"written": n}

    monkeypatch.setattr(opsd_module, "self_written", fake_self_written)
    words = "Always call our product Nimbus."
    reviewed = Lesson("s1", CONTEXT, ["What is the codename?"], review=words)
    silent = Lesson("s2", CONTEXT, ["When does it ship?"])
    cfg = OpsdConfig(teacher_tokens=4, review_prompts=3, reading_anchors=0)
    assert planned_probes([reviewed, silent], cfg) == 2 + 3
    assert planned_probes([reviewed, silent], OpsdConfig()) == 2
    trainer = Trainer(lm, TrainConfig(steps=1, bf16=False))
    rule = Opsd([reviewed, silent], [], cfg)
    rule.prepare(trainer)
    assert [x.session_id for x in rule.lessons] == ["s1", "s2", "s1:review"]
    [system] = rule.lessons[2].context
    assert system["role"] == "system" and system["content"] == \
        f"{default_system(lm.tokenizer)}\n\n{REVIEW_HEADER} {words}".strip()
    review_probes = [i for i, p in enumerate(rule.probes) if p.prompt.kind == "review"]
    assert [rule.probes[i].prompt.text for i in review_probes] == rule.review_written == \
        [f"Write a line for banner {k}." for k in range(3)]
    assert all(rule.probes[i].lesson == 2 and not rule.probes[i].anchor for i in review_probes)
    assert all(i in rule.targets for i in review_probes)  # the teacher answered each
    assert rule.counts["review_prompts"] == 3 and len(seeds) == 1
    with torch.no_grad():
        loss, _ = rule.step(trainer, 0)
    assert float(loss) >= 0
    # no review words, or no review prompts asked for: no review lesson
    plain = Opsd([silent], [], cfg)
    plain.prepare(trainer)
    assert len(plain.lessons) == 1 and plain.review_written == []


def test_consolidation_gives_each_lesson_its_reviews_words(tmp_path, tiny_lm):
    from onthejob.learn.consolidate import (
        ConsolidateOptions,
        build_lessons,
        lessons_from_json,
        lessons_to_json,
    )
    from onthejob.store import Store

    store = Store(f"sqlite:///{tmp_path / 'review.db'}")
    store.create_tenant("acme")
    words = "Always call our product Nimbus."
    sessions = []
    for review in (words, ""):
        s = store.create_session("acme")
        store.add_message("acme", s.id, "user", CONTEXT[0]["content"])
        store.add_message("acme", s.id, "assistant", CONTEXT[1]["content"])
        store.set_review("acme", s.id, "up", review)
        sessions.append(store.get_session("acme", s.id))
    lessons = build_lessons(tiny_lm, store, sessions, ConsolidateOptions(probe_kinds=("rule",)))
    assert [x.review for x in lessons] == [words, ""]
    assert words in lessons[0].context[-2]["content"]  # and read after the session, as before
    assert [x.review for x in lessons_from_json(lessons_to_json(lessons))] == [words, ""]
    store.close()
