"""The terminal chat's REPL, on the tiny model, through string streams."""

from __future__ import annotations

import io

import pytest

from onthejob.serve.chat import ChatError, ChatSettings, run_chat
from onthejob.serve.engine import Engine
from onthejob.store import Store


@pytest.fixture
def setup(tiny_lm, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'chat.db'}")
    store.create_tenant("acme")
    store.create_tenant("globex")
    engine = Engine(tiny_lm)
    yield engine, store
    engine.close()
    store.close()


SETTINGS = ChatSettings(max_tokens=6, temperature=0)


def chat(engine, store, script, tenant="acme", session=None):
    out = io.StringIO()
    sid = run_chat(engine, store, tenant, session, stdin=io.StringIO(script), stdout=out,
                   settings=SETTINGS)
    return sid, out.getvalue()


def test_commands_and_storage(setup):
    engine, store = setup
    sid, out = chat(engine, store, "/review up\nhello\n/review sideways\n/review up nice work\n"
                    "/compact\nsecond\n/help\n/bogus\n/end\nnever read\n")
    assert "say something first" in out and "usage: /review" in out
    assert "review saved: thumbs up" in out and "unknown command /bogus" in out
    assert "/compact" in out and f"session {sid} ended" in out
    stored = store.messages("acme", sid)
    assert [(m.role, m.kind) for m in stored] == [
        ("user", "message"), ("assistant", "message"), ("system", "compaction"),
        ("user", "message"), ("assistant", "message")]
    assert stored[0].content == "hello" and stored[3].content == "second"
    assert stored[1].content in out and stored[4].content in out  # streamed to the terminal
    assert store.get_review("acme", sid).text == "nice work"
    assert store.get_session("acme", sid).status == "ended"
    assert "never read" not in [m.content for m in stored]


def test_eof_keeps_the_session_open_and_resume_continues_it(setup):
    engine, store = setup
    sid, out = chat(engine, store, "first\n")
    assert f"--session {sid}" in out and store.get_session("acme", sid).status == "open"
    again, _ = chat(engine, store, "\n\nsecond\n", session=sid)
    assert again == sid
    assert [m.content for m in store.messages("acme", sid) if m.role == "user"] == ["first", "second"]
    empty, out = chat(engine, store, "")
    assert empty is None and store.list_sessions("acme") != []


def test_chat_refuses_unknown_tenants_and_foreign_or_ended_sessions(setup):
    engine, store = setup
    sid, _ = chat(engine, store, "mine\n")
    with pytest.raises(ChatError, match="tenants add"):
        chat(engine, store, "", tenant="nobody")
    with pytest.raises(ChatError, match="no session"):
        chat(engine, store, "steal\n", tenant="globex", session=sid)
    chat(engine, store, "/end\n", session=sid)
    with pytest.raises(ChatError, match="ended"):
        chat(engine, store, "more\n", session=sid)
    assert [m.content for m in store.messages("acme", sid) if m.role == "user"] == ["mine"]


def test_overlong_session_keeps_the_message_and_suggests_compact(setup):
    engine, store = setup
    sid, out = chat(engine, store, "word " * 1100 + "\n")
    assert "/compact" in out and "context" in out
    assert [m.role for m in store.messages("acme", sid)] == ["user"]


def test_answers_keep_their_top_log_probs_for_learning(setup):
    from onthejob.store.logprobs import decode

    engine, store = setup
    sid, _ = chat(engine, store, "hello\n")
    answer = store.messages("acme", sid)[-1]
    kept = decode(store.kept_logprobs("acme", sid)[answer.id])
    assert answer.meta["logprobs_kept"]["k"] == kept.k == 32  # the default, as the server's
    assert len(kept.token_ids) == answer.meta["logprobs_kept"]["tokens"] == 6
    assert answer.meta["adapters"] == []  # what served it: no adapter yet
    none = ChatSettings(max_tokens=3, temperature=0, keep_top_k=0)
    sid = run_chat(engine, store, "acme", None, stdin=io.StringIO("hi\n"),
                   stdout=io.StringIO(), settings=none)
    assert store.kept_logprobs("acme", sid) == {}
