"""Paired comparisons over seeds: the difference, its spread, an interval and a test.

Every arm of the study trains with the same seeds, and for one seed every arm
sees the same data in the same order (analysis/study/train.py). So two arms are
compared seed by seed: d_s = metric(arm, seed s) - metric(baseline, seed s).
Over the n seeds both arms have:

- ``mean`` and ``std`` (sample, n - 1) of the d_s;
- the 95% interval for the mean difference from Student's t with n - 1 degrees
  of freedom, mean ± t * std / sqrt(n);
- the two-sided paired t-test's p-value (scipy.stats.ttest_rel, the same t);
- ``supported``: the interval excludes 0 (equivalently p < 0.05);
- ``seeds_needed``: the smallest n at which a paired t-test at the 5% level would
  detect a true difference of the observed mean with 80% power, if the spread
  of d were the observed one (the noncentral t, scipy.stats.nct). With three
  seeds this is a rough guide: the spread itself is poorly known.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

from analysis.intervals import t_interval

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 1000


def seeds_needed(mean: float, std: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest n with power >= `power` to detect `mean` (std of the paired
    differences `std`) with a two-sided paired t-test at level `alpha`; inf beyond
    MAX_SEEDS or when mean is 0, NaN when std is unknown."""
    if not (np.isfinite(mean) and np.isfinite(std)) or std < 0:
        return float("nan")
    if mean == 0:
        return float("inf")
    if std == 0:
        return 2.0
    effect = abs(mean) / std
    for n in range(2, MAX_SEEDS + 1):
        df = n - 1
        critical = stats.t.ppf(1 - alpha / 2, df)
        shift = effect * math.sqrt(n)
        achieved = stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift)
        if achieved >= power:
            return float(n)
    return float("inf")


def paired_difference(values: Sequence[float], baseline: Sequence[float], *, confidence: float = 0.95) -> dict:
    """values[s] - baseline[s] over the seeds s (same order): see the module docstring."""
    values, baseline = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if values.shape != baseline.shape or values.ndim != 1:
        raise ValueError(f"values, baseline: expected two 1-D arrays of one length, got {values.shape} "
                         f"and {baseline.shape}")
    differences = values - baseline
    n = differences.size
    if n < 2:
        raise ValueError(f"values: expected at least 2 paired seeds, got {n}")
    mean, std, half = t_interval(differences, confidence=confidence)
    p_value = float(stats.ttest_rel(values, baseline).pvalue) if std > 0 else (0.0 if mean != 0 else 1.0)
    return {"n": n, "differences": differences.tolist(), "mean": mean, "std": std,
            "low": mean - half, "high": mean + half, "p_value": p_value,
            "supported": bool(mean - half > 0 or mean + half < 0),
            "relative": float(mean / baseline.mean()), "seeds_needed": seeds_needed(mean, std)}
