"""`onthejob tenants|keys|sessions`: what a user types, what they see."""

from __future__ import annotations

import json

import pytest

from onthejob.cli import build_parser, main
from onthejob.store import NewMessage, Store


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'cli.db'}"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_has_help(capsys):
    parser = build_parser()
    for command in ("tenants", "keys", "sessions", "serve", "chat"):
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command, "--help"])
        assert done.value.code == 0
    for path in (("tenants", "add"), ("keys", "add"), ("keys", "revoke"),
                 ("sessions", "list"), ("sessions", "show"), ("sessions", "export")):
        with pytest.raises(SystemExit):
            parser.parse_args([*path, "--help"])
        assert "usage:" in capsys.readouterr().out


def test_tenants_and_keys(capsys, db):
    code, out, _ = run(capsys, "tenants", "add", "acme", "--db", db)
    assert code == 0 and "shown once" in out
    key = out.strip().split()[-1]
    store = Store(db)
    assert store.tenant_for_key(key).name == "acme"
    code, _, err = run(capsys, "tenants", "add", "acme", "--db", db)
    assert code == 1 and "exists already" in err
    code, _, err = run(capsys, "tenants", "add", "Not OK", "--db", db)
    assert code == 1 and "not allowed" in err
    run(capsys, "tenants", "add", "globex", "--allow-shared", "--db", db)
    code, out, _ = run(capsys, "tenants", "list", "--db", db)
    assert out.splitlines()[0].startswith("acme\tprivate") and "globex\tshared" in out
    code, out, _ = run(capsys, "keys", "add", "--tenant", "acme", "--admin", "--db", db)
    admin = out.strip().split()[-1]
    assert store.authenticate(admin)[1] is True
    code, out, _ = run(capsys, "keys", "list", "--tenant", "acme", "--db", db)
    assert key not in out and key[:12] in out and "admin" in out
    code, out, _ = run(capsys, "keys", "revoke", "--tenant", "acme", key[:12], "--db", db)
    assert code == 0 and store.tenant_for_key(key) is None
    code, _, err = run(capsys, "keys", "add", "--tenant", "nobody", "--db", db)
    assert code == 1 and "tenants add nobody" in err


def test_sessions_list_show_export_are_tenant_scoped(capsys, db, tmp_path):
    store = Store(db)
    store.create_tenant("acme")
    store.create_tenant("globex")
    a = store.create_session("acme", "plan", [NewMessage("user", "secret"),
                                              NewMessage("assistant", "ok")])
    store.set_review("acme", a.id, "up", "good")
    b = store.create_session("globex", "other", [NewMessage("user", "hello")])
    code, out, _ = run(capsys, "sessions", "list", "--tenant", "acme", "--db", db)
    assert a.id in out and b.id not in out and "review up" in out
    code, out, _ = run(capsys, "sessions", "show", a.id, "--tenant", "acme", "--db", db)
    assert "[0] user: secret" in out and "review: up good" in out
    code, _, err = run(capsys, "sessions", "show", a.id, "--tenant", "globex", "--db", db)
    assert code == 1 and "no session" in err
    code, out, _ = run(capsys, "sessions", "export", "--tenant", "acme", "--db", db)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in records] == [a.id]
    assert [m["content"] for m in records[0]["messages"]] == ["secret", "ok"]
    assert records[0]["review"]["verdict"] == "up"
    path = tmp_path / "globex.jsonl"
    code, _, err = run(capsys, "sessions", "export", "--tenant", "globex", "--out", str(path),
                       "--db", db)
    assert "wrote 1 session" in err
    assert "secret" not in path.read_text() and b.id in path.read_text()
    code, _, err = run(capsys, "sessions", "export", "--tenant", "globex", "--session", a.id,
                       "--db", db)
    assert code == 1 and "no session" in err


def test_unreachable_database_is_said_plainly(capsys):
    code, _, err = run(capsys, "tenants", "list", "--db", "postgresql://nobody@127.0.0.1:1/none")
    assert code == 1 and "cannot open the database" in err


def test_operator_keys_belong_to_no_tenant(capsys, db):
    run(capsys, "tenants", "add", "acme", "--db", db)
    code, out, _ = run(capsys, "keys", "add", "--operator", "--db", db)
    assert code == 0 and "operator key" in out
    operator = out.strip().split()[-1]
    store = Store(db)
    assert store.authenticate(operator) == (None, True)
    assert store.tenant_for_key(operator) is None
    code, out, _ = run(capsys, "keys", "list", "--operator", "--db", db)
    assert operator[:12] in out and "operator" in out and operator not in out
    code, out, _ = run(capsys, "keys", "list", "--tenant", "acme", "--db", db)
    assert operator[:12] not in out  # not one of acme's keys
    code, _, err = run(capsys, "keys", "revoke", "--tenant", "acme", operator[:12], "--db", db)
    assert code == 1 and "no key" in err  # a tenant's revoke does not reach it
    code, out, _ = run(capsys, "keys", "revoke", "--operator", operator[:12], "--db", db)
    assert code == 0 and store.authenticate(operator) is None
    with pytest.raises(SystemExit):  # one owner: a tenant or the operator
        main(["keys", "add", "--db", db])
    assert "one of the arguments --tenant --operator is required" in capsys.readouterr().err


def test_tenants_set_gives_and_withdraws_consent_to_shared_learning(capsys, db):
    run(capsys, "tenants", "add", "acme", "--allow-shared", "--db", db)
    store = Store(db)
    code, out, _ = run(capsys, "tenants", "set", "acme", "--no-allow-shared", "--db", db)
    assert code == 0 and "withdrawn" in out
    assert store.get_tenant("acme").allow_shared is False and store.shared_tenants() == []
    code, out, _ = run(capsys, "tenants", "set", "acme", "--allow-shared", "--db", db)
    assert code == 0 and [t.name for t in store.shared_tenants()] == ["acme"]
    code, _, err = run(capsys, "tenants", "set", "nobody", "--allow-shared", "--db", db)
    assert code == 1 and "no tenant named 'nobody'" in err
