"""The project's one confidence interval: Student's t on the mean of a few values.

Used for differences paired by seed (``analysis.study.paired``) and for ratios
paired by round (``analysis.measure.bench_cpu``, on their logs).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats


def t_interval(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample standard deviation, half-width) of ``values``: the mean lies
    in mean ± half-width with ``confidence``, from Student's t with n - 1
    degrees of freedom. At least two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"values: expected at least 2 values in a 1-D sequence, got shape {values.shape}")
    mean, std = float(values.mean()), float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1) * std / math.sqrt(values.size))
    return mean, std, half
