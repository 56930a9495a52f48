"""Inputs whose routing follows a chosen load pattern: how the sweep makes skew.

A real router's load is whatever its training left it; to time a whole
``moe_forward`` under a *known* skew, the sweep keeps the router (random, as
``topk_moe.init_weights`` draws it) and builds the tokens instead. Each token t
draws its K target experts e_1 (from the skew's distribution) and e_2 (from
the same distribution over the other experts), and becomes

    x[t] = z[t] + FIRST_MARGIN * c[e_1] + SECOND_MARGIN * c[e_2],

with z[t] standard normal and c[e] = router[:, e] / |router[:, e]|^2, so that
c[e] . router[:, e] = 1: the logit of e_1 rises by FIRST_MARGIN and that of
e_2 by SECOND_MARGIN, while the noise logits z[t] . router[:, e] have a
standard deviation of |router[:, e]| (about 1 at init scale). The margins are
many standard deviations, so the routing follows the targets nearly always;
the sweep records the load it actually got (tokens per expert), never the
target. Only x changes: the router, the experts and the kernels are the ones
being measured.

Skews (``SKEWS``):
  uniform      every expert equally likely
  zipf-1.0     P(e) proportional to 1 / (e + 1)
  zipf-2.0     P(e) proportional to 1 / (e + 1)^2
  one-hot      every token's first choice is expert 0 (the second, uniform)
  half-empty   only the first ceil(E / 2) experts are ever chosen

Dimension letters as in the contract: T tokens, D model width, E experts, K
experts per token.
"""

from __future__ import annotations

import math

import numpy

SKEWS = ("uniform", "zipf-1.0", "zipf-2.0", "one-hot", "half-empty")
FIRST_MARGIN = 12.0
SECOND_MARGIN = 6.0


def skew_probabilities(skew: str, E: int) -> numpy.ndarray:
    """P(first choice = e) for each expert, (E,) float64 summing to 1."""
    ranks = numpy.arange(1, E + 1, dtype=numpy.float64)
    if skew == "uniform":
        weights = numpy.ones(E)
    elif skew.startswith("zipf-"):
        try:
            exponent = float(skew.removeprefix("zipf-"))
        except ValueError:
            raise ValueError(f"skew: expected one of {SKEWS} or 'zipf-<exponent>', got {skew!r}") from None
        weights = ranks ** -exponent
    elif skew == "one-hot":
        weights = (ranks == 1).astype(numpy.float64)
    elif skew == "half-empty":
        weights = (ranks <= math.ceil(E / 2)).astype(numpy.float64)
    else:
        raise ValueError(f"skew: expected one of {SKEWS} or 'zipf-<exponent>', got {skew!r}")
    return weights / weights.sum()


def target_experts(skew: str, T: int, E: int, K: int, rng: numpy.random.Generator) -> numpy.ndarray:
    """(T, K) int64 distinct targets per token: the first from the skew's
    distribution, the second from it over the remaining experts (uniform over
    the remaining allowed ones where that has no mass, as for one-hot)."""
    if K not in (1, 2) or K > E:
        raise ValueError(f"K: expected 1 or 2 and at most E={E}, got {K}")
    probabilities = skew_probabilities(skew, E)
    first = rng.choice(E, size=T, p=probabilities)
    if K == 1:
        return first[:, None]
    allowed = probabilities > 0 if skew == "half-empty" else numpy.ones(E, dtype=bool)
    if allowed.sum() < 2:
        raise ValueError(f"skew {skew!r}: E={E} leaves fewer than K={K} experts to choose from")
    second = numpy.empty(T, dtype=numpy.int64)
    for e in range(E):  # one draw per distinct first choice, not per token
        tokens = numpy.nonzero(first == e)[0]
        if tokens.size == 0:
            continue
        rest = probabilities.copy()
        rest[e] = 0.0
        if rest.sum() == 0.0:
            rest = (allowed & (numpy.arange(E) != e)).astype(numpy.float64)
        second[tokens] = rng.choice(E, size=tokens.size, p=rest / rest.sum())
    return numpy.stack([first, second], axis=1)


def skewed_inputs(skew: str, T: int, router, K: int, *, seed: int = 0, dtype=numpy.float32,
                  xp=numpy):
    """Tokens x (T, D) in ``dtype`` whose top-K routing under ``router`` (D, E)
    follows ``skew`` (see the module docstring for the construction).

    ``xp`` is the array module the tokens are made in (``numpy``, or ``cupy``
    for device arrays: the noise is drawn on the device). The targets and the
    directions c[e] are computed on the host, so they agree across ``xp``.
    """
    router_host = numpy.asarray(router.get() if hasattr(router, "get") else router, dtype=numpy.float64)
    D, E = router_host.shape
    rng = numpy.random.default_rng([seed, T, K, E])
    targets = target_experts(skew, T, E, K, rng)
    directions = (router_host / (router_host ** 2).sum(axis=0)).T  # (E, D): c[e]
    boosts = numpy.zeros((T, E))
    boosts[numpy.arange(T), targets[:, 0]] = FIRST_MARGIN
    if K == 2:
        boosts[numpy.arange(T), targets[:, 1]] = SECOND_MARGIN
    noise = standard_normal(xp, (T, D), seed=[seed, T, K, E, 1])
    # (T, E) @ (E, D) where x lives: only the small factors cross to the device.
    x = noise + xp.asarray(boosts.astype(numpy.float32)) @ xp.asarray(directions.astype(numpy.float32))
    return x.astype(dtype)


def standard_normal(xp, shape: tuple, *, seed) -> object:
    """float32 standard normal numbers of ``shape`` from ``xp`` (NumPy on the
    host, CuPy on the device), reproducible from ``seed``."""
    if xp is numpy:
        return numpy.random.default_rng(seed).standard_normal(shape, dtype=numpy.float32)
    seed_int = int(numpy.random.SeedSequence(seed).generate_state(1)[0])
    return xp.random.RandomState(seed_int).standard_normal(shape, dtype=xp.float32)


def load_summary(tokens_per_expert) -> dict:
    """What a load pattern did: kept rows per expert, the busiest expert's
    rows over the mean, and how many experts got none."""
    counts = numpy.asarray(tokens_per_expert.get() if hasattr(tokens_per_expert, "get")
                           else tokens_per_expert, dtype=numpy.int64)
    mean = counts.mean() if counts.size else 0.0
    return {
        "tokens_per_expert": counts.tolist(),
        "load_max_over_mean": float(counts.max() / mean) if mean > 0 else None,
        "experts_used": int(numpy.count_nonzero(counts)),
    }
