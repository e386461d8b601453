"""`onthejob serve` (the HTTP server) and `onthejob chat` (a terminal co-work session)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from onthejob.store import NotFound, Store

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve POST /v1/chat/completions (OpenAI-compatible, streaming or not), "
        "/v1/models and /v1/sessions, and the review page at /review, on loopback. Clients "
        "authenticate with "
        "'Authorization: Bearer <key>' (`onthejob tenants add NAME` prints one) and group "
        "requests into a session with the X-Session-Id header or metadata.session_id.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", metavar="PATH", help="a local Hugging Face model directory "
                       "(default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--db", metavar="URL", help="database URL (default: ONTHEJOB_DB, else SQLite)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20,
                       help="larger request bodies get 413 (default: 1 MiB)")
    serve.add_argument("--default-max-tokens", type=int, default=256,
                       help="answer length when a request gives no max_tokens")
    _engine_options(serve)
    serve.add_argument("--batching", default="continuous", choices=("continuous", "per-call"),
                       help="continuous: requests join and leave a running decode batch between "
                       "steps (where the engine can; else per-call); per-call: one generate call "
                       "per group of same-parameter requests, streams one at a time; "
                       "default %(default)s")
    serve.add_argument("--max-batch", type=int, default=8,
                       help="rows decoded together at most (default %(default)s)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting beyond that get 503 (default %(default)s)")
    _keep_option(serve)
    serve.add_argument("--figures", metavar="DIR", help="the benchmark plots the review page "
                       "shows (default: ONTHEJOB_FIGURES, else docs/results of a source checkout)")
    serve.set_defaults(func=_serve)

    chat = sub.add_parser(
        "chat", help="a terminal co-work session with the model",
        description="Chat with the model in the terminal; answers stream as they are written. "
        "Commands: /review up|down [words], /compact, /end, /help. Ctrl-D leaves and keeps "
        "the session open. Everything said is stored as it is said.")
    chat.add_argument("--tenant", required=True, metavar="NAME")
    chat.add_argument("--session", metavar="ID", help="resume this open session")
    chat.add_argument("--model", metavar="PATH", help="a local Hugging Face model directory")
    chat.add_argument("--db", metavar="URL", help="database URL (default: ONTHEJOB_DB, else SQLite)")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--seed", type=int)
    _engine_options(chat)
    _keep_option(chat)
    chat.set_defaults(func=_chat)


def _keep_top_k(text: str) -> int:
    from onthejob.model.generate import MAX_TOP_LOGPROBS

    try:
        k = int(text)
    except ValueError:
        k = -1
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_TOP_LOGPROBS}, "
                                         f"not {text!r}")
    return k


def _keep_option(parser: argparse.ArgumentParser) -> None:
    from onthejob.serve.turns import DEFAULT_KEEP_TOP_K
    from onthejob.store.logprobs import bytes_per_token

    parser.add_argument(
        "--keep-top-k", type=_keep_top_k, default=DEFAULT_KEEP_TOP_K, metavar="K",
        help="keep each stored answer's token ids and top-K log-probs per token, which "
        "consolidation reuses as teacher rows instead of scoring the answer again (default: "
        f"%(default)s, OPSD's top_k; {bytes_per_token(DEFAULT_KEEP_TOP_K)} bytes a token in "
        f"the database for a vocabulary under 65,536, "
        f"{bytes_per_token(DEFAULT_KEEP_TOP_K, 1 << 17)} above; 0 keeps none)")


def _engine_options(parser: argparse.ArgumentParser) -> None:
    from onthejob.model.engine import ENGINES, OPTIONAL, PRECISIONS

    parser.add_argument("--engine", default="torch", choices=sorted({*ENGINES, *OPTIONAL}),
                        help="what runs the model: torch, or llamacpp (llama.cpp on the shipped "
                        "GGUF, each request's adapters exported to GGUF LoRA; needs "
                        "llama-cpp-python) (default: %(default)s)")
    parser.add_argument("--precision", default="float32", choices=["auto", *sorted(PRECISIONS)],
                        help="the torch engine's matrix products: float32 reproduces the model "
                        "exactly; bfloat16 reads half the bytes a step and int8 (weight-only: "
                        "int8 weights, a scale per output channel, bf16 activations) a quarter; "
                        "which is fastest depends on the CPU (docs/RESULTS.md, 'Weight-only "
                        "int8'); auto times them at start-up (a few seconds) and keeps the "
                        "fastest one stream, a lower precision only where it is at least 1.1x "
                        "float32's rate at batch 1 and no slower at batch 8 "
                        "(default %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="the torch engine's decode steps through torch.compile: faster "
                        "steps (docs/RESULTS.md, 'Compiled decode steps') for minutes of "
                        "compiling at start-up, fewer once inductor's cache holds them")


def _backend(args: argparse.Namespace, lm):
    """The chosen GenerationEngine, or None (after saying why) when it cannot run here."""
    from onthejob.model.engine import (
        make_engine,
        pick_precision,
        precision_problem,
        precision_warning,
    )

    if args.precision == "auto" and args.engine == "torch":
        args.precision, rates = pick_precision(lm)
        measured = ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
        print(f"precision {args.precision}: " + (f"measured tokens/s ('@8': batch 8, else "
              f"batch 1): {measured}" if rates else "no lower precision can run here"),
              file=sys.stderr, flush=True)
    elif args.precision == "auto":
        args.precision = "float32"  # other engines have their own number formats
    problem = precision_problem(args.precision, lm.device) if args.engine == "torch" else None
    if problem:
        print(f"error: --precision {problem}", file=sys.stderr)
        return None
    warning = precision_warning(args.precision, lm.device) if args.engine == "torch" else None
    if warning:
        print(f"note: --precision {args.precision}: {warning}", file=sys.stderr, flush=True)
    if getattr(args, "compile", False) and args.engine != "torch":
        print(f"error: --compile is for the torch engine, not {args.engine}", file=sys.stderr)
        return None
    try:
        backend = make_engine(args.engine, lm, precision=args.precision)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if getattr(args, "compile", False):
        from onthejob.model.engine import warm_compiled

        print("compiling the decode steps (minutes the first time on a small CPU)...",
              file=sys.stderr, flush=True)
        try:
            # the widest batch too: beyond the int8 threshold it is another compiled graph
            seconds = warm_compiled(lm, (1, 2, getattr(args, "max_batch", 1)))
        except Exception as exc:  # noqa: BLE001 - inductor's failures are many; said plainly
            print(f"error: --compile failed ({type(exc).__name__}: {str(exc)[:300]}); serve "
                  "without --compile", file=sys.stderr)
            return None
        print(f"compiled in {seconds:.0f} s", file=sys.stderr, flush=True)
    return backend



def _open_store(url: str | None) -> Store | None:
    try:
        return Store(url)
    except Exception as exc:  # noqa: BLE001 - said plainly, with what to do
        print(f"error: cannot open the database {url or '(default)'}: {exc}; check --db or "
              "ONTHEJOB_DB", file=sys.stderr)
        return None


def _load(path: str | None):
    from onthejob.model import ModelError, load_model

    try:
        return load_model(path)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from onthejob.serve.app import create_app
    from onthejob.serve.engine import Engine
    from onthejob.serve.http import Limits

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        log.warning("listening on %s, beyond loopback: API keys travel in clear text unless a "
                    "TLS proxy sits in front", args.host)
    store = _open_store(args.db)
    if store is None:
        return 1
    lm = _load(args.model)
    if lm is None:
        return 1
    backend = _backend(args, lm)
    if backend is None:
        return 2
    if args.max_batch < 1 or args.max_queue < 1:
        print("--max-batch and --max-queue must be at least 1", file=sys.stderr)
        return 2
    engine = Engine(lm, backend=backend, max_batch=args.max_batch, max_queue=args.max_queue,
                    continuous=None if args.batching == "continuous" else False)
    app = create_app(lm, store, engine=engine,
                     limits=Limits(max_body_bytes=args.max_body_bytes,
                                   default_max_tokens=args.default_max_tokens),
                     figures=Path(args.figures) if args.figures else None,
                     keep_top_k=args.keep_top_k)
    batching = "continuous batching" if engine.continuous else "batching per call"
    print(f"serving {lm.name} on http://{args.host}:{args.port}/v1 with the {backend.name} engine, "
          f"{args.precision}, {batching} of up to {args.max_batch} (database: {store.url}); the review page: "
          f"http://{args.host}:{args.port}/review")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
        store.close()
    return 0


def _chat(args: argparse.Namespace) -> int:
    from onthejob.serve.chat import ChatError, ChatSettings, run_chat
    from onthejob.serve.engine import Engine

    store = _open_store(args.db)
    if store is None:
        return 1
    try:
        store.get_tenant(args.tenant)  # fail fast, before the model loads
    except NotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lm = _load(args.model)
    if lm is None:
        return 1
    backend = _backend(args, lm)
    if backend is None:
        return 2
    engine = Engine(lm, backend=backend)
    settings = ChatSettings(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed, keep_top_k=args.keep_top_k)
    try:
        run_chat(engine, store, args.tenant, args.session, stdin=sys.stdin, stdout=sys.stdout,
                 settings=settings)
    except ChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.close()
        store.close()
    return 0
