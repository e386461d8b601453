"""`onthejob model ...`: prepare and inspect the model."""

from __future__ import annotations

import argparse
import time

from onthejob.model.load import default_model_dir, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="prepare or inspect the model",
                       description="Prepare (convert once) or inspect the model.")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prep = msub.add_parser("prepare", help="convert the embedded default model into the cache",
                           description="Convert the embedded GGUF default model once into a "
                           "cached safetensors directory (ONTHEJOB_MODELS, else "
                           "~/.cache/onthejob/models; shared by every ONTHEJOB_HOME).")
    prep.set_defaults(func=_prepare)
    info = msub.add_parser("info", help="print the model's facts",
                           description="Load a model and print its name, path and context.")
    info.add_argument("--model", help="a local Hugging Face model directory (default: embedded)")
    info.set_defaults(func=_info)


def _prepare(args: argparse.Namespace) -> int:
    started = time.time()
    path = default_model_dir()
    print(f"default model ready at {path} ({time.time() - started:.1f} s)")
    return 0


def _info(args: argparse.Namespace) -> int:
    started = time.time()
    lm = load_model(args.model)
    n = sum(p.numel() for p in lm.model.parameters())
    print(f"name: {lm.name}\npath: {lm.path}\nparameters: {n:,}\n"
          f"context: {lm.context_length} tokens\nloaded in {time.time() - started:.2f} s")
    return 0
