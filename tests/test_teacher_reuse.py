"""Inference compute feeds learning: the server keeps the top-k log-probs of every answer it
stores, and consolidation takes the teacher's rows for a session's own answers from them
instead of scoring those answers again (learn/opsd.py)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from onthejob.learn.consolidate import (
    ConsolidateOptions,
    build_lessons,
    consolidate,
    lessons_from_json,
    lessons_to_json,
)
from onthejob.learn.evaluate import ANSWER_HINT
from onthejob.learn.gate import GateConfig
from onthejob.learn.lesson import kept_answers
from onthejob.learn.loop import TrainConfig, Trainer
from onthejob.learn.opsd import Opsd, OpsdConfig
from onthejob.learn.scoring import response_logits
from onthejob.model import load_model, render_ids
from onthejob.model.chat import end_of_turn_ids
from onthejob.serve.app import create_app
from onthejob.store import Store
from onthejob.store.logprobs import decode

NOTES = "Notes: the meeting moved to Tuesday. Bring slides."
QUESTION = "Who leads it?" + ANSWER_HINT


@pytest.fixture(scope="module")
def taught(taught_dir):
    return load_model(taught_dir)


@pytest.fixture
def served(taught, tmp_path):
    """A session of two turns, answered by the server (greedy), approved."""
    store = Store(f"sqlite:///{tmp_path / 'reuse.db'}")
    store.create_tenant("acme")
    key = store.create_key("acme")
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(taught, store)) as http:
        history, sid = [], None
        for text in (NOTES, QUESTION):
            history.append({"role": "user", "content": text})
            r = http.post("/v1/chat/completions", headers={**auth, **({"X-Session-Id": sid}
                                                                      if sid else {})},
                          json={"model": taught.name, "messages": history, "max_tokens": 12,
                                "temperature": 0})
            assert r.status_code == 200, r.text
            sid = r.headers["x-session-id"]
            history.append(r.json()["choices"][0]["message"])
    store.set_review("acme", sid, "up", "")
    yield store, sid
    store.close()


@pytest.fixture
def trainer_on(taught):
    """Trainer(s) on the shared model, their student adapter removed afterwards."""
    from onthejob.learn.loop import STUDENT
    from onthejob.model.adapters import activate, detach

    def make() -> Trainer:
        detach(taught, STUDENT)
        return Trainer(taught, TrainConfig(steps=1, bf16=False))

    yield make
    detach(taught, STUDENT)
    activate(taught, None)
    torch.set_grad_enabled(True)


def _opts(**kw) -> ConsolidateOptions:
    base = dict(train=TrainConfig(steps=2, lr=1e-3, bf16=False),
                opsd=OpsdConfig(prompts_per_step=2, max_new_tokens=4, teacher_tokens=4,
                                teacher_samples=0, batch=8),
                visits=None, probe_kinds=("replay", "rule"),
                gate=GateConfig(min_gain=-1.0, max_kl=100, max_retention_drop=1.0,
                                max_earlier_drop=1.0, max_general_drop=1.0))
    base.update(kw)
    return ConsolidateOptions(**base)


def test_the_stored_answer_keeps_what_the_model_said_and_where_it_stopped(served, taught):
    store, sid = served
    answer = store.messages("acme", sid)[-1]
    assert answer.content == "Ada Lind" and answer.meta["finish_reason"] == "stop"
    kept = decode(store.kept_logprobs("acme", sid)[answer.id])
    tok = taught.tokenizer
    assert tok.decode(kept.token_ids, skip_special_tokens=True) == "Ada Lind"
    # One row per token and one for the step that ended the turn, whose best is the end.
    assert kept.ended and kept.rows == len(kept.token_ids) + 1 and kept.k == 32
    assert [row[0] for row in kept.top_ids[:-1]] == kept.token_ids  # greedy
    assert kept.top_ids[-1][0] in end_of_turn_ids(tok)
    assert answer.meta["logprobs_kept"]["ended"] is True


def test_opsd_takes_the_answers_row_from_the_store_and_it_equals_scoring_it(served, taught,
                                                                           trainer_on):
    store, sid = served
    session = store.get_session("acme", sid)
    lessons = build_lessons(taught, store, [session], _opts(probe_kinds=("replay",)))
    assert lessons[0].kept  # the answers the server kept, by their place in the context
    assert lessons_from_json(lessons_to_json(lessons))[0].kept == lessons[0].kept
    trainer = trainer_on()
    rule = Opsd(lessons, [], OpsdConfig(teacher_tokens=4, teacher_samples=0, anchor_share=0.0))
    rule.prepare(trainer)
    tok = taught.tokenizer
    probe = next(i for i, p in enumerate(rule.probes) if p.prompt.text == QUESTION)
    answer = store.messages("acme", sid)[-1]
    kept = decode(store.kept_logprobs("acme", sid)[answer.id])
    eot = min(end_of_turn_ids(tok) - {None})
    reused = [t for t in rule.targets[probe] if t.response == kept.token_ids + [eot]]
    assert len(reused) == 1
    # Scoring the same answer in the context it was given in (what the server rendered:
    # the session up to the question) gives the same top-32, to float16's precision.
    served_prompt = render_ids(tok, [{"role": m.role, "content": m.content}
                                     for m in store.messages("acme", sid)[:-1]])
    with trainer.teacher():
        logits = response_logits(taught, [served_prompt], [reused[0].response])
    top = torch.log_softmax(logits.float(), -1).topk(32, dim=-1)
    assert torch.equal(reused[0].top_ids, top.indices)
    assert torch.allclose(reused[0].top_logprobs, top.values, rtol=1e-3, atol=1e-3)
    counts = rule.counts
    assert counts["reused"] >= 1 and counts["given"] == counts["reused"] + counts["given_scored"]
    assert counts["teacher_tokens_saved"] >= len(rule.probes[probe].teacher_suffix) + \
        len(reused[0].response)
    # What scoring it would have cost is what it saved: the same rule told to score the
    # session's answers again (--rescore-kept) teacher-forces that many more tokens.
    again = Opsd(lessons, [], OpsdConfig(teacher_tokens=4, teacher_samples=0, anchor_share=0.0,
                                         reuse_kept=False))
    again.prepare(trainer_on())
    assert again.counts["reused"] == 0 and again.counts["given_scored"] == counts["given"]
    assert again.tokens_teacher - rule.tokens_teacher == counts["teacher_tokens_saved"]
    assert again.counts["scored"] == counts["scored"] + counts["reused"]
    assert again.counts["teacher_tokens_scored"] == \
        counts["teacher_tokens_scored"] + counts["teacher_tokens_saved"]


def test_answers_served_with_other_adapters_are_not_reused(served):
    store, sid = served
    messages = store.messages("acme", sid)
    logprobs = store.kept_logprobs("acme", sid)
    assert kept_answers(messages, logprobs, served_with=[])[1] == 0  # served with none: ours
    kept, stale = kept_answers(messages, logprobs, served_with=["/adapters/tenant/acme/v1"])
    assert kept == {} and stale == len(logprobs) > 0


def test_consolidation_reports_the_teacher_rows_it_reused(served, taught):
    store, sid = served
    said: list[str] = []
    out = consolidate(store, taught, "acme", _opts(), say=said.append)
    assert out.status in ("promoted", "rejected"), out.message
    reuse = out.metrics["teacher_reuse"]
    assert reuse["reused"] >= 1 and 0 < reuse["reused_share"] <= 1
    assert reuse["tokens_saved"] > 0 and reuse["tokens_teacher"] > reuse["tokens_scored"] > 0
    assert reuse["scoring_saved_share"] == pytest.approx(
        reuse["tokens_saved"] / (reuse["tokens_saved"] + reuse["tokens_scored"]))
    assert out.metrics["teacher_rows"]["reused"] == reuse["reused"]
    assert store.get_run(out.run_id).progress["teacher_reuse"] == reuse
    line = next(s for s in said if s.strip().startswith("teacher rows:"))
    assert f"{reuse['reused']} of {reuse['rows']} taken from the store" in line
    assert any("answers with kept log-probs" in s for s in said)


def test_every_generation_path_keeps_the_end_of_turn_row(taught):
    """The batched call (per-call serving, OPSD), the stream and the continuous batch (the
    server's default) give the same answer, top lists and end-of-turn row."""
    from onthejob.model import SamplingParams, generate, stream
    from onthejob.model.engine import TorchEngine

    ids = render_ids(taught.tokenizer, [{"role": "user", "content": QUESTION}])
    params = SamplingParams(max_tokens=12, top_logprobs=4)
    whole = generate(taught, [ids], params)[0]
    streamed = list(stream(taught, ids, params))[-1]
    batch = TorchEngine(taught).open_batch()
    batch.add(ids, params, "row")
    continuous = None
    while continuous is None:
        continuous = next((e.completion for e in batch.step() if e.completion), None)
    assert whole.finish_reason == "stop" and whole.stop_top is not None
    assert whole.stop_top[0][0] in end_of_turn_ids(taught.tokenizer)
    for other in (streamed, continuous):
        assert other.token_ids == whole.token_ids
        assert [i for i, _ in other.stop_top] == [i for i, _ in whole.stop_top]
        assert [v for _, v in other.stop_top] == pytest.approx([v for _, v in whole.stop_top],
                                                               abs=1e-4)
