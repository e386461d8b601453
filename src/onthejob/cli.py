"""The `onthejob` command. Each package adds its own subcommands through `register(sub)`.

Only the modules of the command being run are imported (several import torch, which takes
seconds and hundreds of MB): `onthejob --help` lists the commands from the table below, and
`onthejob tenants ...` never loads the model code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

# Every command: the modules that register it (lowest layer first) and its one-line help.
# tests/test_cli.py checks that this table agrees with what the modules register.
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "model": (("onthejob.model.cli",), "prepare or inspect the model"),
    "tenants": (("onthejob.store.cli",), "add, list or change tenants"),
    "keys": (("onthejob.store.cli",), "add, list or revoke API keys"),
    "sessions": (("onthejob.store.cli",), "list, show or export a tenant's sessions"),
    "runs": (("onthejob.store.cli",), "list long jobs or show one's live progress"),
    "envs": (("onthejob.envs.cli",), "list or play the grindable environments"),
    "replay": (("onthejob.envs.cli",), "replay a run's logged rollouts and check them"),
    "serve": (("onthejob.serve.cli",), "run the OpenAI-compatible HTTP server"),
    "chat": (("onthejob.serve.cli",), "a terminal co-work session with the model"),
    "consolidate": (("onthejob.learn.cli",), "learn approved sessions into an adapter"),
    "adapters": (("onthejob.learn.cli",), "list, show, activate or roll back adapters"),
    "demo": (("onthejob.learn.cli",), "the whole loop on the default model, end to end"),
    "dream": (("onthejob.dream.cli",), "write practice tasks from a session and train on them"),
    "grind": (("onthejob.learn.grind_cli",), "train an adapter with GRPO in an environment"),
    "bench": (("onthejob.envs.cli", "onthejob.dream.cli", "onthejob.bench.model_cli",
               "onthejob.bench.load_cli", "onthejob.bench.conventions_cli"), "run a benchmark"),
}
COMMAND_MODULES = tuple(dict.fromkeys(m for modules, _ in COMMANDS.values() for m in modules))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless the help says it already or the
    default says nothing (None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        says_nothing = action.default is None or action.default is False \
            or action.default is argparse.SUPPRESS or action.default in ((), [], "")
        if says_nothing or "default" in help_text.lower():  # (0 is a default worth showing)
            return help_text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every command in full, or only `commands` in full (the others listed
    by name and help, their modules not imported)."""
    parser = Parser(
        prog="onthejob",
        description="A language model that learns on the job: co-work sessions, reviews, "
        "consolidation into per-tenant adapters, grindable environments and dreaming.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    wanted = COMMAND_MODULES if commands is None else \
        [m for name in commands if name in COMMANDS for m in COMMANDS[name][0]]
    for name in COMMAND_MODULES:
        if name in wanted:
            importlib.import_module(name).register(sub)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv: its first word that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A job runner's log (stdout a file or a pipe) gets each line as it is said, not a block
    # at a time half an hour later.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    command = _command_of(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # a deprecation notice from transformers on every adapter swap
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
