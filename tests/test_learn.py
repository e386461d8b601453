import math
from datetime import UTC

import pytest
import torch

from onthejob.learn.divergence import per_token
from onthejob.learn.drift import AnchorDrift
from onthejob.learn.evaluate import contains, f1, normalize
from onthejob.learn.lesson import ContextTooLongError, Lesson, teacher_context
from onthejob.learn.loop import TrainConfig, Trainer, lr_factor
from onthejob.learn.notes import Notes
from onthejob.learn.opsd import Opsd, OpsdConfig
from onthejob.learn.probes import cloze_probes, probe_quality, sentences
from onthejob.learn.scoring import encode_prefix, response_logits
from onthejob.learn.sft import Sft
from onthejob.model import render_ids, tiny_model

CONTEXT = [
    {"role": "user", "content": "Our project codename is Bluefin. It ships on March 3."},
    {"role": "assistant", "content": "Noted: Bluefin ships on March 3."},
]


def _lesson():
    return Lesson("s1", CONTEXT, ["What is the codename?", "When does it ship?"], title="Bluefin")


def test_divergences_are_zero_on_equal_and_positive_otherwise():
    a, b = torch.randn(5, 50), torch.randn(5, 50)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        assert per_token(a, a, kind).abs().max() < 1e-5
        assert (per_token(a, b, kind) > 0).all()
    rev, fwd = per_token(a, b, "reverse_kl"), per_token(a, b, "forward_kl")
    assert not torch.allclose(rev, fwd)
    assert per_token(a, b, "reverse_kl", top_k=5).shape == (5,)
    with pytest.raises(ValueError):
        per_token(a, b, "bogus")


def test_prefix_cache_scoring_equals_full_forward():
    lm = tiny_model(seed=1)
    tok = lm.tokenizer
    ctx = render_ids(tok, CONTEXT, add_generation_prompt=False)
    full_a = render_ids(tok, [*CONTEXT, {"role": "user", "content": "When?"}])
    full_b = render_ids(tok, [*CONTEXT, {"role": "user", "content": "What is the codename again?"}])
    responses = [[300, 301, 302], [400, 401]]
    with torch.no_grad():
        want = response_logits(lm, [full_a, full_b], responses)
        prefix = encode_prefix(lm, ctx)
        got = response_logits(lm, [full_a[len(ctx):], full_b[len(ctx):]], responses, prefix=prefix)
    assert torch.allclose(got, want, atol=1e-4)


def _stored(seq, role, content, kind="message"):
    from datetime import datetime

    from onthejob.store.types import Message

    return Message(seq, "s", seq, role, content, kind, {}, datetime.now(UTC))


def test_context_uses_latest_compaction_and_review_words():
    msgs = [_stored(1, "user", "old"), _stored(2, "assistant", "old answer"),
            _stored(3, "assistant", "SUMMARY", "compaction"), _stored(4, "user", "new")]
    ctx = teacher_context(msgs, "remember the date")
    text = " ".join(m["content"] for m in ctx)
    assert "old" not in text and "SUMMARY" in text and "new" in text and "remember the date" in text


def test_opsd_trains_only_the_adapter_and_lowers_the_loss():
    lm = tiny_model(seed=2)
    base_params = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    trainer = Trainer(lm, TrainConfig(steps=12, lr=5e-3, bf16=False))
    rule = Opsd([_lesson()], ["Say hi."], OpsdConfig(prompts_per_step=2, samples_per_prompt=2,
                                                     max_new_tokens=6, teacher_tokens=6,
                                                     teacher_mix=0.5))
    history = trainer.run(rule, drift=AnchorDrift(["Say hi."], max_new_tokens=4))
    assert len(history) == 12 and all("kl_to_base" in h for h in history)
    assert sum(h["loss"] for h in history[-4:]) < sum(h["loss"] for h in history[:4])
    assert history[-1]["kl_to_base"] > 0
    for name, p in lm.model.get_base_model().named_parameters():
        if "lora_" not in name:
            clean = name.replace(".base_layer", "")
            assert torch.equal(p, base_params[clean]), name
    assert rule.tokens_teacher > 0 and rule.tokens_student > 0


def test_sgd_moves_each_adapter_weight_in_proportion_to_its_gradient_adam_does_not():
    moved = {}
    for name in ("sgd", "adamw"):
        lm = tiny_model(seed=2)
        trainer = Trainer(lm, TrainConfig(steps=1, lr=1e-2, bf16=False, optimizer=name))
        assert type(trainer.optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[name]
        before = [p.detach().clone() for p in trainer.params]
        for p in trainer.params:
            p.grad = torch.zeros_like(p)
        trainer.params[0].grad.view(-1)[0] = 1.0  # one weight with a big gradient,
        trainer.params[0].grad.view(-1)[1] = 1e-6  # one with a tiny one
        trainer.optimizer.step()
        delta = (trainer.params[0].detach() - before[0]).view(-1)
        moved[name] = (float(delta[0]), float(delta[1]))
    assert moved["sgd"][0] == pytest.approx(-1e-2) and abs(moved["sgd"][1]) < 1e-7
    assert moved["adamw"][0] == pytest.approx(-1e-2, rel=1e-3)
    assert moved["adamw"][1] == pytest.approx(-1e-2, rel=1e-2)  # as far, for a millionth of it
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(optimizer="lion")


def test_cosine_schedule_warms_up_peaks_and_decays_to_a_tenth_constant_stays():
    steps = 100
    cos = [lr_factor("cosine", k, steps) for k in range(steps)]
    assert cos[0] == pytest.approx(0.2) and cos[4] == pytest.approx(1.0)  # 5 warmup steps
    assert all(a >= b for a, b in zip(cos[4:], cos[5:], strict=False))  # then only down
    assert cos[-1] == pytest.approx(0.1)
    assert [lr_factor("constant", k, steps) for k in range(steps)] == [1.0] * steps
    with pytest.raises(ValueError, match="learning-rate schedule"):
        TrainConfig(lr_schedule="linear-ish")


def test_the_loop_sets_each_steps_learning_rate_from_the_schedule():
    lm = tiny_model(seed=2)
    history = Trainer(lm, TrainConfig(steps=6, lr=1e-2, bf16=False, lr_schedule="cosine")
                      ).run(Sft([_lesson()], lm.tokenizer))
    assert [h["lr"] for h in history] == pytest.approx(
        [1e-2 * lr_factor("cosine", k, 6) for k in range(6)])
    assert history[-1]["lr"] == pytest.approx(1e-3)


def test_label_weight_adds_the_answer_tokens_cross_entropy_on_lesson_rows_only():
    from onthejob.learn.opsd import _label_loss

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    loss = _label_loss(logits, [[0, 1], [2]], [True, False])
    assert loss.tolist() == pytest.approx([-math.log(0.5), -math.log(0.8), 0.0])
    with pytest.raises(ValueError, match="label_weight"):
        OpsdConfig(label_weight=-1.0)
    # in a real step the term raises the lesson loss by about the weight x the answer's CE
    losses = {}
    for w in (0.0, 1.0):
        lm = tiny_model(seed=3)
        trainer = Trainer(lm, TrainConfig(steps=1, lr=0.0, bf16=False))
        rule = Opsd([_lesson()], [], OpsdConfig(prompts_per_step=2, label_weight=w,
                                                teacher_tokens=6))
        rule.prepare(trainer)
        trainer.rng.seed(0)
        losses[w] = rule.step(trainer, 0)[1]["lesson_loss"]
    assert losses[1.0] > losses[0.0] + 1.0  # a random model's CE on real tokens is large


def test_anchor_rows_are_held_to_the_base_model_by_default():
    # Before any step the student equals the base, so the KL toward the base (or the prior,
    # here the same) is zero on anchors, while the teacher with the session differs from it.
    losses = {}
    for target in ("base", "prior", "teacher"):
        lm = tiny_model(seed=6)
        trainer = Trainer(lm, TrainConfig(steps=1, bf16=False))
        rule = Opsd([_lesson()], ["Say hi.", "Name a color."],
                    OpsdConfig(prompts_per_step=2, samples_per_prompt=1, max_new_tokens=4,
                               teacher_tokens=4, anchor_share=1.0, anchor_target=target))
        rule.prepare(trainer)
        with torch.no_grad():
            loss, metrics = rule.step(trainer, 0)
        losses[target] = float(loss)
        assert metrics["anchor_loss"] == pytest.approx(float(loss))
    assert OpsdConfig().anchor_target == "base"
    # --anchor-weight scales the anchor rows' part of the loss, and only that part
    lm = tiny_model(seed=6)
    trainer = Trainer(lm, TrainConfig(steps=1, bf16=False))
    rule = Opsd([_lesson()], ["Say hi.", "Name a color."],
                OpsdConfig(prompts_per_step=2, samples_per_prompt=1, max_new_tokens=4,
                           teacher_tokens=4, anchor_share=1.0, anchor_target="teacher",
                           anchor_weight=3.0))
    rule.prepare(trainer)
    with torch.no_grad():
        loss, metrics = rule.step(trainer, 0)
    assert float(loss) == pytest.approx(3.0 * metrics["anchor_loss"], rel=1e-5)
    assert metrics["anchor_loss"] == pytest.approx(losses["teacher"], rel=1e-4)
    with pytest.raises(ValueError, match="anchor_weight"):
        OpsdConfig(anchor_weight=-0.5)
    assert abs(losses["base"]) < 1e-7 and abs(losses["prior"]) < 1e-7 < losses["teacher"]
    with pytest.raises(ValueError, match="anchor target"):
        OpsdConfig(anchor_target="bogus")


def test_the_teacher_reads_the_session_with_the_parent_or_with_the_base(tmp_path):
    from onthejob.model.adapters import LoraSpec, random_lora, save

    lm = tiny_model(seed=6)  # a parent version whose adapter changes the model a lot
    random_lora(lm, "parent", LoraSpec(rank=4, alpha=8), seed=3, scale=0.5)
    save(lm.model, "parent", tmp_path / "parent")

    def targets(parent, teacher_from):
        lm = tiny_model(seed=6)
        trainer = Trainer(lm, TrainConfig(steps=1, bf16=False), parent=parent)
        rule = Opsd([_lesson()], ["Say hi."], OpsdConfig(
            prompts_per_step=2, teacher_tokens=4, teacher_samples=0, span_fallback=False,
            teacher_from=teacher_from))
        rule.prepare(trainer)
        return [t.top_logprobs for ts in rule.targets.values() for t in ts]

    alone = targets(None, "parent")  # no parent: both views are the base
    from_base = targets(str(tmp_path / "parent"), "base")
    from_parent = targets(str(tmp_path / "parent"), "parent")
    assert len(alone) == len(from_base) > 0
    assert all(torch.allclose(a, b) for a, b in zip(alone, from_base, strict=True))
    assert not all(a.shape == b.shape and torch.allclose(a, b)
                   for a, b in zip(alone, from_parent, strict=False))
    with pytest.raises(ValueError, match="unknown teacher"):
        OpsdConfig(teacher_from="bogus")


def test_teacher_rows_drop_answers_that_miss_a_known_span_and_fall_back_to_the_span():
    from onthejob.learn.practice import PracticePrompt

    lm = tiny_model(seed=2)
    lesson = _lesson()
    lesson.practice = [PracticePrompt("What is the codename?", "rule", answer="Bluefin"),
                       PracticePrompt("When does it ship?", "replay", given="On March 3.")]
    trainer = Trainer(lm, TrainConfig(steps=1, bf16=False))
    rule = Opsd([lesson], [], OpsdConfig(teacher_tokens=4, teacher_samples=1, anchor_share=0.0))
    rule.prepare(trainer)
    tok = lm.tokenizer
    span_probe = next(i for i, p in enumerate(rule.probes) if p.prompt.answer)
    texts = [tok.decode(t.response, skip_special_tokens=True) for t in rule.targets[span_probe]]
    # The random tiny model never says "Bluefin": both its answers are dropped, the span stays.
    assert texts == ["Bluefin"] and rule.counts["missed_span"] == 2
    assert rule.counts["span_fallback"] == 1 and rule.counts["given"] == 1
    given_probe = next(i for i, p in enumerate(rule.probes) if p.prompt.given)
    assert "On March 3." in [tok.decode(t.response, skip_special_tokens=True)
                             for t in rule.targets[given_probe]]
    target = rule.targets[span_probe][0]
    assert target.top_ids.shape == (len(target.response), 32) == target.top_logprobs.shape


def test_open_answers_are_kept_only_where_they_tell_a_fact_of_the_session():
    from onthejob.learn.practice import PracticePrompt, anchors, informative, material, repetitive

    facts = anchors(material(CONTEXT))
    assert "bluefin" in facts
    assert informative("It is called Bluefin.", "What is our project called?", facts)
    assert not informative("Bluefin is a project.", "What do you know about Bluefin?", facts)
    assert not informative("It is a great opportunity to share the details.", "Why?", facts)
    loop = "The briefing is about the Bluefin project. It is great. " * 3
    assert repetitive(loop) and not repetitive("The codename is Bluefin and it ships in May.")
    assert not informative(loop, "What is it?", facts)

    lm = tiny_model(seed=2)
    lesson = _lesson()
    lesson.practice = [PracticePrompt("What do you know about Bluefin?", "topic"),
                       PracticePrompt("When does it ship?", "replay", given="I cannot say."),
                       PracticePrompt("What is the codename?", "replay", given="It is Bluefin.")]
    lesson.probes = [p.text for p in lesson.practice]
    trainer = Trainer(lm, TrainConfig(steps=1, bf16=False))
    kept = {}
    for only in (False, True):
        rule = Opsd([lesson], [], OpsdConfig(teacher_tokens=4, teacher_samples=1,
                                             anchor_share=0.0, informative_only=only))
        rule.prepare(trainer)
        tok = lm.tokenizer
        kept[only] = {rule.probes[i].prompt.text: [tok.decode(t.response, skip_special_tokens=True)
                                                   for t in ts] for i, ts in rule.targets.items()}
    # The random tiny model's answers name nothing of the session: with the filter only the
    # session's own answer that names the codename is left; without it every answer trains.
    assert kept[True] == {"What is the codename?": ["It is Bluefin."]}
    assert rule.counts["uninformative"] == 6 + 1 and rule.counts["given"] == 1
    assert set(kept[False]) == {p.text for p in lesson.practice}


def test_teacher_rows_visit_every_probe_once_before_any_twice():
    lm = tiny_model(seed=3)
    lesson = Lesson("s1", CONTEXT, [f"Question {k}?" for k in range(5)])
    trainer = Trainer(lm, TrainConfig(steps=1, bf16=False))
    rule = Opsd([lesson], [], OpsdConfig(teacher_tokens=3, teacher_samples=0, anchor_share=0.0))
    rule.prepare(trainer)
    seen = [rule._next(False, trainer.rng) for _ in range(10)]
    assert sorted(seen[:5]) == sorted(seen[5:]) == list(range(5))


def test_forward_kl_on_the_teachers_top_k_equals_the_full_one_when_k_covers_the_mass():
    from onthejob.learn.divergence import per_token_top

    student, teacher = torch.randn(4, 40), torch.randn(4, 40) * 3
    top = torch.log_softmax(teacher, -1).topk(40, dim=-1)
    full = per_token(student, teacher, "forward_kl")
    assert torch.allclose(per_token_top(student, top.indices, top.values, "forward_kl"), full, atol=1e-5)
    few = torch.log_softmax(teacher, -1).topk(5, dim=-1)
    assert (per_token_top(student, few.indices, few.values, "reverse_kl") >= 0).all()
    assert per_token_top(teacher, few.indices, few.values, "reverse_kl").abs().max() < 1e-5


def test_opsd_refuses_a_session_longer_than_the_context():
    lm = tiny_model(seed=3)
    long = Lesson("s2", [{"role": "user", "content": "word " * 2000}], ["q?"])
    with pytest.raises(ContextTooLongError, match="compact"):
        Trainer(lm, TrainConfig(steps=1, bf16=False)).run(Opsd([long], []))


def test_sft_and_notes_run_on_the_same_loop():
    lm = tiny_model(seed=4)
    history = Trainer(lm, TrainConfig(steps=3, lr=1e-2, bf16=False)).run(Sft([_lesson()], lm.tokenizer))
    assert history[-1]["nll"] < history[0]["nll"]
    lm = tiny_model(seed=5)
    notes = Notes([_lesson()], notes_per_session=2, max_new_tokens=8)
    Trainer(lm, TrainConfig(steps=2, bf16=False)).run(notes)
    assert notes.notes and all(n.startswith("Bluefin") for n in notes.notes)


def _optimizer_tensors(state: dict) -> dict:
    return {(pid, key): value for pid, per in state["state"].items()
            for key, value in per.items() if torch.is_tensor(value)}


def test_resume_restores_the_saved_weights_and_optimizer_state(tmp_path):
    lm = tiny_model(seed=6)
    rule = Sft([_lesson()], lm.tokenizer)
    Trainer(lm, TrainConfig(steps=2, lr=1e-2, bf16=False)).run(rule, checkpoint=tmp_path)
    saved = torch.load(tmp_path / "state.pt", weights_only=False)
    lm2 = tiny_model(seed=6)
    resumed = Trainer(lm2, TrainConfig(steps=2, lr=1e-2, bf16=False))
    fresh = {n: p.detach().clone() for n, p in lm2.model.named_parameters() if p.requires_grad}
    assert resumed.run(rule, checkpoint=tmp_path) == saved["history"]  # nothing left to do
    now = {n: p for n, p in lm2.model.named_parameters() if p.requires_grad}
    assert now.keys() == saved["params"].keys() and now
    assert any(not torch.equal(fresh[n], saved["params"][n]) for n in now)  # training moved them
    for name, value in saved["params"].items():
        assert torch.equal(now[name], value), name
    want, got = _optimizer_tensors(saved["optimizer"]), _optimizer_tensors(
        resumed.optimizer.state_dict())
    assert want and want.keys() == got.keys()  # step, exp_avg, exp_avg_sq per parameter
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    # Training goes on from there: the step count continues.
    lm3 = tiny_model(seed=6)
    history = Trainer(lm3, TrainConfig(steps=4, bf16=False)).run(rule, checkpoint=tmp_path)
    assert [h["step"] for h in history] == [1, 2, 3, 4]


def test_answer_matching_and_probes():
    assert normalize("The Denver Broncos!") == "denver broncos"
    assert contains("It was the Denver Broncos.", "Denver Broncos")
    assert f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    text = "Super Bowl 50 was played in Santa Clara. The Denver Broncos won the game easily."
    assert len(sentences(text)) == 2
    probes = cloze_probes(text, "Super Bowl 50")
    assert all(p.startswith("Complete this sentence about Super Bowl 50") for p in probes)
    assert probe_quality(probes, text).grounded == 1.0


def test_top_k_forward_kl_is_never_negative_and_zero_when_student_equals_teacher():
    from onthejob.learn.divergence import per_token_top

    teacher = torch.randn(6, 60) * 2
    few = torch.log_softmax(teacher, -1).topk(4, dim=-1)
    assert per_token_top(teacher, few.indices, few.values, "forward_kl").abs().max() < 1e-5
    for _ in range(5):
        student = torch.randn(6, 60) * 2
        assert (per_token_top(student, few.indices, few.values, "forward_kl") >= -1e-6).all()


def test_training_anchors_are_disjoint_from_the_drift_anchors_and_the_general_questions():
    from onthejob.learn.drift import DEFAULT_ANCHORS, SHORT_ANCHORS, TRAINING_ANCHORS
    from onthejob.learn.evaluate import ANSWER_HINT
    from onthejob.learn.gate import general_set
    from onthejob.learn.practice import assert_unseen

    general = [it["question"] for it in general_set()]
    assert_unseen(general, TRAINING_ANCHORS)
    assert_unseen(DEFAULT_ANCHORS, TRAINING_ANCHORS)
    assert_unseen(TRAINING_ANCHORS, DEFAULT_ANCHORS)
    assert len(set(TRAINING_ANCHORS)) == len(TRAINING_ANCHORS)
    # Short questions in the lessons' own form, so that form alone does not come to mean
    # "answer with the session's facts".
    assert sum(a.endswith(ANSWER_HINT) for a in TRAINING_ANCHORS) == len(SHORT_ANCHORS) >= 40


def test_model_written_questions_must_name_the_material_or_the_users_setting():
    from onthejob.learn.practice import anchors, grounded

    keys = anchors("Our team's project is code-named Bluefin. It launches on March 3 in Oslo, "
                   "and the first customer is the Port of Bergen.")
    assert {"bluefin", "oslo", "bergen"} <= keys
    assert grounded("When does the Oslo launch happen?", keys)
    assert grounded("What is our project code-named?", keys)  # the user's own setting
    assert not grounded("Which city is the largest?", keys)  # the world's question
    assert not grounded("When does it launch?", keys)


def test_a_sentences_opening_imperative_is_not_an_answer_span():
    from onthejob.learn.practice import span_units, topic_names

    text = ("Good. Remember the codename and the customer for later.\n"
            "Oslo hosts the launch on March 3 this year.\nThe launch in Oslo is public.")
    spans = [a for _, a in span_units(text)]
    assert "Remember" not in spans and "Remember" not in topic_names(text)
    assert "Oslo" in spans  # an opening word the material capitalizes elsewhere is a name


def test_the_gate_holds_back_at_least_two_probes_per_session():
    from onthejob.learn.consolidate import MIN_HELD_OUT, lesson_from

    context = [{"role": "user", "content": "Please remember this: The Bluefin project ships on "
                "March 3 in Oslo. Its lead engineer is Ada Lind, who joined in 2019."},
               {"role": "assistant", "content": "I will remember it."}]
    lesson = lesson_from(tiny_model(seed=0), "s1", context, held_out_share=0.25)
    assert len(lesson.held_out) >= MIN_HELD_OUT and lesson.probes
    assert not set(lesson.held_out) & set(lesson.probes)


def test_span_phrasings_are_the_greedy_question_then_distinct_samples():
    from onthejob.learn.evaluate import normalize
    from onthejob.learn.practice import model_span_questions, span_phrasings

    lm = tiny_model(seed=4)
    units = [("Our project codename is Bluefin.", "Bluefin"), ("It ships on March 3.", "March 3")]
    three = span_phrasings(lm, units, 3)
    assert [len(qs) for qs in three] == [3, 3]
    assert [qs[0] for qs in three] == model_span_questions(lm, units)
    for qs in three:
        kept = [normalize(q) for q in qs if q]
        assert len(kept) == len(set(kept))

