"""The experience store on SQLite always, and on PostgreSQL when ONTHEJOB_TEST_PG_URL is set."""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, inspect, text

from onthejob.store import Conflict, NewMessage, NotFound, Store, context_messages, keys
from onthejob.store import db as store_db

PG_URL = os.environ.get("ONTHEJOB_TEST_PG_URL")
BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(
        not PG_URL, reason="ONTHEJOB_TEST_PG_URL is unset (.ci/run starts a PostgreSQL)")),
]


def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(store_db.alembic_config()).get_current_head()


def _reset_pg(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def open_store(backend: str, tmp_path) -> Store:
    if backend == "sqlite":
        return Store(f"sqlite:///{tmp_path / 'store.db'}")
    _reset_pg(PG_URL)
    return Store(PG_URL)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    s = open_store(request.param, tmp_path)
    yield s
    s.close()


@pytest.fixture
def two(store):
    store.create_tenant("acme")
    store.create_tenant("globex", allow_shared=True)
    return store


def test_migrations_run_from_empty_and_are_idempotent(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"tenants", "api_keys", "sessions", "messages", "reviews", "adapters", "runs",
            "alembic_version"} <= tables
    head = store_db.current_revision(store.engine)
    assert head is not None
    store_db.upgrade(store.engine)  # a second open changes nothing
    assert store_db.current_revision(store.engine) == head


def test_sqlite_pragmas(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'p.db'}")
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_default_url_comes_from_config(monkeypatch, tmp_path):
    monkeypatch.setenv("ONTHEJOB_DB", f"sqlite:///{tmp_path / 'env.db'}")
    Store().create_tenant("x")
    assert (tmp_path / "env.db").exists()


def test_tenants_and_keys_are_hashed(two):
    key = two.create_key("acme")
    admin = two.create_key("acme", admin=True)
    assert key.startswith("otj-") and len(key) > 40
    assert two.authenticate(key) == (two.get_tenant("acme"), False)
    assert two.authenticate(admin)[1] is True
    assert two.tenant_for_key(key).name == "acme"
    assert two.tenant_for_key(key + "x") is None
    assert two.tenant_for_key("otj-" + "a" * 43) is None
    assert two.tenant_for_key("") is None
    with two.engine.connect() as conn:
        stored = [r[0] for r in conn.execute(text("SELECT key_hash FROM api_keys"))]
        assert key not in stored and keys.key_hash(key) in stored
        dump = " ".join(str(v) for r in conn.execute(text("SELECT * FROM api_keys")) for v in r)
        assert key not in dump
    assert two.revoke_key("acme", key[:12]) == 1
    assert two.tenant_for_key(key) is None
    assert [k.revoked for k in two.list_keys("acme")] == [True, False]
    with pytest.raises(Conflict):
        two.create_tenant("acme")
    with pytest.raises(ValueError, match="not allowed"):
        two.create_tenant("Bad Name")
    with pytest.raises(NotFound, match="tenants add"):
        two.create_key("nobody")
    assert [t.name for t in two.shared_tenants()] == ["globex"]


def test_sessions_messages_and_isolation(two):
    s = two.create_session("acme", "first", [NewMessage("system", "be brief")])
    m = two.add_message("acme", s.id, "user", "hello", meta={"client": "test"})
    assert (m.seq, m.role, m.kind, m.meta) == (1, "user", "message", {"client": "test"})
    two.add_messages("acme", s.id, [NewMessage("assistant", "hi"),
                                    NewMessage("assistant", "ls", kind="tool_call"),
                                    NewMessage("tool", "a.txt", kind="observation")])
    assert [x.seq for x in two.messages("acme", s.id)] == [0, 1, 2, 3, 4]
    got = two.get_session("acme", s.id)
    assert got.message_count == 5 and got.status == "open" and got.title == "first"
    assert [x.id for x in two.list_sessions("acme")] == [s.id]
    # Another tenant sees nothing, and a foreign id fails exactly like an unknown one.
    assert two.list_sessions("globex") == []
    errors = []
    for sid in (s.id, "00000000-0000-4000-8000-000000000000", "not-a-uuid", "' OR 1=1 --"):
        for call in (lambda i: two.get_session("globex", i), lambda i: two.messages("globex", i),
                     lambda i: two.add_message("globex", i, "user", "x"),
                     lambda i: two.set_review("globex", i, "up", ""),
                     lambda i: two.end_session("globex", i)):
            with pytest.raises(NotFound) as err:
                call(sid)
            errors.append(str(err.value).replace(repr(sid), "ID"))
    assert len(set(errors)) == 1
    assert len(two.messages("acme", s.id)) == 5  # nothing was added by the refused calls


def test_add_messages_is_all_or_nothing(two):
    s = two.create_session("acme")
    with pytest.raises(ValueError, match="role"):
        two.add_messages("acme", s.id, [NewMessage("user", "ok"), NewMessage("wizard", "no")])
    assert two.messages("acme", s.id) == []
    two.end_session("acme", s.id)
    with pytest.raises(Conflict, match="ended"):
        two.add_message("acme", s.id, "user", "late")
    assert two.end_session("acme", s.id).status == "ended"


def test_concurrent_appends_get_distinct_seqs(two):
    s = two.create_session("acme")
    errors = []

    def writer(n):
        try:
            for i in range(10):
                two.add_message("acme", s.id, "user", f"{n}-{i}")
        except Exception as exc:  # noqa: BLE001 - the test reports any failure below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = two.messages("acme", s.id)
    assert [m.seq for m in stored] == list(range(40))
    assert len({m.content for m in stored}) == 40


def test_reviews_change_until_consolidated(two):
    s = two.create_session("acme")
    with pytest.raises(ValueError, match="verdict"):
        two.set_review("acme", s.id, "meh", "")
    assert two.get_review("acme", s.id) is None
    two.set_review("acme", s.id, "down", "wrong")
    assert two.sessions_to_consolidate("acme") == []
    r = two.set_review("acme", s.id, "up", "good after all")
    assert (r.verdict, r.text) == ("up", "good after all")
    assert [x.id for x in two.sessions_to_consolidate("acme")] == [s.id]  # open sessions count
    a = two.add_adapter("tenant", "acme", method="opsd", path="/x", checksum="c" * 64)
    two.mark_consolidated("acme", [s.id], a.id)
    two.mark_consolidated("acme", [s.id], a.id)  # idempotent
    assert two.sessions_to_consolidate("acme") == []
    with pytest.raises(Conflict, match="consolidated"):
        two.set_review("acme", s.id, "down", "too late")
    assert two.get_review("acme", s.id).verdict == "up"


def test_mark_consolidated_is_atomic_and_scoped(two):
    ok = two.create_session("acme")
    down = two.create_session("acme")
    two.set_review("acme", ok.id, "up", "")
    two.set_review("acme", down.id, "down", "")
    a = two.add_adapter("tenant", "acme", method="opsd", path="/x", checksum="c")
    b = two.add_adapter("tenant", "globex", method="opsd", path="/y", checksum="c")
    with pytest.raises(Conflict, match="not approved"):
        two.mark_consolidated("acme", [ok.id, down.id], a.id)
    assert two.get_session("acme", ok.id).consolidated_adapter_id is None  # rolled back
    with pytest.raises(NotFound):
        two.mark_consolidated("globex", [ok.id], b.id)  # not globex's session
    with pytest.raises(NotFound):
        two.mark_consolidated("acme", [ok.id], b.id)  # not acme's adapter
    two.mark_consolidated("acme", [ok.id], a.id)
    a2 = two.add_adapter("tenant", "acme", method="opsd", path="/z", checksum="c")
    with pytest.raises(Conflict, match="already"):
        two.mark_consolidated("acme", [ok.id], a2.id)


def test_adapter_versions_activation_and_rollback(two):
    assert two.next_adapter_version("tenant", "acme") == 1
    v1 = two.add_adapter("tenant", "acme", method="opsd", path="/a1", checksum="1",
                         metrics={"kl": 0.1})
    v2 = two.add_adapter("tenant", "acme", method="opsd", path="/a2", checksum="2",
                         parent_id=v1.id)
    g1 = two.add_adapter("tenant", "globex", method="sft", path="/g1", checksum="g")
    s1 = two.add_adapter("shared", None, method="opsd", path="/s1", checksum="s")
    assert (v1.version, v2.version, g1.version, s1.version) == (1, 2, 1, 1)
    assert s1.tenant is None and v1.tenant == "acme"
    assert two.active_adapter("acme") is None
    two.activate_adapter(v1.id)
    two.activate_adapter(g1.id)
    two.activate_adapter(s1.id)
    assert two.active_adapter("acme").id == v1.id
    assert two.active_adapter("globex").id == g1.id
    assert two.active_adapter(None, scope="shared").id == s1.id
    two.activate_adapter(v2.id)
    assert two.active_adapter("acme").id == v2.id
    assert two.get_adapter(v1.id).status == "retired"
    assert two.get_adapter(g1.id).status == "active"  # other tenants untouched
    with pytest.raises(NotFound):
        two.get_adapter(v1.id, tenant="globex")
    assert two.get_adapter(s1.id, tenant="globex").scope == "shared"
    restored = two.rollback_adapter("acme")
    assert restored.id == v1.id and two.active_adapter("acme").id == v1.id
    assert two.get_adapter(v2.id).status == "retired"
    rej = two.set_adapter_status(v2.id, "rejected", "forgot too much", {"forget": 0.3})
    assert (rej.status, rej.reason, rej.metrics) == ("rejected", "forgot too much", {"forget": 0.3})
    with pytest.raises(ValueError, match="activate_adapter"):
        two.set_adapter_status(v2.id, "active")
    assert [a.version for a in two.list_adapters("tenant", "acme")] == [1, 2]
    with pytest.raises(Conflict):
        two.add_adapter("tenant", "acme", method="x", path="/dup", checksum="d", version=2)
    with pytest.raises(NotFound):
        two.add_adapter("tenant", "acme", method="x", path="/p", checksum="d", parent_id=g1.id)


def test_database_allows_one_active_adapter_per_scope(two):
    a = two.add_adapter("tenant", "acme", method="x", path="/1", checksum="1")
    b = two.add_adapter("tenant", "acme", method="x", path="/2", checksum="2")
    two.activate_adapter(a.id)
    with pytest.raises(Exception, match="(?i)unique|duplicate"), two.engine.begin() as conn:
        conn.execute(text("UPDATE adapters SET status = 'active' WHERE id = :i"), {"i": b.id})
    assert two.active_adapter("acme").id == a.id


def test_runs(two):
    run = two.create_run("consolidate", "acme", {"method": "opsd"})
    assert run.status == "running" and run.tenant == "acme"
    run = two.update_run(run.id, progress={"step": 3})
    run = two.update_run(run.id, progress={"loss": 0.5})
    assert run.progress == {"step": 3, "loss": 0.5}
    done = two.update_run(run.id, status="done")
    assert done.ended_at is not None
    stale = two.create_run("grind")
    assert [r.id for r in two.list_runs(kind="grind")] == [stale.id]
    later = stale.heartbeat_at + timedelta(hours=1)
    marked = two.interrupt_stale_runs(timedelta(minutes=5), now=later)
    assert [r.id for r in marked] == [stale.id]
    assert two.get_run(stale.id).status == "interrupted"
    assert two.get_run(run.id).status == "done"
    with pytest.raises(ValueError):
        two.update_run(run.id, status="exploded")
    with pytest.raises(NotFound):
        two.get_run(10_000)


def test_context_rule_uses_latest_compaction(two):
    s = two.create_session("acme", messages=[
        NewMessage("system", "be brief"), NewMessage("user", "q1"), NewMessage("assistant", "a1"),
        NewMessage("system", "old summary", kind="compaction"), NewMessage("user", "q2"),
        NewMessage("assistant", "a2"), NewMessage("system", "new summary", kind="compaction"),
        NewMessage("user", "q3"), NewMessage("assistant", "run", kind="tool_call"),
        NewMessage("tool", "out", kind="observation")])
    ctx = context_messages(two.messages("acme", s.id))
    assert [m["role"] for m in ctx] == ["system", "system", "user", "assistant", "tool"]
    assert ctx[0]["content"] == "be brief"
    assert ctx[1]["content"].endswith("new summary") and "q2" not in str(ctx)
    assert ctx[2]["content"] == "q3"
    plain = two.create_session("acme", messages=[NewMessage("user", "hi")])
    assert context_messages(two.messages("acme", plain.id)) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_keys_migration_keeps_existing_keys(backend, tmp_path):
    """0002 lets a key belong to no tenant; a database made before it keeps its keys."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else PG_URL
    if backend == "postgresql":
        _reset_pg(url)
    old = Store(url, migrate=False)
    store_db.upgrade(old.engine, "0001")
    old.create_tenant("acme")
    key = old.create_key("acme", admin=True)
    old.close()
    store = Store(url)  # opening upgrades to the head
    assert store_db.current_revision(store.engine) == _head()
    assert store.authenticate(key) == (store.get_tenant("acme"), True)
    operator = store.create_operator_key()
    assert store.authenticate(operator) == (None, True)
    assert [k.tenant for k in store.list_operator_keys()] == [None]
    assert [k.tenant for k in store.list_keys("acme")] == ["acme"]
    store.close()


def test_answers_keep_their_log_probs_beside_them(two):
    from onthejob.store import logprobs

    tops = [[(7, -0.25), (3, -1.5), (9, -3.0)], [(8, -0.125), (2, -2.0), (1, -7.5)]]
    data = logprobs.encode([7, 8], tops, stop_top=[(0, -0.01), (4, -5.0), (5, -6.0)], k=2)
    # 13 bytes of header, 2-byte ids (all below 65536), and the end-of-turn row.
    assert len(data) == 13 + 2 * logprobs.bytes_per_token(2) + 4 * 2
    wide = logprobs.encode([70_000], [[(70_000, -0.5), (1, -2.0)]], k=2)
    assert len(wide) == 13 + logprobs.bytes_per_token(2, vocab=151_936)
    assert logprobs.decode(wide).token_ids == [70_000] and not logprobs.decode(wide).ended
    s = two.create_session("acme", messages=[NewMessage("user", "hi")])
    answer = two.add_messages("acme", s.id, [NewMessage("assistant", "yo", logprobs=data)])[0]
    plain = two.add_message("acme", s.id, "assistant", "again")
    assert two.kept_logprobs("acme", s.id) == {answer.id: data}
    kept = logprobs.decode(two.kept_logprobs("acme", s.id)[answer.id])
    assert kept.token_ids == [7, 8] and kept.ended and kept.k == 2 and kept.rows == 3
    assert kept.top_ids == [[7, 3], [8, 2], [0, 4]]
    assert kept.top_logprobs == [[-0.25, -1.5], [-0.125, -2.0], [pytest.approx(-0.01, rel=1e-3), -5.0]]
    # Reading the session does not carry them; another tenant cannot see them.
    assert [m.id for m in two.messages("acme", s.id)] == [answer.id - 1, answer.id, plain.id]
    with pytest.raises(NotFound):
        two.kept_logprobs("globex", s.id)
    with pytest.raises(ValueError, match="only an assistant"):
        two.add_messages("acme", s.id, [NewMessage("user", "x", logprobs=data)])
    with pytest.raises(ValueError, match="not kept log-probs"):
        two.add_messages("acme", s.id, [NewMessage("assistant", "x", logprobs=b"junk")])
    with pytest.raises(ValueError, match="take"):
        two.add_messages("acme", s.id, [NewMessage("assistant", "x", logprobs=data[:-2])])
    assert len(two.messages("acme", s.id)) == 3  # refused whole
