"""`onthejob chat` end to end through the CLI, with the tiny model saved as a model directory."""

from __future__ import annotations

import io
import sys

from onthejob.cli import main
from onthejob.store import Store


def test_chat_command(tiny_dir, tmp_path, monkeypatch, capsys):
    # tiny_dir, not the shared tiny_lm: other tests leave adapters attached to tiny_lm's model.
    model_dir = tiny_dir
    db = f"sqlite:///{tmp_path / 'c.db'}"
    Store(db).create_tenant("acme")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/review down off topic\n/end\n"))
    code = main(["chat", "--tenant", "acme", "--model", str(model_dir), "--db", db,
                 "--max-tokens", "5", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "review saved: thumbs down" in out and "ended" in out
    store = Store(db)
    [session] = store.list_sessions("acme")
    assert session.status == "ended" and session.message_count == 2
    assert store.get_review("acme", session.id).text == "off topic"

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "--tenant", "nobody", "--db", db]) == 1
    assert "tenants add nobody" in capsys.readouterr().err
    assert main(["chat", "--tenant", "acme", "--model", str(tmp_path / "missing"), "--db", db]) == 1
    assert "config.json" in capsys.readouterr().err
