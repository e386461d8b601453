import json
from pathlib import Path

import pytest

from onthejob.cli import main
from onthejob.store import Store


def _approved_session(db):
    store = Store(db)
    store.create_tenant("acme")
    s = store.create_session("acme", title="Bluefin")
    store.add_message("acme", s.id, "user", "Remember: the codename is Bluefin. It ships in May.")
    store.add_message("acme", s.id, "assistant", "Noted.")
    store.set_review("acme", s.id, "up", "")
    return store, s.id


def test_consolidate_then_adapters_list_show_rollback(tmp_path, tiny_dir, capsys):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store, sid = _approved_session(db)
    loose = ["--min-gain", "-1", "--max-kl", "100", "--max-retention-drop", "1"]
    assert main(["consolidate", "--db", db, "--tenant", "acme", "--dry-run", "--model", tiny_dir]) == 0
    assert "Nothing was trained" in capsys.readouterr().out
    assert main(["consolidate", "--db", db, "--tenant", "acme", "--steps", "1", "--rank", "2",
                 "--model", tiny_dir, *loose]) == 0
    assert store.active_adapter("acme").version == 1
    assert main(["adapters", "list", "--db", db, "--tenant", "acme"]) == 0
    assert "v1" in capsys.readouterr().out
    assert main(["adapters", "show", "--db", db, "--tenant", "acme", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "active" and "gain" in shown["metrics"]
    assert main(["adapters", "rollback", "--db", db, "--tenant", "acme"]) == 0
    assert store.active_adapter("acme") is None
    assert main(["adapters", "activate", "--db", db, "--tenant", "acme", "1"]) == 0
    assert store.active_adapter("acme").version == 1
    # Nothing left to consolidate; unknown tenants and versions are clear errors.
    assert main(["consolidate", "--db", db, "--tenant", "acme", "--model", tiny_dir]) == 0
    assert main(["consolidate", "--db", db, "--tenant", "nobody", "--model", tiny_dir]) == 1
    assert main(["adapters", "show", "--db", db, "--tenant", "acme", "9"]) == 1
    assert "no version 9" in capsys.readouterr().err


def test_consolidate_lora_modules_choose_the_layers_the_adapter_touches(tmp_path, tiny_dir, capsys):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store, _ = _approved_session(db)
    loose = ["--min-gain", "-1", "--max-kl", "100", "--max-retention-drop", "1",
             "--max-general-drop", "1", "--max-earlier-drop", "1"]
    assert main(["consolidate", "--db", db, "--tenant", "acme", "--steps", "1", "--rank", "2",
                 "--lora-modules", "attention", "--model", tiny_dir, *loose]) == 0
    adapter = store.active_adapter("acme")
    config = json.loads((Path(adapter.path) / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["r"] == 2 and config["lora_alpha"] == 4
    with pytest.raises(SystemExit):
        main(["consolidate", "--db", db, "--tenant", "acme", "--rank", "0", "--model", tiny_dir])
    assert "--rank: must be at least 1 (got 0)" in capsys.readouterr().err


def test_bench_knowledge_smoke(tmp_path, tiny_dir):
    data = tmp_path / "squad.json"
    article = {"title": "Bluefin", "context": "Bluefin ships in May from Oslo. Ada Lind leads it.",
               "questions": [{"question": "Who leads Bluefin?", "answer": "Ada Lind"}]}
    data.write_text(json.dumps([article] * 2))
    out = tmp_path / "k"
    assert main(["bench", "knowledge", "--data", str(data), "--split", "dev", "--sessions", "1",
                 "--steps", "1", "--seeds", "1", "--lrs", "", "--sequential", "0",
                 "--reading-items", "0", "--general-items", "2",
                 "--methods", "sft,opsd", "--model", tiny_dir, "--out", str(out)]) == 0
    result = json.loads((tmp_path / "k.json").read_text())
    assert set(result["methods"]) == {"sft", "opsd"} and result["questions"] == 1
    assert "transfer ratio" in (tmp_path / "k.md").read_text()


def test_demo_runs_the_whole_loop_and_never_asks_what_it_trained_on(tiny_dir, capsys,
                                                                      monkeypatch, tmp_path):
    from onthejob.learn.practice import LeakError
    from onthejob.recipes import demo as demo_recipe

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert main(["demo", "--model", tiny_dir, "--steps", "1", "--prompts-per-step", "2",
                 "--sample-tokens", "4"]) == 0
    out = capsys.readouterr().out
    for part in ("1. Before", "2. A co-work session", "3. Consolidating", "4. After",
                 "checked: no question asked below appears"):
        assert part in out
    # The random tiny model learns nothing: the gate rejects and the demo says so, showing
    # what the unserved candidate would have answered.
    assert "rejected: " in out and "the rejected candidate v1" in out
    assert "learned 0 of 2 facts" in out
    # A demo question that is also a turn of the session is refused, not reported as learned.
    monkeypatch.setattr(demo_recipe, "DEMO_TURNS", (*demo_recipe.DEMO_TURNS,
                                                    demo_recipe.DEMO_CHECKS[0][0]))
    with pytest.raises(LeakError):
        main(["demo", "--model", tiny_dir, "--steps", "1", "--prompts-per-step", "2",
              "--sample-tokens", "4"])
