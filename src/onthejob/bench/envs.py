"""`onthejob bench envs`: what the environments cost. Writes a markdown table to --out.

Figures: shop reset / snapshot / restore (median µs over blocks of calls), scripted env
steps/s inline and on 1 and 2 worker processes (many episodes per task), Ray against the
process pool on the same work, one sandboxed test run of the `code` env, and the share of a
model-policy rollout's time spent in the environment versus in the model.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

from onthejob.envs.policies import ScriptedPolicy
from onthejob.envs.rollout import run_group
from onthejob.envs.workers import ProcessBackend


def _per_call_us(fn, calls: int, blocks: int) -> float:
    """Median over `blocks` of the mean time of `calls` back-to-back calls, in µs."""
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def shop_timings(quick: bool) -> dict[str, float]:
    from onthejob.envs.registry import make

    env = make("shop")
    env.reset(1)
    for _ in range(5):
        env.step("search blue kettle")
    state = env.snapshot()
    blocks = 20 if quick else 200
    seeds = iter(range(10**9, 10**9 + 10**7))
    return {
        "reset (task cached)": _per_call_us(lambda: env.reset(1), 100, blocks),
        "reset (new seed)": _per_call_us(lambda: env.reset(next(seeds)), 100, blocks),
        "snapshot": _per_call_us(env.snapshot, 1000, blocks),
        "restore": _per_call_us(lambda: env.restore(state), 1000, blocks),
        "state_hash": _per_call_us(env.state_hash, 100, blocks),
        "step (search)": _per_call_us(lambda: (env.restore(state), env.step("search red mug")),
                                      100, blocks),
    }


def steps_per_s(env: str, backend, episodes: int, repeats: int) -> float:
    rates = []
    for r in range(repeats):
        group = run_group(env, r, episodes, ScriptedPolicy(env), backend=backend,
                          max_steps=60, log=False)
        assert group.stats["faults"] == 0, group.rollouts[0].fault
        rates.append(group.stats["steps_per_s"])
    return statistics.median(rates)


def throughput(quick: bool, ray: bool) -> tuple[list[tuple], list[str]]:
    episodes = 400 if quick else 4000
    repeats = 2 if quick else 5
    rows, notes = [], []
    for env in ("shop", "arith"):
        n = episodes if env == "shop" else episodes * 5
        rows.append((env, "inline (no workers)", steps_per_s(env, "inline", n // 4, repeats)))
        for workers in (1, 2):
            with ProcessBackend(workers) as pool:
                steps_per_s(env, pool, 2 * workers, 1)  # start the workers
                rows.append((env, f"process pool, {workers} worker(s)",
                             steps_per_s(env, pool, n, repeats)))
    if ray:
        try:
            from onthejob.envs.workers import RayBackend

            with RayBackend() as backend:  # a local Ray is shut down again, RAY_ADDRESS's stays
                steps_per_s("shop", backend, 4, 1)  # start the workers
                rows.append(("shop", f"ray, {backend.workers} CPU(s)",
                             steps_per_s("shop", backend, episodes, repeats)))
                notes += ray_overhead(backend, quick)
        except ImportError as exc:
            notes.append(f"Ray not measured: {exc}")
    return rows, notes


def _small_group_ms(backend, groups: int) -> float:
    times = []
    for seed in range(groups):
        start = time.perf_counter()
        run_group("arith", seed, 8, ScriptedPolicy("arith"), backend=backend, log=False)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ray_overhead(ray_backend, quick: bool) -> list[str]:
    groups = 10 if quick else 40
    with ProcessBackend(2) as pool:
        _small_group_ms(pool, 2)
        process_ms = _small_group_ms(pool, groups)
    _small_group_ms(ray_backend, 2)
    ray_ms = _small_group_ms(ray_backend, groups)
    return [f"A small group (8 arith episodes, 2 tasks) takes {process_ms:.2f} ms on the "
            f"process pool and {ray_ms:.2f} ms on Ray (median of {groups}): Ray adds "
            f"{ray_ms - process_ms:.2f} ms per group."]


def sandbox_ms(quick: bool) -> float:
    from onthejob.envs.registry import make

    env = make("code")
    env.reset(0)
    state = env.snapshot()
    times = []
    for _ in range(5 if quick else 20):
        env.restore(state)
        start = time.perf_counter()
        env.step("run tests")
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def model_share(model: str, quick: bool) -> list[tuple]:
    from onthejob.envs.model_policy import ModelPolicy
    from onthejob.model import SamplingParams, load_model, tiny_model

    lm = tiny_model(seed=0) if model == "tiny" else load_model(None if model == "default" else model)
    params = SamplingParams(max_tokens=16 if quick else 32, temperature=1.0, seed=0)
    rows = []
    for env in ("arith", "shop"):
        group = run_group(env, 0, 4 if quick else 8, ModelPolicy(lm, params), backend="inline",
                          max_steps=2 if quick else 4, log=False)
        env_s, policy_s = group.stats["env_s"], group.stats["policy_s"]
        rows.append((env, group.stats["steps"], env_s, policy_s, env_s / (env_s + policy_s)))
    return rows


def main(out: str = "docs/results/envs.md", quick: bool = False, ray: bool = True,
         model: str = "tiny") -> int:
    started = time.time()
    shop = shop_timings(quick)
    code_ms = sandbox_ms(quick)
    rows, notes = throughput(quick, ray)
    shares = model_share(model, quick)
    lines = [
        "# Environment benchmark",
        "",
        f"`onthejob bench envs{' --quick' if quick else ''}{'' if ray else ' --no-ray'}"
        f" --model {model} --out {out}` on {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), Python {sys.version.split()[0]}, "
        f"{time.strftime('%Y-%m-%d')}; took {time.time() - started:.0f} s.",
        "",
        "## shop: state operations (median µs per call)",
        "",
        "| operation | µs |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in shop.items()],
        f"| reset (new seed) + restore | {shop['reset (new seed)'] + shop['restore']:.2f} |",
        "",
        "## Scripted-policy environment steps per second",
        "",
        "| env | where | steps/s |",
        "|---|---|---|",
        *[f"| {env} | {where} | {rate:,.0f} |" for env, where, rate in rows],
        "",
        *notes,
        "",
        f"One `run tests` step of the `code` env (a sandboxed process): {code_ms:.1f} ms median.",
        "",
        f"## Rollout time: environment vs model (`{model}` model, inline, batched group)",
        "",
        "| env | steps | env s | model s | env share |",
        "|---|---|---|---|---|",
        *[f"| {e} | {n} | {a:.4f} | {b:.3f} | {s:.4%} |" for e, n, a, b, s in shares],
        "",
    ]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {out}")
    return 0
