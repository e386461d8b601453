"""What the kept log-probs saved, from two consolidations of the same sessions (run.sh): one
that reused them (HOME_REUSE) and one told to score the answers again (HOME_RESCORE); and
how far a kept row (the answer's context: the session up to its turn) is from the row the
teacher scores (the whole session, then the replayed turn), on the real model.

    python docs/results/teacher-reuse/report.py HOME_REUSE HOME_RESCORE [MODEL_DIR]
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _run(home: str) -> dict:
    os.environ["ONTHEJOB_HOME"] = home
    from onthejob.store import Store

    store = Store(f"sqlite:///{home}/onthejob.db")
    run = store.list_runs("consolidate", "acme", limit=1)[0]
    sessions = run.params["sessions"]
    kept = {sid: store.kept_logprobs("acme", sid) for sid in sessions}
    messages = {sid: store.messages("acme", sid) for sid in sessions}
    reviews = {sid: store.get_review("acme", sid) for sid in sessions}
    store.close()
    return {"run": run, "kept": kept, "messages": messages,
            "reviews": {sid: r.text if r else "" for sid, r in reviews.items()}}


def _distance(messages: dict, kept: dict, reviews: dict, model: str | None) -> dict:
    """Over the replayed turns' kept answers (reusable or not: an answer cut by max_tokens has
    no end-of-turn row and is scored again): the mean over answers of the mean over their
    rows of KL(kept || teacher) on the kept top-k (the teacher's log-probs at the same ids,
    full softmax), and how often the two agree on the most likely token."""
    from onthejob.learn.lesson import kept_answers, teacher_context
    from onthejob.learn.practice import replayed
    from onthejob.learn.scoring import response_logits
    from onthejob.model import load_model, render_ids
    from onthejob.model.chat import end_of_turn_ids
    from onthejob.store.logprobs import decode

    lm = load_model(model)
    tok = lm.tokenizer
    eot = min(end_of_turn_ids(tok) - {None})
    kls, agree, tokens, ended = [], [], 0, 0
    for sid, rows in messages.items():
        context = teacher_context(rows, reviews[sid])
        by_index, _ = kept_answers(rows, kept[sid])
        for prompt in replayed(context):
            if prompt.given_at not in by_index:
                continue
            values = decode(by_index[prompt.given_at])
            ended += values.ended
            full = render_ids(tok, [*context, {"role": "user", "content": prompt.text}])
            with torch.no_grad():
                logits = response_logits(lm, [full], [values.token_ids + [eot] * values.ended])
            teacher = torch.log_softmax(logits.float(), -1)
            ids = torch.tensor(values.top_ids)
            p = torch.tensor(values.top_logprobs, dtype=torch.float32)
            q = teacher.gather(-1, ids)
            kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
            agree.append(float((teacher.argmax(-1) == ids[:, 0]).float().mean()))
            tokens += values.rows
    return {"answers": len(kls), "ended": ended, "rows": tokens,
            "mean_kl_kept_to_teacher": sum(kls) / max(len(kls), 1),
            "top1_agreement": sum(agree) / max(len(agree), 1)}


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    reuse, rescore = _run(sys.argv[1]), _run(sys.argv[2])
    figures = {}
    for name, got in (("reuse", reuse), ("rescore", rescore)):
        run = got["run"]
        figures[name] = {"run": run.id, "status": run.status,
                         "teacher_reuse": run.progress.get("teacher_reuse"),
                         "phases_s": run.progress.get("phases")}
    stored = [len(d) for per in reuse["kept"].values() for d in per.values()]
    answers = [m for per in reuse["messages"].values() for m in per if m.role == "assistant"]
    figures["store"] = {"answers": len(answers), "kept": len(stored), "bytes": sum(stored),
                        "tokens": sum(m.meta.get("logprobs_kept", {}).get("tokens", 0)
                                      for m in answers)}
    figures["store"]["bytes_per_token"] = (figures["store"]["bytes"]
                                           / max(figures["store"]["tokens"], 1))
    a = (figures["reuse"]["phases_s"] or {}).get("teacher answers and anchors")
    b = (figures["rescore"]["phases_s"] or {}).get("teacher answers and anchors")
    if a and b:
        figures["teacher_phase_saved_s"] = b - a
    figures["kept_vs_teacher"] = _distance(reuse["messages"], reuse["kept"], reuse["reviews"],
                                           sys.argv[3] if len(sys.argv) == 4 else None)
    print(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
