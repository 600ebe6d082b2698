"""The metric definitions of docs/design.md against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cosmocore.evaluation.metrics import (
    bootstrap_ci,
    hallucination_rates,
    kaplan_meier_restricted_mean,
    mean_pass_at_k,
    minimum_detectable_effect,
    outcome_taxonomy,
    pass_at_k,
    time_to_correction,
    updates_before,
)


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # fewer than k failures: always a pass
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(200, 100, 100) == pytest.approx(1 - math.comb(100, 100) / math.comb(200, 100))
    assert mean_pass_at_k([(5, 2), (5, 5)], 1) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="k samples"):
        pass_at_k(2, 1, 3)


def test_hallucination_parts_add_up_to_the_rate():
    rates = hallucination_rates([(True, False), (True, True), (False, True), (False, False)])
    assert rates == {"rate": 0.75, "static": 0.5, "runtime": 0.25, "n": 4}


def test_outcome_taxonomy_covers_every_class():
    shares = outcome_taxonomy(["passed", "passed", "timeout", "wrong_answer"])
    assert shares["passed"] == 0.5 and shares["timeout"] == 0.25 and shares["no_code"] == 0.0
    assert sum(shares.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown outcome"):
        outcome_taxonomy(["exploded"])


def _log(rows):
    return pd.DataFrame(rows, columns=["iteration", "task_id", "outcome", "hallucinated"])


def _hand_made_rows():
    rows = []
    # A: wrong_answer at 0, 1, gone at 2 and 3 -> TTC 2; hallucinated at 0, gone at 1 and 2 -> TTC 1
    for it, outcome, flag in [(0, "wrong_answer", True), (1, "wrong_answer", False), (2, "passed", False),
                              (3, "passed", False), (4, "wrong_answer", False), (5, "passed", False)]:
        rows.append((it, "A", outcome, flag))
    # B: timeout at 1, 2, gone at 3 and 4 -> TTC 2; runtime_error at 3, gone at 4 and 5 -> TTC 1
    for it, outcome in enumerate(["passed", "timeout", "timeout", "runtime_error", "passed", "passed"]):
        rows.append((it, "B", outcome, False))
    # C: syntax_error throughout -> censored at 5 - 1 - 0 = 4; runtime_error first at 4 -> unobservable
    rows += [(it, "C", "syntax_error", False) for it in range(6)] + [(4, "C", "runtime_error", False)]
    # D: wrong_answer at 2 and 4, never absent twice in a row -> censored at 5 - 1 - 2 = 2
    for it, outcome in enumerate(["passed", "passed", "wrong_answer", "passed", "wrong_answer", "passed"]):
        rows.append((it, "D", outcome, False))
    return rows


def test_time_to_correction_on_a_hand_made_log():
    rows = _hand_made_rows()
    result = time_to_correction(_log(rows), horizon=5)
    assert result["n_pairs"] == 6 and result["n_corrected"] == 4 and result["n_unobservable"] == 1
    assert result["mean"] == pytest.approx(1.5) and result["censored_share"] == pytest.approx(1 / 3)
    # KM: S = 1 on [0,1), 4/6 on [1,2), 4/6 * 2/4 = 1/3 on [2,5]  ->  1 + 2/3 + 3 * 1/3
    assert result["km_mean"] == pytest.approx(1 + 2 / 3 + 1)
    assert time_to_correction(_log(rows), horizon=2)["km_mean"] == pytest.approx(1 + 2 / 3)


# Optimizer updates done by the end of each iteration's nocturnal phase (3, 2, 4, 1, 4, 2 updates), as
# the training flow logs them; iteration i's samples come from the policy after the previous value.
STEPS_DONE = [3, 5, 9, 10, 14, 16]


def test_time_to_correction_in_optimizer_updates_on_a_hand_made_log():
    log = _log(_hand_made_rows())
    log["optimizer_steps"] = log["iteration"].map(dict(enumerate(STEPS_DONE)))
    assert updates_before(log) == {0: 0, 1: 3, 2: 5, 3: 9, 4: 10, 5: 14}
    result = time_to_correction(log, horizon=16, unit="updates")
    # Corrected: A wrong_answer 0 -> 2: 5 - 0 = 5; A hallucinated 0 -> 1: 3; B timeout 1 -> 3: 9 - 3 = 6;
    # B runtime_error 3 -> 4: 10 - 9 = 1. Censored at iteration 4 (before it: 10 updates): C syntax_error
    # from 0: 10 - 0 = 10; D wrong_answer from 2: 10 - 5 = 5. C runtime_error first at 4: unobservable.
    assert (result["n_pairs"], result["n_corrected"], result["n_unobservable"]) == (6, 4, 1)
    assert result["mean"] == pytest.approx((5 + 3 + 6 + 1) / 4) and result["censored_share"] == pytest.approx(1 / 3)
    # KM over 1e 3e 5e 5c 6e 10c: S = 1 on [0,1), 5/6 on [1,3), 2/3 on [3,5), 1/2 on [5,6), 1/4 on [6,16]
    assert result["km_mean"] == pytest.approx(1 + 2 * 5 / 6 + 2 * 2 / 3 + 1 / 2 + 10 / 4)  # = 7
    assert time_to_correction(log, horizon=8, unit="updates")["km_mean"] == pytest.approx(4.5 + 2 / 4)


def test_with_the_same_updates_every_iteration_updates_are_that_many_times_iterations():
    log = _log(_hand_made_rows())
    log["optimizer_steps"] = 4 * (log["iteration"] + 1)
    iterations, updates = time_to_correction(log, horizon=5), time_to_correction(log, horizon=20, unit="updates")
    assert updates["mean"] == pytest.approx(4 * iterations["mean"])
    assert updates["km_mean"] == pytest.approx(4 * iterations["km_mean"])
    assert updates["censored_share"] == iterations["censored_share"]


def test_counting_updates_needs_a_consistent_log():
    log = _log(_hand_made_rows())
    with pytest.raises(ValueError, match="optimizer_steps"):
        time_to_correction(log, horizon=16, unit="updates")  # no such column
    log["optimizer_steps"] = log["iteration"].map(dict(enumerate(STEPS_DONE)))
    with pytest.raises(ValueError, match="every iteration from 0"):
        time_to_correction(log[log["iteration"] != 1], horizon=16, unit="updates")
    uneven = log.assign(optimizer_steps=log["optimizer_steps"].where(log.index != 0, 99))
    with pytest.raises(ValueError, match="differs within iteration"):
        time_to_correction(uneven, horizon=16, unit="updates")


def test_kaplan_meier_mean_without_censoring_is_the_plain_mean():
    times, events = np.array([1.0, 2.0, 3.0]), np.array([True, True, True])
    assert kaplan_meier_restricted_mean(times, events, horizon=10) == pytest.approx(2.0)


def test_a_log_with_no_failures_has_no_pairs():
    result = time_to_correction(_log([(0, "A", "passed", False), (1, "A", "passed", False)]), horizon=3)
    assert result["n_pairs"] == 0 and math.isnan(result["mean"]) and math.isnan(result["km_mean"])


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for repetition in range(200):
        low, high = bootstrap_ci(rng.normal(0.3, 1.0, size=60), n_resamples=1000, seed=repetition)
        covered += low <= 0.3 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_minimum_detectable_effect_is_sane():
    textbook = (1.959964 + 0.841621) * math.sqrt(2 * 0.25 / 100)  # pooled formula at p = 0.5
    assert minimum_detectable_effect(100, 0.5) == pytest.approx(textbook, rel=0.03)
    assert minimum_detectable_effect(400, 0.3) < minimum_detectable_effect(100, 0.3)
    assert math.isnan(minimum_detectable_effect(40, 0.075))  # no reduction from 3/40 is detectable with 40 tasks
    assert minimum_detectable_effect(100, 0.2, direction="increase") > 0
