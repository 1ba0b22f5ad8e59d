"""Chi-square goodness of fit for sampled index counts, valid also when some cells are rare."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

MIN_EXPECTED = 5.0  # Cochran's rule: the chi-square approximation needs about 5 expected draws per cell


def frequency_pvalue(observed: torch.Tensor, expected: torch.Tensor, min_expected: float = MIN_EXPECTED) -> float:
    """p-value of observed counts against expected counts (same total), the rarest cells pooled into one that expects ``min_expected``.

    Without pooling, one draw of a candidate expected 0.01 times adds ~100 to the statistic (p ≈ 1e-18)
    although it happens in 1 % of runs: the test then fails on chance, not on a wrong distribution.
    """
    observed, expected = observed.double(), expected.double()
    order = torch.argsort(expected)  # rarest first: pool them until the pooled cell expects min_expected
    pooled = int(torch.searchsorted(expected[order].cumsum(0), torch.tensor(min_expected, dtype=torch.float64))) + 1
    if pooled <= 1 or pooled >= expected.numel():  # nothing rare, or everything rare: a plain test
        return float(chisquare(observed.numpy(), expected.numpy()).pvalue)
    rare, common = order[:pooled], order[pooled:]
    cells_observed = torch.cat([observed[common], observed[rare].sum()[None]])
    cells_expected = torch.cat([expected[common], expected[rare].sum()[None]])
    return float(chisquare(cells_observed.numpy(), cells_expected.numpy()).pvalue)
