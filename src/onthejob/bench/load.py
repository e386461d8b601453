"""The load benchmark: a real `onthejob serve` process on loopback, N concurrent clients, each
sending a bounded number of chat turns in sessions (streamed and not), then a count against
the store: every acknowledged message stored exactly once, and how many were lost.

Acknowledged means the client was told it is kept: the user's message once the response
started (200 with the session id), the answer once it arrived whole (non-streamed body, or a
stream that reached [DONE]). Latency is per request, first byte sent to last byte read.
With the tiny random model (the default) this measures the service: HTTP, the queue, the
engine's batching and the database; not the model's speed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from onthejob.store import Store


@dataclass
class LoadConfig:
    clients: int = 8
    requests: int = 10  # per client
    db: str | None = None  # None: a fresh SQLite file in a temporary directory
    model: str = "tiny"  # "tiny", "default", or a local model directory
    max_tokens: int = 8
    stream_share: float = 0.5  # share of requests sent with stream=true
    turns_per_session: int = 4
    start_timeout_s: float = 300.0


@dataclass
class Result:
    config: dict
    backend: str = ""
    model: str = ""
    seconds: float = 0.0
    statuses: dict = field(default_factory=dict)
    latencies_ms: list = field(default_factory=list)
    completion_tokens: int = 0
    acknowledged: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    errors: list = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if int(code) >= 500)

    def percentile(self, q: float) -> float:
        values = sorted(self.latencies_ms)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]

    def summary(self) -> dict:
        ok = self.statuses.get("200", 0)
        return {**asdict(self), "latencies_ms": None, "server_errors": self.server_errors,
                "p50_ms": self.percentile(50), "p99_ms": self.percentile(99),
                "requests_per_s": ok / self.seconds if self.seconds else 0.0,
                "tokens_per_s": self.completion_tokens / self.seconds if self.seconds else 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir_for(model: str, scratch: Path) -> str | None:
    """The --model a child server gets: None for the default, the tiny model saved to scratch."""
    if model == "default":
        return None
    if model != "tiny":
        return model
    from onthejob.model import tiny_model

    lm = tiny_model(seed=0)
    path = scratch / "tiny-model"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def start_server(db: str, model_dir: str | None, port: int, home: Path,
                 timeout: float, extra: list[str] | None = None) -> subprocess.Popen:
    """`onthejob serve` in a child process on loopback, once it answers /health."""
    args = [sys.executable, "-m", "onthejob.cli", "serve", "--db", db, "--port", str(port),
            *(extra or [])]
    if model_dir:
        args += ["--model", model_dir]
    env = {**os.environ, "ONTHEJOB_HOME": str(home)}
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {home / 'server.log'}:\n"
                               + (home / "server.log").read_text()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (the server closes its engine and store), then kill after a minute."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


async def _client(http: httpx.AsyncClient, cfg: LoadConfig, client: int, model: str,
                  result: Result, acked: list, tick) -> None:
    sid = None
    for turn in range(cfg.requests):
        if turn % cfg.turns_per_session == 0:
            sid = None
        content = f"client {client} turn {turn}: {uuid.uuid4().hex}"
        streaming = (client * cfg.requests + turn) % 100 < cfg.stream_share * 100
        body = {"model": model, "messages": [{"role": "user", "content": content}],
                "max_tokens": cfg.max_tokens, "temperature": 1.0, "seed": turn,
                "stream": streaming}
        if streaming:
            body["stream_options"] = {"include_usage": True}
        headers = {"X-Session-Id": sid} if sid else {}
        started = time.perf_counter()
        try:
            if streaming:
                async with http.stream("POST", "/v1/chat/completions", json=body,
                                       headers=headers) as r:
                    status = r.status_code
                    if status == 200:
                        sid = r.headers["x-session-id"]
                        acked.append((sid, "user", content))
                    pieces, done, tokens = [], False, 0
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:  # failed after the 200 was sent
                                code = chunk["error"].get("code")
                                status = 503 if code == "server_overloaded" else 500
                            elif chunk.get("choices"):
                                pieces.append(chunk["choices"][0]["delta"].get("content", ""))
                            elif chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                    if status == 200 and done:
                        acked.append((sid, "assistant", "".join(pieces)))
                        result.completion_tokens += tokens
            else:
                r = await http.post("/v1/chat/completions", json=body, headers=headers)
                status = r.status_code
                if status == 200:
                    data = r.json()
                    sid = r.headers["x-session-id"]
                    acked.append((sid, "user", content))
                    acked.append((sid, "assistant", data["choices"][0]["message"]["content"]))
                    result.completion_tokens += data["usage"]["completion_tokens"]
                elif len(result.errors) < 5:
                    result.errors.append(f"{status}: {r.text[:300]}")
        except httpx.HTTPError as exc:
            status = 599  # no response at all: counted as a server error
            if len(result.errors) < 5:
                result.errors.append(f"{type(exc).__name__}: {exc}")
        result.latencies_ms.append((time.perf_counter() - started) * 1000)
        result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1
        tick()


async def _drive(base: str, key: str, model: str, cfg: LoadConfig, result: Result,
                 acked: list, say) -> None:
    total = cfg.clients * cfg.requests
    done = 0
    started = time.time()
    last = [started]

    def tick() -> None:
        nonlocal done
        done += 1
        now = time.time()
        if now - last[0] >= 2 or done == total:
            last[0] = now
            rate = done / (now - started)
            say(f"  {done}/{total} requests, {rate:.1f}/s, ETA {(total - done) / rate:.0f} s")

    limits = httpx.Limits(max_connections=cfg.clients + 2)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        await asyncio.gather(*(_client(http, cfg, i, model, result, acked, tick)
                               for i in range(cfg.clients)))


def _count(store: Store, tenant: str, acked: list, result: Result) -> None:
    stored: Counter = Counter()
    for session in store.list_sessions(tenant, limit=1000):
        for m in store.messages(tenant, session.id):
            stored[(session.id, m.role, m.content)] += 1
    result.stored = sum(stored.values())
    result.acknowledged = len(acked)
    # An answer text can repeat within a session; each acknowledged copy needs a stored one.
    wanted = Counter(acked)
    result.lost = sum(max(0, n - stored[k]) for k, n in wanted.items())
    result.duplicated = sum(max(0, stored[k] - n) for k, n in wanted.items()
                            if k[1] == "user")


def run(cfg: LoadConfig, say=print) -> Result:
    result = Result(config=asdict(cfg))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    with tempfile.TemporaryDirectory(prefix="onthejob-load-") as scratch_dir:
        scratch = Path(scratch_dir)
        db = cfg.db or f"sqlite:///{scratch / 'load.db'}"
        store = Store(db)
        result.backend = store.backend
        tenant = f"load-{uuid.uuid4().hex[:8]}"
        store.create_tenant(tenant)
        key = store.create_key(tenant)
        model_dir = model_dir_for(cfg.model, scratch)
        port = free_port()
        say(f"starting the server ({cfg.model} model, {result.backend}) on port {port} ...")
        server = start_server(db, model_dir, port, scratch, cfg.start_timeout_s)
        acked: list = []
        try:
            base = f"http://127.0.0.1:{port}"
            result.model = httpx.get(f"{base}/health", timeout=10).json()["model"]
            say(f"{cfg.clients} clients x {cfg.requests} requests "
                f"({cfg.stream_share:.0%} streamed, max_tokens {cfg.max_tokens})")
            started = time.perf_counter()
            asyncio.run(_drive(base, key, result.model, cfg, result, acked, say))
            result.seconds = time.perf_counter() - started
        finally:
            stop_server(server)
        _count(store, tenant, acked, result)
        store.close()
    return result


def markdown(result: Result, command: str) -> str:
    s = result.summary()
    c = result.config
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(result.statuses.items()))
    lines = [
        f"# Load: {c['clients']} clients x {c['requests']} requests, {result.backend}",
        "",
        f"Command: `{command}`",
        "",
        f"A real `onthejob serve` process on loopback with the {c['model']} model "
        f"({result.model}); {c['stream_share']:.0%} of requests streamed, max_tokens "
        f"{c['max_tokens']}, a new session every {c['turns_per_session']} turns. "
        + ("The tiny random model measures the service (HTTP, queue, batching, database), "
           "not the model. " if c["model"] == "tiny" else "")
        + f"Measured on {os.cpu_count()} CPU cores shared with other work.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests | {sum(result.statuses.values())} ({statuses}) |",
        f"| 5xx (incl. no response) | {s['server_errors']} |",
        f"| latency p50 / p99 | {s['p50_ms']:.0f} ms / {s['p99_ms']:.0f} ms |",
        f"| throughput | {s['requests_per_s']:.2f} requests/s, {s['tokens_per_s']:.1f} "
        "completion tokens/s |",
        f"| wall time | {result.seconds:.1f} s |",
        f"| messages acknowledged | {result.acknowledged} |",
        f"| messages stored | {result.stored} |",
        f"| acknowledged but lost | {result.lost} |",
        f"| user messages stored twice | {result.duplicated} |",
        "",
    ]
    if result.errors:
        lines += ["First errors:", "", *[f"- `{e}`" for e in result.errors], ""]
    return "\n".join(lines)
