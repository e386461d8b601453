"""The demo recipe (`onthejob demo`, `make demo`): the whole loop once on the default model.

A new session asks two questions the model cannot answer; a co-work session pastes a briefing
and asks about it (the model's turns are its own, live); the user approves it; consolidation
runs with the recipe's defaults and the gate decides; new sessions without the old one ask
the two questions again. The questions are paraphrases that appear nowhere in the session or
its training prompts (asserted, `assert_unseen`), one about a fact only inside the briefing.
The store and adapters go to a new folder under $ONTHEJOB_HOME/demos/ unless `keep`.
`learn/cli.py` parses the command's arguments into a `Demo` and calls `run_demo`.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from onthejob.learn.consolidate import VISITS, ConsolidateOptions, consolidate
from onthejob.learn.evaluate import contains
from onthejob.learn.loop import TrainConfig
from onthejob.learn.opsd import OpsdConfig
from onthejob.learn.practice import BARE_PHRASES, KINDS, SPAN_PHRASINGS, assert_unseen
from onthejob.model import SamplingParams, generate, load_model, render_ids
from onthejob.model.adapters import use_adapter
from onthejob.store import Store
from onthejob.store.context import context_messages


@dataclass
class Demo:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, lr=1e-3))
    visits: float | None = VISITS  # None: train.steps as given
    opsd: OpsdConfig = field(default_factory=OpsdConfig)
    keep: bool = False  # ONTHEJOB_HOME's own store instead of a demo folder
    model: str | None = None
    divergence: str = "forward_kl"  # said in the printout (opsd.divergence is what trains)
    practice: Sequence[str] = KINDS  # the kinds of practice prompts consolidation writes
    span_phrasings: int = SPAN_PHRASINGS  # the model's questions per answer span
    bare_phrases: int = BARE_PHRASES  # noun phrases asked of a sentence with no name or number


DEMO_BRIEFING = (
    "Our team's project is code-named Bluefin. It is a storage service for the harbour "
    "authority, and it launches on March 3 in Oslo. The lead engineer is Ada Lind, who joined "
    "the team in 2019. The first customer is the Port of Bergen, which signed a contract for "
    "40 terminals.")
# What the demo asks afterwards: paraphrases that appear nowhere in the session, its practice
# prompts or its training rows (asserted), with the answer each must contain. The second fact
# is revealed only inside the longer briefing, never asked about in the session.
DEMO_CHECKS = (("What name does our team use for the project?", "Bluefin"),
               ("How many terminals did the first customer order?", "40"))
DEMO_TURNS = ("Please read this briefing; we will work from it.\n\n" + DEMO_BRIEFING,
              "Which city do we launch in?")


def _ask(lm, store, tenant: str, question: str, adapter_path: str | None = None) -> str:
    """Ask in a new session, served as the server would (the tenant's active adapter), or
    with `adapter_path` (to show what a rejected candidate learned)."""
    active = store.active_adapter(tenant)
    use_adapter(lm, adapter_path or (active.path if active else None))
    session = store.create_session(tenant, title="a new day")
    store.add_message(tenant, session.id, "user", question)
    prompt = render_ids(lm.tokenizer, context_messages(store.messages(tenant, session.id)))
    text = generate(lm, [prompt], SamplingParams(max_tokens=32))[0].text
    store.add_message(tenant, session.id, "assistant", text)
    return text


def run_demo(demo: Demo) -> int:
    """The whole loop once, printed step by step; returns the exit status (0)."""
    started = time.time()
    where = use_demo_home(demo.keep)
    print(where)
    store = Store()
    lm = load_model(demo.model)
    tenant = "demo"
    if not any(t.name == tenant for t in store.list_tenants()):
        store.create_tenant(tenant)
    print("1. Before: new sessions ask")
    before = {q: _ask(lm, store, tenant, q) for q, _ in DEMO_CHECKS}
    for (q, want), said in zip(DEMO_CHECKS, before.values(), strict=True):
        print(f"   {q!r} -> {said!r}  ({_knows(said, want)})")
    print("2. A co-work session: the user pastes a briefing and asks about it; the model's turns "
          "are its own answers, generated live:")
    session = store.create_session(tenant)
    for text in DEMO_TURNS:
        store.add_message(tenant, session.id, "user", text)
        prompt = render_ids(lm.tokenizer, context_messages(store.messages(tenant, session.id)))
        reply = generate(lm, [prompt], SamplingParams(max_tokens=48))[0].text.strip()
        store.add_message(tenant, session.id, "assistant", reply)
        print(f"   user: {text}\n   model: {reply}")
    store.set_review(tenant, session.id, "up", "Good. Remember the codename and the customer.")
    store.end_session(tenant, session.id)
    print("   review: thumbs up, \"Good. Remember the codename and the customer.\"")
    budget = f"{demo.train.steps} steps" if not demo.visits else f"{demo.visits:g} visits per prompt"
    print(f"3. Consolidating: the model with the session in context answers its own practice "
          f"questions; the student learns those answers without it ({demo.divergence}, "
          f"{budget}) ...")
    outcome = consolidate(store, lm, tenant, ConsolidateOptions(train=demo.train, visits=demo.visits,
                                                                opsd=demo.opsd,
                                                                probe_kinds=demo.practice,
                                                                span_phrasings=demo.span_phrasings,
                                                                bare_phrases=demo.bare_phrases))
    print(f"   {outcome.status}: {outcome.message}")
    seen = [*outcome.metrics.get("training_probes", []), *outcome.metrics.get("self_anchors", []),
            *outcome.metrics.get("review_prompts", []),
            *DEMO_TURNS,
            *(m.content for m in store.messages(tenant, session.id))]
    assert_unseen([q for q, _ in DEMO_CHECKS], seen)
    print("   (checked: no question asked below appears in the session or its training prompts)")
    print("4. After: new sessions, without the old one in context, ask")
    learned = 0
    for q, want in DEMO_CHECKS:
        said = _ask(lm, store, tenant, q)
        learned += _knows(said, want) == "knows" and _knows(before[q], want) != "knows"
        line = f"   {q!r} -> {said!r}  ({_knows(said, want)})"
        if outcome.status == "rejected" and outcome.adapter is not None:
            line += (f"; the rejected candidate v{outcome.adapter.version} (not served): "
                     f"{_ask(lm, store, tenant, q, adapter_path=outcome.adapter.path)!r}")
        print(line)
    print(f"learned {learned} of {len(DEMO_CHECKS)} facts it did not know; done in "
          f"{time.time() - started:.0f} s; {where[0].lower()}{where[1:]}")
    return 0


def _knows(answer: str, want: str) -> str:
    return "knows" if contains(answer, want) else "does not know"


def use_demo_home(keep: bool) -> str:
    """Point the store and adapters at a new folder under ONTHEJOB_HOME/demos (unless `keep`:
    then ONTHEJOB_HOME's own); the converted model stays in its shared cache. Says where."""
    from onthejob import config

    if keep:
        return (f"Store and adapters: {config.database_url()} and {config.adapters_dir()} "
                "(ONTHEJOB_HOME's own, kept with --keep)")
    demos = config.home() / "demos"
    demos.mkdir(parents=True, exist_ok=True)
    os.environ["ONTHEJOB_HOME"] = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"),
                                                   dir=demos)
    os.environ.pop("ONTHEJOB_DB", None)
    return (f"Store and adapters: this demo's own folder {config.home()} (look inside with "
            f"`ONTHEJOB_HOME={config.home()} onthejob sessions list --tenant demo`; "
            "`onthejob demo --keep` uses ONTHEJOB_HOME's own store instead)")
