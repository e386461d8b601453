"""The terminal co-work session: `onthejob chat`. A REPL over any input/output streams, so
it is tested like any function. Every message is stored as it is said (the user's before
the model answers, the model's as soon as it has finished or been interrupted)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TextIO

from onthejob.model import Completion, ContextLengthError, SamplingParams
from onthejob.model.threads import run_in_thread
from onthejob.serve.engine import Engine
from onthejob.serve.turns import (
    DEFAULT_KEEP_TOP_K,
    AdapterResolver,
    compact,
    kept_answer,
    prompt_ids,
    prompt_messages,
)
from onthejob.store import Conflict, NewMessage, NotFound, Store

HELP = """commands:
  /review up|down [words]  give or change this session's review (thumbs up or down)
  /compact                 the model summarizes the session; later turns start from the summary
  /dream [BUDGET] [MODE]   write practice tasks from this session and train on them now
                           (BUDGET: 20steps, 50000tokens, 5min; MODE: opsd, grpo or both)
  /end                     end the session and leave
  /help                    this help
Ctrl-D leaves and keeps the session open (resume it with --session ID)."""


@dataclass
class ChatSettings:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    keep_top_k: int = DEFAULT_KEEP_TOP_K  # top log-probs kept with each answer, for learning

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, top_logprobs=self.keep_top_k)


class ChatError(RuntimeError):
    """The chat cannot start; the message says why and what to do."""


class ChatSession:
    """One tenant's session at the terminal; the session is created with its first message."""

    def __init__(self, engine: Engine, store: Store, tenant: str, session_id: str | None,
                 out: TextIO, settings: ChatSettings | None = None) -> None:
        self.engine, self.store, self.out = engine, store, out
        self.settings = settings or ChatSettings()
        self.adapters = AdapterResolver(store)
        try:
            self.tenant = store.get_tenant(tenant)
        except NotFound as exc:
            raise ChatError(str(exc)) from None
        self.session_id = session_id
        self._served_with: list[str] = []  # the adapters the answer being written is served with
        if session_id is not None:
            try:
                session = store.get_session(self.tenant, session_id)
            except NotFound:
                raise ChatError(f"tenant {tenant!r} has no session {session_id}; "
                                f"`onthejob sessions list --tenant {tenant}` lists them") from None
            if session.status != "open":
                raise ChatError(f"session {session_id} has ended; start a new one "
                                "(leave out --session)")

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def turn(self, text: str) -> None:
        message = NewMessage("user", text)
        if self.session_id is None:
            title = " ".join(text.split())[:80]
            self.session_id = self.store.create_session(self.tenant, title, [message]).id
            stored = self.store.messages(self.tenant, self.session_id)
        else:
            self.store.add_messages(self.tenant, self.session_id, [message])
            stored = self.store.messages(self.tenant, self.session_id)
        params = self.settings.params()
        try:
            ids = prompt_ids(self.engine.lm, prompt_messages(self.session_id, stored, []),
                             params.max_tokens)
        except ContextLengthError as exc:
            self.say(f"[your message is stored, but the session no longer fits: {exc}. "
                     "Type /compact to summarize it, then go on.]")
            return
        cancel = threading.Event()
        self._served_with = self.adapters.paths(self.tenant)
        future = self.engine.submit_stream(
            ids, params, self._served_with, lambda piece: self.say(piece, end=""),
            cancel, then=self._store_answer)
        try:
            future.result()
        except KeyboardInterrupt:
            cancel.set()
            future.result()
            self.say("\n[interrupted; the partial answer is stored]", end="")
        self.say()

    def _store_answer(self, completion: Completion) -> Completion:
        logprobs, kept_meta = kept_answer(completion, self.settings.keep_top_k)
        meta = {"finish_reason": completion.finish_reason, "model": self.engine.lm.name,
                "client": "chat", "prompt_tokens": len(completion.prompt_ids),
                "adapters": list(self._served_with), **kept_meta}
        self.store.add_messages(self.tenant, self.session_id, [NewMessage(
            "assistant", completion.text, meta=meta, logprobs=logprobs)])
        return completion

    def command(self, line: str) -> bool:
        """Run a /command; return False when the chat should end."""
        name, _, rest = line.partition(" ")
        if name == "/help":
            self.say(HELP)
        elif name in ("/review", "/compact", "/dream", "/end") and self.session_id is None:
            self.say("[nothing to act on yet: say something first]")
        elif name == "/review":
            verdict, _, words = rest.strip().partition(" ")
            if verdict not in ("up", "down"):
                self.say("[usage: /review up|down [words]]")
                return True
            try:
                self.store.set_review(self.tenant, self.session_id, verdict, words.strip())
                self.say(f"[review saved: thumbs {verdict}]")
            except Conflict as exc:
                self.say(f"[{exc}]")
        elif name == "/compact":
            try:
                summary = compact(self.engine, self.store, self.tenant, self.session_id,
                                  self.adapters.paths(self.tenant))
                self.say(f"[summary stored; later turns start from it]\n{summary.content}")
            except (ValueError, Conflict) as exc:
                self.say(f"[cannot compact: {exc}]")
        elif name == "/dream":
            self.dream(rest.split())
        elif name == "/end":
            self.store.end_session(self.tenant, self.session_id)
            self.say(f"[session {self.session_id} ended]")
            return False
        else:
            self.say(f"[unknown command {name}; /help lists the commands]")
        return True


    def dream(self, words: list[str]) -> None:
        """Dream this session in the foreground: the engine's lock is held, so the model is
        the chat's alone meanwhile; the adapter it promotes serves the next turn."""
        from onthejob.dream.run import MODES, Budget, DreamOptions, dream

        mode = next((w for w in words if w in MODES), "opsd")
        try:
            budget = Budget.parse(next((w for w in words if w not in MODES), "20steps"))
        except ValueError as exc:
            self.say(f"[{exc}]")
            return
        self.say(f"[dreaming about this session: mode {mode}, budget {budget}; this takes a "
                 "while (progress below)]")
        try:
            with self.engine.lock:  # in a thread that ends, to keep the engine fast after
                out = run_in_thread(lambda: dream(  # (model/threads.py)
                    self.store, self.engine.lm, self.tenant.name, self.session_id,
                    DreamOptions(mode=mode, budget=budget), say=lambda s: self.say(f"[{s}]")),
                    "onthejob-dream")
        except (ValueError, NotFound) as exc:
            self.say(f"[cannot dream: {exc}]")
            return
        self.say(f"[dream run {out.run_id}: {out.status}: {out.message}; "
                 f"`onthejob dream show {out.run_id}` lists the tasks]")


def run_chat(engine: Engine, store: Store, tenant: str, session_id: str | None = None, *,
             stdin: TextIO, stdout: TextIO, settings: ChatSettings | None = None) -> str | None:
    """The REPL. Returns the session id (None if nothing was said)."""
    chat = ChatSession(engine, store, tenant, session_id, stdout, settings)
    where = f"session {session_id}" if session_id else "a new session"
    chat.say(f"onthejob chat: tenant {tenant}, model {engine.lm.name}, {where}. "
             "/help lists the commands.")
    while True:
        chat.say("> ", end="")
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D)
            if chat.session_id:
                chat.say(f"\n[session {chat.session_id} kept open; resume with "
                         f"--session {chat.session_id}, or /end it]")
            else:
                chat.say()
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                break
        else:
            chat.turn(line)
    return chat.session_id
