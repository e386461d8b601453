"""The promotion gate's decision (learn/gate.py `decide`): every threshold on both sides of its
bound and at it, the reasons when several checks fail at once, measures that are not numbers,
and a KL that was never measured (an error, not a zero)."""

from __future__ import annotations

import math

import pytest

from onthejob.learn.gate import GateConfig, decide

CFG = GateConfig()  # min_gain 0.02, max_kl 0.5, max_retention_drop 0.15, max_earlier_drop 0.10,
# max_general_drop 0.05
PASSING = {"gain": 0.1, "kl": 0.2, "retention_drop": 0.0, "earlier_drop": 0.0, "general_drop": 0.0}
REASONS = {"gain": "did not learn", "kl": "moved too far", "retention_drop": "forgot reading",
           "earlier_drop": "forgot earlier sessions", "general_drop": "forgot general knowledge"}
FIELDS = {"gain": "min_gain", "kl": "max_kl", "retention_drop": "max_retention_drop",
          "earlier_drop": "max_earlier_drop", "general_drop": "max_general_drop"}


def test_the_defaults_are_the_documented_recipe():
    assert (CFG.min_gain, CFG.max_kl, CFG.max_retention_drop, CFG.max_earlier_drop,
            CFG.max_general_drop) == (0.02, 0.5, 0.15, 0.10, 0.05)


# (measure, value, promoted): each threshold just inside, exactly at and just past its bound.
TABLE = [
    ("gain", 0.0201, True), ("gain", 0.02, True), ("gain", 0.0199, False),
    ("gain", -0.3, False), ("gain", 1.0, True),
    ("kl", 0.4999, True), ("kl", 0.5, True), ("kl", 0.5001, False), ("kl", 0.0, True),
    ("kl", 7.0, False),
    ("retention_drop", 0.1499, True), ("retention_drop", 0.15, True),
    ("retention_drop", 0.1501, False), ("retention_drop", -0.2, True),
    ("earlier_drop", 0.0999, True), ("earlier_drop", 0.10, True),
    ("earlier_drop", 0.1001, False), ("earlier_drop", -0.5, True),
    ("general_drop", 0.0499, True), ("general_drop", 0.05, True),
    ("general_drop", 0.0501, False), ("general_drop", -0.1, True),
]


@pytest.mark.parametrize("measure,value,promoted", TABLE,
                         ids=[f"{m}={v}" for m, v, _ in TABLE])
def test_each_threshold_and_its_bound(measure, value, promoted):
    verdict = decide(CFG, **{**PASSING, measure: value})
    assert verdict.promote is promoted, verdict.reason
    if promoted:
        assert verdict.reason.startswith("learned") and "; " not in verdict.reason
    else:
        assert verdict.reason.startswith(REASONS[measure]) and "; " not in verdict.reason


@pytest.mark.parametrize("measure", list(REASONS))
def test_thresholds_come_from_the_config(measure):
    """The same value passes or fails with the bound moved: no constant hides in decide()."""
    field = FIELDS[measure]
    value = 0.3
    loose = GateConfig(**{field: -1.0 if measure == "gain" else 1.0})
    strict = GateConfig(**{field: 1.0 if measure == "gain" else 0.0})
    assert decide(loose, **{**PASSING, measure: value}).promote
    verdict = decide(strict, **{**PASSING, measure: value})
    assert not verdict.promote and REASONS[measure] in verdict.reason
    assert str(getattr(strict, field)) in verdict.reason


def test_every_failed_check_is_named_in_order():
    verdict = decide(CFG, gain=0.0, kl=0.9, retention_drop=0.3, earlier_drop=0.2, general_drop=0.4)
    assert not verdict.promote
    parts = verdict.reason.split("; ")
    assert [p.split(":")[0] for p in parts] == list(REASONS.values())
    assert parts[0] == "did not learn: held-back probe F1 gain +0.000 < 0.02"
    assert parts[1] == "moved too far: KL to base 0.900 > 0.5"
    assert parts[2] == "forgot reading: retention dropped 0.300 > 0.15"
    assert parts[3] == "forgot earlier sessions: probe F1 dropped 0.200 > 0.1"
    assert parts[4] == ("forgot general knowledge: general-question accuracy dropped 0.400 > "
                        "0.05")


@pytest.mark.parametrize("failing", [("gain", "kl"), ("kl", "retention_drop"),
                                     ("gain", "earlier_drop"), ("retention_drop", "earlier_drop"),
                                     ("kl", "general_drop")])
def test_two_failed_checks_give_both_reasons_and_only_those(failing):
    bad = {"gain": -0.1, "kl": 0.8, "retention_drop": 0.2, "earlier_drop": 0.4, "general_drop": 0.3}
    verdict = decide(CFG, **{**PASSING, **{m: bad[m] for m in failing}})
    assert not verdict.promote
    named = [m for m, text in REASONS.items() if text in verdict.reason]
    assert named == list(failing)


def test_the_metrics_carry_the_measures_thresholds_and_extras():
    verdict = decide(CFG, **PASSING, extra={"steps": 16})
    assert verdict.metrics["gain"] == 0.1 and verdict.metrics["kl_to_base"] == 0.2
    assert verdict.metrics["thresholds"] == {"min_gain": 0.02, "max_kl": 0.5,
                                             "max_retention_drop": 0.15,
                                             "max_earlier_drop": 0.10,
                                             "max_general_drop": 0.05}
    assert verdict.metrics["steps"] == 16


@pytest.mark.parametrize("measure", list(REASONS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_measure_that_is_not_a_number_never_promotes(measure, value):
    # -inf KL or drop, +inf gain would pass their comparison; NaN passes every one.
    verdict = decide(CFG, **{**PASSING, measure: value})
    assert not verdict.promote and "not a finite number" in verdict.reason


def test_a_candidate_that_forgets_general_questions_is_rejected_though_its_kl_is_low():
    """The sft candidate of the nightly-job report: 8 of 10 general questions right before,
    0 after ("The capital of Japan is New York City"), KL under the limit, reading unchanged."""
    verdict = decide(CFG, gain=0.3, kl=0.2, retention_drop=0.0, earlier_drop=0.0, general_drop=0.8)
    assert not verdict.promote
    assert verdict.reason == ("forgot general knowledge: general-question accuracy dropped 0.800 "
                              "> 0.05")
    assert verdict.metrics["general_drop"] == 0.8


def test_a_drop_equal_to_its_bound_passes_despite_float_rounding():
    """The nightly run's candidate: 40/40 general questions before, 38/40 after; 1.0 - 0.95 is
    0.05000000000000004 in floating point, and the bound 0.05 is inclusive."""
    drop = 1.0 - 38 / 40
    assert drop > 0.05
    verdict = decide(CFG, gain=0.1, kl=0.1, retention_drop=0.3 - 0.15, earlier_drop=0.0,
                     general_drop=drop)
    assert verdict.promote, verdict.reason
    assert not decide(CFG, gain=0.1, kl=0.1, retention_drop=0.0, earlier_drop=0.0,
                      general_drop=drop + 1e-6).promote


def test_a_missing_kl_is_an_error_not_zero():
    with pytest.raises(ValueError, match="did not measure it"):
        decide(CFG, gain=0.5, kl=None, retention_drop=0.0, earlier_drop=0.0)


def test_consolidation_without_a_measured_kl_fails_instead_of_promoting(tmp_path, monkeypatch):
    """consolidate() used to read a missing KL as 0.0, which passes any max_kl; the drift is
    now measured once at the gate, and a measure that gives nothing must fail the run."""
    from onthejob.learn import consolidate as consolidate_module
    from onthejob.learn import loop
    from onthejob.learn.consolidate import ConsolidateOptions, consolidate
    from onthejob.learn.opsd import OpsdConfig
    from onthejob.model import tiny_model
    from onthejob.store import Store

    monkeypatch.setattr(consolidate_module.AnchorDrift, "__call__", lambda self, trainer: None)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_tenant("acme")
    s = store.create_session("acme", title="Bluefin")
    store.add_message("acme", s.id, "user", "Remember: Bluefin ships on March 3 in Oslo.")
    store.add_message("acme", s.id, "assistant", "Noted: March 3, Oslo.")
    store.set_review("acme", s.id, "up", "")
    opts = ConsolidateOptions(
        train=loop.TrainConfig(steps=1, lr=1e-3, bf16=False), visits=None,
        opsd=OpsdConfig(prompts_per_step=1, samples_per_prompt=1, max_new_tokens=2,
                        teacher_tokens=2),
        gate=GateConfig(min_gain=-1.0, max_kl=100, max_retention_drop=1.0, max_earlier_drop=1.0))
    with pytest.raises(ValueError, match="KL to the base"):
        consolidate(store, tiny_model(seed=0), "acme", opts, say=lambda _: None)
    assert store.active_adapter("acme") is None and store.list_adapters("tenant", "acme") == []
    assert store.list_runs("consolidate")[0].status == "failed"
    assert [x.id for x in store.sessions_to_consolidate("acme")] == [s.id]
    store.close()
