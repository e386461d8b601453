"""GRPO: the advantage and clipping math, flat groups and faults, real updates on the tiny
model, and `onthejob grind` end to end with a tiny model directory and the store."""

import json
import math

import pytest
import torch

from onthejob.cli import main
from onthejob.envs.base import Env, StepResult
from onthejob.envs.rollout import Rollout
from onthejob.learn.grpo import (
    Grpo,
    GrpoConfig,
    clipped_surrogate,
    group_advantages,
    k3,
    rows_from_groups,
)
from onthejob.learn.loop import STUDENT, TrainConfig, Trainer
from onthejob.model import render_ids, tiny_model
from onthejob.model.adapters import LoraSpec
from onthejob.store import Store


class ParityEnv(Env):
    """Reward 1 when the reply has an even number of characters: random text gets both, so
    every group of a random model has reward variance. `fault_every=k` makes each reply whose
    length is divisible by k a sandbox fault."""

    name = "parity"

    def __init__(self, fault_every: int = 0, turns: int = 1, **options):
        super().__init__(fault_every=fault_every, turns=turns, **options)
        self.fault_every, self.turns = fault_every, turns
        self._s = None

    def reset(self, seed):
        self._s = (seed, 0)
        return f"Task {seed}: say something, turn 0."

    def step(self, action):
        seed, t = self._s
        self._s = (seed, t + 1)
        info = {}
        if self.fault_every and len(action) % self.fault_every == 0:
            info["fault"] = "timeout"
        done = t + 1 >= self.turns
        reward = float(len(action) % 2 == 0) if done else 0.0
        return StepResult(f"Task {seed}: say something, turn {t + 1}.", reward, done, info)

    def snapshot(self):
        return self._s

    def restore(self, state):
        self._s = state


@pytest.fixture(autouse=True)
def _parity(register_env):
    register_env("parity", ParityEnv)


# ---- math -----------------------------------------------------------------------------------
def test_group_advantages_mean_std_faults_and_flat_groups():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert adv == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)  # mean .5, std .5
    assert group_advantages([1.0, 0.0, 0.0, 0.0], scale_std=False) == pytest.approx(
        [0.75, -0.25, -0.25, -0.25])
    scaled = group_advantages([1.0, 0.0, 0.0, 0.0])
    assert sum(scaled) == pytest.approx(0, abs=1e-6)
    assert scaled[0] == pytest.approx(0.75 / math.sqrt(0.1875), rel=1e-4)
    # Faults are neither 0 nor counted: the statistics use the valid rollouts only.
    assert group_advantages([1.0, None, 0.0]) == pytest.approx([1.0, None, -1.0], abs=1e-5)
    assert group_advantages([1.0, 1.0, 1.0]) is None  # zero variance: nothing to learn
    assert group_advantages([0.0, 0.0, None]) is None
    assert group_advantages([1.0, None, None]) is None  # fewer than two valid rollouts


def test_clipped_surrogate_clips_only_where_it_should():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, .5, .5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    # A>0, rho>1+eps: clipped to 1.2; A<0, rho>1+eps: unclipped (pessimistic) -1.5 * -1;
    # A>0, rho<1-eps: unclipped .5; A<0, rho<1-eps: clipped .8 * -1.
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    assert clipped.tolist() == [True, False, False, True]
    # Clip-higher: a wider upper bound lets a positive advantage push further.
    loss, _ = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert loss[0].item() == pytest.approx(-1.28)
    # The gradient is zero through clipped tokens, nonzero through the others.
    logp = logp.clone().requires_grad_(True)
    clipped_surrogate(logp, old, adv, 0.2, 0.2)[0].sum().backward()
    assert logp.grad[0] == 0 and logp.grad[3] == 0 and logp.grad[1] != 0 and logp.grad[2] != 0


def test_k3_is_nonnegative_and_zero_at_equality():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert k3(logp, logp).abs().max() == 0
    assert (k3(logp, torch.tensor([-0.5, -3.0, -0.1])) > 0).all()
    # Unbiased: E_p[k3] = KL(p || q) for categorical p, q.
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum()
    assert (p * k3(p.log(), q.log())).sum() == pytest.approx(exact.item(), rel=1e-5)


def _rollout(reward, fault=None, turns=1, tokens=(5, 6)):
    return Rollout(run_id="r", group=0, index=0, env="parity", version="0", options={}, seed=0,
                   actions=["a"] * turns, observations=["o"] * (turns + 1),
                   rewards=[0.0] * (turns - 1) + [reward], dones=[False] * (turns - 1) + [True],
                   infos=[{}] * turns, state_hashes=[""] * (turns + 1),
                   prompt_ids=[[1, 2]] * turns, token_ids=[list(tokens)] * turns,
                   logprobs=[[-1.0] * len(tokens)] * turns, fault=fault)


def test_rows_skip_faults_and_flat_groups_and_train_every_turn():
    groups = [[_rollout(1.0, turns=3), _rollout(0.0, turns=3), _rollout(1.0, fault="sandbox: x")],
              [_rollout(1.0), _rollout(1.0)]]
    advantages = [group_advantages([r.reward for r in g]) for g in groups]
    assert advantages[1] is None
    rows = rows_from_groups(groups, advantages, eot=2, max_new_tokens=8)
    # Group 0: two valid rollouts x three turns each; the fault and the flat group give nothing.
    assert len(rows) == 6
    assert {r.rollout for r in rows} == {0, 1}
    assert [r.adv for r in rows] == pytest.approx([1.0] * 3 + [-1.0] * 3, abs=1e-5)
    # Replies shorter than max_new_tokens stopped on end-of-turn: it is trained, unscored yet.
    assert rows[0].tokens == [5, 6, 2] and math.isnan(rows[0].old[-1])
    full = rows_from_groups(groups, advantages, eot=2, max_new_tokens=2)
    assert full[0].tokens == [5, 6] and len(full[0].old) == 2


# ---- training on the tiny model -------------------------------------------------------------
def _adapter_state(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()
            if f".{STUDENT}." in n and "lora_" in n}


@pytest.mark.parametrize("beta,epochs,turns", [(0.0, 1, 1), (0.1, 2, 2)])
def test_grpo_steps_change_the_adapter_with_finite_loss(beta, epochs, turns):
    lm = tiny_model(seed=0)
    trainer = Trainer(lm, TrainConfig(steps=2, lr=1e-2, lora=LoraSpec(rank=2, alpha=4)))
    rule = Grpo(GrpoConfig(env="parity", options={"turns": turns}, group=4, starts=2,
                           max_turns=turns, max_new_tokens=6, beta=beta, epochs=epochs,
                           micro_tokens=64))
    before = _adapter_state(lm)
    history = trainer.run(rule)
    after = _adapter_state(lm)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for h in history:
        assert math.isfinite(h["loss"]) and h["tokens"] > 0 and math.isfinite(h["kl"])
        assert 0 <= h["reward"] <= 1 and 0 <= h["clip_frac"] <= 1
        assert h["turns"] == turns
    assert rule.rollouts == 2 * 2 * 4


def test_flat_groups_contribute_nothing_and_faults_are_excluded():
    lm = tiny_model(seed=0)
    trainer = Trainer(lm, TrainConfig(steps=1, lr=1e-2, lora=LoraSpec(rank=2, alpha=4)))
    # fault_every=1: every reply is a fault, so no group has two valid rollouts.
    rule = Grpo(GrpoConfig(env="parity", options={"fault_every": 1}, group=4, starts=2,
                           max_new_tokens=4))
    before = _adapter_state(lm)
    [h] = trainer.run(rule)
    assert h["faults"] == 8 and h["groups_flat"] == 2 and h["tokens"] == 0
    assert math.isnan(h["reward"]) and h["loss"] == 0
    after = _adapter_state(lm)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert rule.faults == 8


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        Grpo(GrpoConfig(group=1))
    with pytest.raises(Exception, match="difficulty"):
        Grpo(GrpoConfig(env="arith", options={"difficulty": 9}))


# ---- the command ----------------------------------------------------------------------------
def test_grind_cli_end_to_end_registers_a_candidate(tmp_path, tiny_dir, capsys):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    Store(db).create_tenant("acme")
    out, plot = tmp_path / "out", tmp_path / "curve.png"
    common = ["grind", "--env", "parity", "--group", "4", "--starts", "1", "--steps", "2",
              "--max-new-tokens", "4", "--rank", "2", "--lr", "1e-2", "--model", tiny_dir]
    argv = [*common, "--eval-seeds", "4", "--out", str(out), "--plot", str(plot)]
    assert main([*argv, "--tenant", "acme", "--db", db]) == 0
    assert "candidate v1 of tenant acme" in capsys.readouterr().out
    record = json.loads((out / "curve.json").read_text())
    assert len(record["history"]) == 2 and record["eval_before"]["episodes"] == 4
    assert "reward_last" in record["summary"] and plot.stat().st_size > 1000
    [adapter] = Store(db).list_adapters("tenant", "acme")
    assert adapter.status == "candidate" and adapter.method == "grpo"
    assert adapter.metrics["steps"] == 2 and adapter.metrics["env"] == "parity"
    [run] = Store(db).list_runs(kind="grind")
    assert run.status == "done"
    # The rollouts are logged and replay without the model.
    assert main(["replay", record["run_id"]]) == 0
    # Without --tenant the adapter is written beside the curve.
    out2 = tmp_path / "out2"
    assert main([*common, "--eval-seeds", "0", "--out", str(out2)]) == 0
    assert (out2 / "adapter" / "checksum.sha256").exists() and (out2 / "curve.png").exists()
    # Errors say what to do.
    assert main([*argv, "--tenant", "nobody", "--db", db]) == 1
    assert "tenants add" in capsys.readouterr().err
    assert main(["grind", "--env", "nope", "--model", tiny_dir]) == 2


def test_grind_help():
    with pytest.raises(SystemExit) as exit_info:
        main(["grind", "--help"])
    assert exit_info.value.code == 0


def test_shop_start_pages_are_a_curriculum_with_the_same_checker():
    from onthejob.envs.base import EnvError
    from onthejob.envs.policies import solve_shop
    from onthejob.envs.registry import make

    assert "start" not in make("shop").options  # the default keeps its identity and hashes
    lengths = {}
    for start in ("home", "address", "shipping", "payment", "review"):
        env = make("shop", start=start)
        observation, steps = env.reset(7), 0
        assert f'<page name="{start}">' in observation
        while True:
            result = env.step(solve_shop(observation))
            observation, steps = result.observation, steps + 1
            if result.done:
                break
        assert result.reward == 1.0
        lengths[start] = steps
        assert env.fork(1)[0].state_hash() == env.state_hash()
    assert lengths["review"] == 1 and lengths["payment"] == 3
    assert lengths["home"] > lengths["address"] > lengths["shipping"] > lengths["payment"]
    env = make("shop", start="review")
    env.reset(7)
    assert env.step("click home").reward == 0.0  # leaving the review page is no order
    with pytest.raises(EnvError, match="start must be"):
        make("shop", start="checkout")


def test_shared_prompt_logprobs_and_gradients_are_exact():
    from onthejob.learn.scoring import shared_prompt_logprobs, token_logprobs
    from onthejob.model.adapters import attach

    lm = tiny_model(seed=1)
    attach(lm, "s", spec=LoraSpec(rank=2, alpha=4))
    for name, p in lm.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    prompt = render_ids(lm.tokenizer, [{"role": "user", "content": "What is 2 + 3?"}])
    responses = [[10, 11, 12], [13], [14, 15, 16, 17, 18]]

    def run(fn):
        lm.model.zero_grad()
        logp = fn(lm, [prompt] * 3, responses)
        (logp * torch.arange(1, len(logp) + 1)).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in lm.model.named_parameters()
                               if p.grad is not None}

    exact, exact_grads = run(token_logprobs)
    shared, shared_grads = run(shared_prompt_logprobs)
    assert torch.allclose(exact, shared, atol=1e-5)
    assert exact_grads.keys() == shared_grads.keys() and exact_grads
    for name, g in exact_grads.items():
        assert torch.allclose(g, shared_grads[name], atol=1e-5, rtol=1e-4), name


# ---- the supervised warm-up (imitation of the scripted policy) before GRPO ----------------
def test_warmup_examples_come_from_their_own_seeds_and_skip_pages():
    from onthejob.envs.held_out import EVAL_SEED_BASE, eval_seeds
    from onthejob.learn.grpo import TRAIN_SEEDS
    from onthejob.learn.warmup import WARMUP_SEED_BASE, scripted_examples, warmup_seeds

    seeds = warmup_seeds(6)
    assert TRAIN_SEEDS <= WARMUP_SEED_BASE and max(seeds) < EVAL_SEED_BASE
    assert not set(seeds) & set(eval_seeds(64))
    every = scripted_examples("shop", {"start": "home"}, seeds)
    assert {e.seed for e in every} == set(seeds)
    pages = [e.page for e in every]
    assert pages.count("review") == 6 and pages.count("home") == 6
    assert [e.action for e in every if e.page == "review"] == ["click place-order"] * 6
    kept = scripted_examples("shop", {"start": "home"}, seeds, skip_pages=["review"])
    assert len(kept) == len(every) - 6
    assert "review" not in {e.page for e in kept}
    assert not any("place-order" in e.action for e in kept)
    # Each kept decision is the scripted one for its observation, seen on a solved episode.
    assert all(e.observation.startswith(f'<page name="{e.page}">') for e in kept)
    with pytest.raises(ValueError, match="no scripted policy"):
        scripted_examples("parity", {}, seeds)


def test_imitation_teaches_an_action_the_base_never_takes():
    from onthejob.envs.held_out import eval_seeds, evaluate
    from onthejob.envs.model_policy import ModelPolicy
    from onthejob.learn.warmup import Imitation, encode_examples, scripted_examples, warmup_seeds
    from onthejob.model.chat import end_of_turn_ids
    from onthejob.recipes.grind import SYSTEMS

    lm = tiny_model(seed=0)
    system, options = SYSTEMS["shop"], {"start": "review", "max_steps": 1}
    seeds = eval_seeds(8)
    assert evaluate(lm, "shop", options, seeds, 1, 6, system=system)["reward"] == 0.0
    examples = scripted_examples("shop", {"start": "review"}, warmup_seeds(4))
    eot = min(end_of_turn_ids(lm.tokenizer))
    pairs = encode_examples(lm, examples, system, eot)
    # The prompt is exactly what the model policy renders; only the action (+ end of turn)
    # is the target.
    prompt, response = pairs[0]
    assert prompt == ModelPolicy(lm, system=system).prompt_ids(examples[0].observation)
    assert response[-1] == eot and lm.tokenizer.decode(response[:-1]) == "click place-order"
    trainer = Trainer(lm, TrainConfig(steps=30, lr=3e-3, lora=LoraSpec(rank=16, alpha=32)))
    history = trainer.run(Imitation(pairs, batch_size=4))
    assert history[-1]["nll"] < history[0]["nll"] - 0.5
    with trainer.frozen_student():  # held-out seeds, never imitated: greedy now places the order
        assert evaluate(lm, "shop", options, seeds, 1, 6, system=system)["reward"] == 1.0
    with pytest.raises(ValueError, match="nothing to imitate"):
        Imitation([])


def test_grind_warmup_then_grpo_starts_from_the_warmed_adapter(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    argv = ["grind", "--env", "shop", "--option", "start=review", "--option", "max_steps=1",
            "--max-turns", "1", "--group", "4", "--starts", "1", "--steps", "1",
            "--max-new-tokens", "6", "--rank", "16", "--lr", "1e-3", "--model", tiny_dir,
            "--eval-seeds", "4", "--out", str(out), "--warmup-steps", "30",
            "--warmup-episodes", "4", "--warmup-option", "start=review", "--warmup-lr", "3e-3",
            "--temperature", "0.01"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warm-up: imitate 4 scripted decisions" in err and "[warm-up shop] step 30" in err
    assert "held-out after warm-up: reward 1.000" in err
    record = json.loads((out / "curve.json").read_text())
    warm = record["warmup"]
    assert len(warm["history"]) == 30 and warm["decisions"] == 4 and warm["seeds"][0] == 5_000_000
    assert record["eval_before"]["reward"] == 0.0 and warm["eval"]["reward"] == 1.0
    assert (out / "warmup-adapter" / "checksum.sha256").exists()
    # GRPO's first rollouts (near-greedy here) come from the warmed adapter, not the base.
    assert record["history"][0]["reward"] == 1.0
    assert record["summary"]["eval_after_warmup"]["reward"] == 1.0
    assert (out / "curve.png").stat().st_size > 1000
    # Bad warm-up settings are refused before any model is loaded.
    assert main(["grind", "--env", "parity", "--warmup-steps", "2", "--model", tiny_dir]) == 2
    assert "no scripted policy" in capsys.readouterr().err
    assert main(["grind", "--env", "arith", "--warmup-steps", "2", "--warmup-skip-page",
                 "review", "--model", tiny_dir]) == 2
    assert main(["grind", "--env", "shop", "--warmup-steps", "2", "--warmup-episodes", "0",
                 "--model", tiny_dir]) == 2
    assert "nothing to imitate" in capsys.readouterr().err
