"""Streaming clients against a real `onthejob serve`: one stream alone, then N at once, on the
same prompts; tokens/s per stream and in all, time to first token and request latency (p50,
p99). This measures what a user of the server sees, batching included (continuous batching
lets the N streams share decode steps; per-call batching runs streams one at a time).

Each stream asks for `max_tokens` greedy tokens; the count is the server's own (usage in the
last chunk), so answers that end early count what they were.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from onthejob.bench.load import free_port, model_dir_for, start_server, stop_server
from onthejob.store import Store

PROMPTS = [
    "Explain how a bicycle's gears make climbing easier.",
    "Write a short note to a neighbour about a parcel you took in for them.",
    "What should I pack for a weekend of hiking in the mountains?",
    "Describe how bread rises, for a child.",
    "Give three tips for a first job interview.",
    "Why do leaves change colour in autumn?",
    "Summarise the rules of chess in a few sentences.",
    "How does a refrigerator keep food cold?",
]


@dataclass
class StreamTimes:
    tokens: int
    first_token_s: float
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0


async def _one(http: httpx.AsyncClient, key: str, model: str, prompt: str,
               max_tokens: int) -> StreamTimes:
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}
    started = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: "
                               f"{(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - started
    return StreamTimes(tokens, first if first is not None else total, total)


async def _round(base: str, key: str, model: str, prompts: list[str],
                 max_tokens: int) -> tuple[float, list[StreamTimes]]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        started = time.perf_counter()
        times = await asyncio.gather(*(_one(http, key, model, p, max_tokens) for p in prompts))
        return time.perf_counter() - started, list(times)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(wall: float, times: list[StreamTimes]) -> dict:
    return {"streams": len(times), "wall_s": round(wall, 3),
            "tokens": sum(t.tokens for t in times),
            "tokens_per_s_all": round(sum(t.tokens for t in times) / wall, 2),
            "tokens_per_s_per_stream": round(statistics.mean(t.tokens_per_s for t in times), 2),
            "ttft_p50_s": round(_percentile([t.first_token_s for t in times], 0.5), 3),
            "ttft_p99_s": round(_percentile([t.first_token_s for t in times], 0.99), 3),
            "latency_p50_s": round(_percentile([t.total_s for t in times], 0.5), 3),
            "latency_p99_s": round(_percentile([t.total_s for t in times], 0.99), 3)}


@dataclass
class StreamsConfig:
    streams: int = 8
    max_tokens: int = 64
    model: str = "default"  # "default", "tiny", or a local model directory
    batching: str = "continuous"
    engine: str = "torch"
    precision: str = "float32"  # the server's --precision (`onthejob serve`'s default)
    compile: bool = False  # the server's --compile
    start_timeout_s: float = 300.0  # 900 s when compiling


def chosen_precision(server_log: str) -> str:
    """The precision the server says it picked at start-up ("precision bfloat16: ..."), or ""."""
    for line in server_log.splitlines():
        if line.startswith("precision "):
            return line.split()[1].rstrip(":")
    return ""


def run(cfg: StreamsConfig, say=print) -> dict:
    """One warm-up stream, one stream alone, then `streams` at once; their figures."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(cfg.streams)]
    with tempfile.TemporaryDirectory(prefix="onthejob-streams-") as scratch_dir:
        scratch = Path(scratch_dir)
        db = f"sqlite:///{scratch / 'streams.db'}"
        store = Store(db)
        tenant = f"streams-{uuid.uuid4().hex[:8]}"
        store.create_tenant(tenant)
        key = store.create_key(tenant)
        store.close()
        port = free_port()
        say(f"starting the server ({cfg.model} model, {cfg.engine} engine, {cfg.batching} "
            f"batching) on port {port} ...")
        server = start_server(db, model_dir_for(cfg.model, scratch), port, scratch,
                              max(cfg.start_timeout_s, 900.0 if cfg.compile else 0.0),
                              ["--batching", cfg.batching, "--engine", cfg.engine, "--precision",
                               cfg.precision, "--max-batch", str(max(8, cfg.streams)),
                               *(["--compile"] if cfg.compile else [])])
        precision = chosen_precision((scratch / "server.log").read_text()) or cfg.precision
        say(f"the server decodes in {precision}")
        try:
            base = f"http://127.0.0.1:{port}"
            model = httpx.get(f"{base}/health", timeout=10).json()["model"]
            asyncio.run(_round(base, key, model, prompts[:1], 8))  # warm-up
            one = _summary(*asyncio.run(_round(base, key, model, prompts[:1], cfg.max_tokens)))
            say(f"1 stream: {one['tokens_per_s_all']} tokens/s")
            many = _summary(*asyncio.run(_round(base, key, model, prompts, cfg.max_tokens)))
            say(f"{cfg.streams} streams: {many['tokens_per_s_all']} tokens/s in all, "
                f"{many['tokens_per_s_per_stream']} per stream, latency p50 "
                f"{many['latency_p50_s']} s, p99 {many['latency_p99_s']} s")
        finally:
            stop_server(server)
    return {"config": asdict(cfg), "precision": precision, "one": one, "many": many,
            "scaling": round(many["tokens_per_s_all"] / one["tokens_per_s_all"], 2)
            if one["tokens_per_s_all"] else None}


def markdown(results: list[dict], command: str) -> str:
    lines = ["# Streaming clients against `onthejob serve`", "", f"Command: `{command}`", "",
             "| engine | batching | streams | tokens/s in all | tokens/s per stream | x one stream "
             "| TTFT p50 / p99 s | latency p50 / p99 s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["config"]
        for part in ("one", "many"):
            s = r[part]
            how = [r["precision"]] if r.get("precision") else []
            how += ["compiled"] if c.get("compile") else []
            engine = c["engine"] + (f" ({', '.join(how)})" if how else "")
            lines.append(f"| {engine} | {c['batching']} | {s['streams']} | "
                         f"{s['tokens_per_s_all']} | {s['tokens_per_s_per_stream']} | "
                         f"{r['scaling'] if part == 'many' else 1.0} | {s['ttft_p50_s']} / "
                         f"{s['ttft_p99_s']} | {s['latency_p50_s']} / {s['latency_p99_s']} |")
    return "\n".join(lines) + "\n"
