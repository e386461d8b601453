"""`onthejob bench load`: concurrent clients against a real server process; counts every
acknowledged message in the store. Writes a markdown report (and JSON beside it)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from onthejob.envs.cli import bench_subparsers


def register(sub: argparse._SubParsersAction) -> None:
    bsub = bench_subparsers(sub)
    p = bsub.add_parser(
        "load", help="concurrent clients against a real server; nothing acknowledged is lost",
        description="Start `onthejob serve` on a loopback port, run N concurrent clients that "
        "each send M chat turns in sessions (a share streamed), stop by itself, then count "
        "acknowledged messages against the store (each must be stored exactly once), 5xx "
        "responses, p50/p99 latency and throughput.")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--requests", type=int, default=10, help="requests per client (default: 10)")
    p.add_argument("--db", metavar="URL", help="database URL, e.g. postgresql+psycopg2://... "
                   "(default: a fresh SQLite file in a temporary directory)")
    p.add_argument("--model", default="tiny", help="'tiny' (random weights, real tokenizer: "
                   "measures the service, not the model), 'default', or a local model directory")
    p.add_argument("--max-tokens", type=int, default=8, help="answer length per request")
    p.add_argument("--stream-share", type=float, default=0.5,
                   help="share of requests sent with stream=true (default: 0.5)")
    p.add_argument("--out", default="docs/results/load.md", help="markdown file to write")
    p.set_defaults(func=_load)

    st = bsub.add_parser(
        "streams", help="one streaming client, then N at once, against a real server",
        description="Start `onthejob serve` on a loopback port and stream greedy answers: one "
        "client alone, then N at once on the same prompts; tokens/s per stream and in all, "
        "time to first token, p50/p99 latency. Each --batching given is measured with its own "
        "server, one after another.")
    st.add_argument("--streams", type=int, default=8, help="concurrent streams (default: 8)")
    st.add_argument("--max-tokens", type=int, default=64, help="tokens asked per stream "
                    "(default: 64)")
    st.add_argument("--model", default="default", help="'default' (the embedded model), 'tiny' "
                    "or a local model directory (default: default)")
    st.add_argument("--engine", default="torch", help="the server's --engine (default: torch)")
    st.add_argument("--precision", default="float32", choices=("auto", "float32", "bfloat16", "int8"),
                    help="the server's --precision (default: %(default)s, `onthejob serve`'s)")
    st.add_argument("--compile", action="store_true",
                    help="the server's --compile (compiled decode steps; minutes to start)")
    st.add_argument("--batching", default="continuous,per-call",
                    help="comma-separated server --batching modes (default: continuous,per-call)")
    st.add_argument("--out", default="docs/results/streams.md", help="markdown file to write "
                    "(JSON beside it)")
    st.set_defaults(func=_streams)


def _streams(args: argparse.Namespace) -> int:
    from onthejob.bench.streams import StreamsConfig, markdown, run

    modes = [m for m in args.batching.split(",") if m]
    if args.streams < 1 or args.max_tokens < 1 or not modes \
            or any(m not in ("continuous", "per-call") for m in modes):
        print("error: --streams and --max-tokens must be at least 1 and --batching a list of "
              "continuous, per-call", file=sys.stderr)
        return 2
    results = []
    for mode in modes:
        cfg = StreamsConfig(streams=args.streams, max_tokens=args.max_tokens, model=args.model,
                            batching=mode, engine=args.engine, precision=args.precision,
                            compile=args.compile)
        try:
            results.append(run(cfg, say=lambda s: print(s, flush=True)))
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    _write(args.out, markdown(results, _command()), results)
    return 0


def _command() -> str:
    return "onthejob " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _write(path: str, text: str, data: object) -> None:
    """The markdown report at `path`, its data as JSON beside it; the report printed."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    print(text)
    print(f"wrote {out}")


def _load(args: argparse.Namespace) -> int:
    from onthejob.bench.load import LoadConfig, markdown, run

    if args.clients < 1 or args.requests < 1 or not 0 <= args.stream_share <= 1:
        print("error: --clients and --requests must be at least 1 and --stream-share in [0, 1]",
              file=sys.stderr)
        return 2
    cfg = LoadConfig(clients=args.clients, requests=args.requests, db=args.db, model=args.model,
                     max_tokens=args.max_tokens, stream_share=args.stream_share)
    try:
        result = run(cfg, say=lambda s: print(s, flush=True))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _write(args.out, markdown(result, _command()), result.summary())
    return 0 if result.lost == 0 and result.server_errors == 0 else 3
