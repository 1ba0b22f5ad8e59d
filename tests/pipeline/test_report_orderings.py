"""The demo report's Table 3 orderings are judged against the seed spread (made-up seed tables)."""

from __future__ import annotations

from reference_pipeline.report import order_verdict, paper_order_checks, seed_values


def _results(distill: list[float], supervised: list[float], refine: list[float] | None = None) -> dict:
    results: dict = {}
    for name, values in (("distill", distill), ("baseline", supervised),
                         ("refine", refine or distill)):
        for k, value in enumerate(values):
            key = name if k == 0 else f"{name}@seed{k}"
            results[key] = {"AP": value, "AP50": 2 * value, "images": 10.0}
    results["teacher_zero_shot"] = {"AP": 15.0, "AP50": 30.0, "images": 10.0}
    results["teacher_self_train"] = {"AP": 19.0, "AP50": 35.0, "images": 10.0}
    return results


def _check(results: dict, claim_start: str):
    return next(c for c in paper_order_checks(results) if c.claim.startswith(claim_start))


def test_seed_values_reads_seed_zero_and_every_suffixed_seed():
    results = _results([10.0, 11.0, 12.0], [5.0, 5.5, 6.0])
    assert seed_values(results, "distill") == {0: 10.0, 1: 11.0, 2: 12.0}
    assert seed_values(results, "teacher_self_train") == {0: 19.0}
    assert seed_values(results, "missing") == {}


def test_clearly_separated_seeds_hold_beyond_noise():
    check = _check(_results([20.0, 21.0, 19.5], [10.0, 11.5, 9.0]), "distilled student > supervised")
    assert check.verdict == "holds"
    assert "3 seeds" in check.text and "beyond 2× the spread" in check.text


def test_overlapping_seeds_are_within_noise_even_when_the_mean_is_higher():
    # mean difference +1, per-seed differences +4, -3, +2: std 3.6 > the mean
    check = _check(_results([14.0, 9.0, 12.0], [10.0, 12.0, 10.0]), "distilled student > supervised")
    assert check.verdict == "within noise"
    assert "within 2× the spread" in check.text


def test_a_consistent_reversal_does_not_hold():
    check = _check(_results([5.0, 5.2, 4.9], [10.0, 10.1, 9.8]), "distilled student > supervised")
    assert check.verdict == "does not hold"


def test_the_threshold_is_twice_the_seed_std_of_the_difference():
    # differences 3, 1, 2 -> mean 2, std 1: beyond one std, not beyond two
    verdict, _ = order_verdict({0: 13.0, 1: 11.0, 2: 12.0}, {0: 10.0, 1: 10.0, 2: 10.0}, strict=True)
    assert verdict == "holds"
    verdict, _ = order_verdict({0: 13.0, 1: 10.0, 2: 12.0}, {0: 10.0, 1: 10.0, 2: 10.0}, strict=True)
    assert verdict == "within noise"  # differences 3, 0, 2: mean 1.67 < 2 × 1.53


def test_refined_may_trail_distilled_by_up_to_one_seed_std():
    results = _results([20.0, 22.0, 18.0], [5.0, 5.0, 5.0], refine=[19.5, 21.0, 18.5])
    assert _check(results, "refined student ≥ distilled").verdict == "holds"  # Δ -0.33 ± 0.76
    results = _results([20.0, 20.5, 19.5], [5.0, 5.0, 5.0], refine=[18.0, 18.2, 17.9])
    assert _check(results, "refined student ≥ distilled").verdict == "does not hold"  # Δ -1.97 ± 0.55


def test_one_seed_decides_by_sign_and_says_there_is_no_spread():
    check = _check(_results([12.0], [10.0]), "distilled student > supervised")
    assert check.verdict == "holds" and "one seed, no spread" in check.text
    assert _check(_results([12.0], [10.0]), "adapted teacher").verdict == "holds"


def test_a_missing_model_is_not_measured():
    results = _results([12.0], [10.0])
    del results["teacher_self_train"]
    assert _check(results, "adapted teacher").verdict == "not measured"
