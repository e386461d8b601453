"""What a newcomer meets first: `onthejob --help` answers at once (no torch imported for it),
the command table agrees with the commands, help shows the gate's thresholds and defaults, the
demo says where its store is, and a new ONTHEJOB_HOME reuses the converted model."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onthejob import config
from onthejob.cli import COMMANDS, build_parser, main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _modules_after(argv: list[str]) -> set[str]:
    """The heavy packages imported by running the CLI's parser on argv, in a fresh process."""
    code = (f"import sys\nfrom onthejob.cli import main\ntry:\n    main({argv!r})\n"
            "except SystemExit:\n    pass\n"
            "heavy = ('torch', 'transformers', 'peft', 'numpy', 'ray', 'fastapi')\n"
            "print(' '.join(sorted(m for m in heavy if m in sys.modules)))")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: onthejob" in done.stdout
    return set(done.stdout.split("\n")[-2].split())


def test_help_imports_no_torch():
    assert "torch" not in _modules_after(["--help"])
    assert "torch" not in _modules_after(["-v"])  # no command: the help, exit 2


@pytest.mark.parametrize("argv", [["tenants", "--help"], ["keys", "add", "--help"],
                                  ["sessions", "list", "--help"], ["envs", "--help"]])
def test_light_commands_import_no_model_code(argv):
    assert _modules_after(argv).isdisjoint({"torch", "transformers", "peft"})


def test_the_command_table_agrees_with_what_the_modules_register():
    full = build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    registered = {a.dest: a.help for a in sub._choices_actions}
    assert registered == {name: help_text for name, (_, help_text) in COMMANDS.items()}
    for name, (modules, _) in COMMANDS.items():  # each command's modules register it
        lazy = build_parser([name])
        lazy_sub = next(a for a in lazy._actions if isinstance(a, argparse._SubParsersAction))
        assert lazy_sub.choices[name]._actions, name
        assert set(lazy_sub.choices) == set(COMMANDS)
        assert all(m in sys.modules for m in modules)


def test_an_unknown_command_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as done:
        main(["consolidat"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'consolidat'" in err and "consolidate" in err


@pytest.mark.parametrize("command", ["consolidate", "dream"])
def test_help_shows_the_gate_thresholds_and_defaults(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "promotion gate:" in out
    for option, default in (("--min-gain", "0.02"), ("--max-kl", "0.5"),
                            ("--max-retention-drop", "0.15"), ("--max-earlier-drop", "0.1"),
                            ("--rank", "16"), ("--anchor-share", "0.25")):
        assert re.search(rf"{option} [A-Z_]+ [^()]*\(default:? {default}\)", out), option
    assert re.search(r"--lr LR learning rate \(default:? 0.00[13]\)", out)
    assert re.search(r"--seed SEED training (and gate )?seed \(default: 0\)", out)
    assert not re.search(r"\(default: (None|False|\(\))\)", out)  # no empty defaults


def test_gate_options_reach_the_gate():
    from onthejob.learn.cli import _options

    args = build_parser(["consolidate"]).parse_args(
        ["consolidate", "--tenant", "acme", "--min-gain", "0.05", "--max-kl", "0.3",
         "--max-retention-drop", "0.2", "--max-earlier-drop", "0.25", "--self-anchors", "64"])
    gate = _options(args).gate
    assert (gate.min_gain, gate.max_kl, gate.max_retention_drop, gate.max_earlier_drop) == \
        (0.05, 0.3, 0.2, 0.25)
    assert _options(args).opsd.self_anchors == 64


def test_the_demo_keeps_its_store_under_onthejob_home_and_says_where(monkeypatch, tmp_path):
    from onthejob.recipes.demo import use_demo_home

    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ONTHEJOB_DB", "sqlite:///elsewhere.db")
    said = use_demo_home(keep=False)
    folder = config.home()
    assert folder.parent == tmp_path / "home" / "demos" and folder.is_dir()
    assert str(folder) in said and "--keep" in said
    assert config.database_url() == f"sqlite:///{folder / 'onthejob.db'}"  # its own store
    second = use_demo_home(keep=False)  # (now under the first one's home: still findable)
    assert config.home() != folder and str(config.home()) in second
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    kept = use_demo_home(keep=True)
    assert config.home() == tmp_path / "home" and str(tmp_path / "home") in kept


def test_a_new_onthejob_home_reuses_the_converted_model(monkeypatch, tmp_path):
    from onthejob.model.load import DEFAULT_MODEL_NAME, ModelError, default_model_dir

    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("ONTHEJOB_MODELS", raising=False)
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "first"))
    cache = tmp_path / "user" / ".cache" / "onthejob" / "models" / DEFAULT_MODEL_NAME
    with pytest.raises(ModelError, match=str(cache)):
        default_model_dir(convert=False)
    cache.mkdir(parents=True)  # as a conversion leaves it
    (cache / "model.safetensors").write_bytes(b"x")
    (cache / "config.json").write_text("{}")
    assert default_model_dir(convert=False) == cache
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "second"))
    assert default_model_dir(convert=False) == cache  # found, not converted again
    monkeypatch.setenv("ONTHEJOB_MODELS", str(tmp_path / "mine"))
    assert config.models_dir() == tmp_path / "mine"


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("onthejob",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_every_command_help_formats():
    """A stray % in a help string crashes `--help` only when that help is printed."""
    broken = []
    for path, parser in _parsers(build_parser()):
        try:
            parser.format_help()
        except (TypeError, ValueError, KeyError) as e:
            broken.append(f"{' '.join(path)}: {e}")
    assert not broken, broken
