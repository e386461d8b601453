"""The `onthejob` command. Each package adds its own subcommands through `register(sub)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

# Modules that define subcommands, lowest layer first. Each has `register(subparsers)`.
COMMAND_MODULES = (
    "onthejob.model.cli",
    "onthejob.store.cli",
    "onthejob.envs.cli",
    "onthejob.serve.cli",
    "onthejob.learn.cli",
    "onthejob.dream.cli",
    "onthejob.learn.grind_cli",
    "onthejob.bench.model_cli",
    "onthejob.bench.load_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onthejob",
        description="A language model that learns on the job: co-work sessions, reviews, "
        "consolidation into per-tenant adapters, grindable environments and dreaming.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
