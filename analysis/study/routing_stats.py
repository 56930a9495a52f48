"""Routing metrics on plain arrays: what the routing chapter measures, testable by hand.

Inputs are the routing decisions of one MoE layer over N token positions, as
the kernels contract has them: ``experts`` (N, K) int, the K chosen experts
of each token in descending order; ``weights`` (N, K), their routing weights;
``probs`` (N, E), the router's softmax. Nothing here needs torch.

Definitions (each function's docstring repeats its own):

- load fraction of expert e: its share of all N * K assignments;
- coefficient of variation (CV) of the load: population std / mean over the E
  experts (0 when perfectly balanced; Shazeer et al. 2017 report it);
- max/mean load: the busiest expert's load over the mean load, 1 / E of the
  assignments (1 when balanced, E when one expert takes everything);
- router entropy: mean over tokens of -sum_e p log p, in nats, at most log E;
- specialisation: for each byte class, the share of its assignments that
  went to each expert (rows sum to 1; 1 / E everywhere if routing ignored the class);
- co-activation (K = 2): P(b | a), over tokens routed to a, the share whose
  other expert is b (both orders counted, so the matrix is the row-normalised
  symmetric pair count; the diagonal is 0 because the two experts differ);
- second-weight share (K = 2): the mean of weights[:, 1] / (weights[:, 0] + weights[:, 1]);
- same-expert rate: over consecutive positions of the same sequence, how
  often the first-choice expert repeats; uniform random routing gives 1 / E,
  and independent draws from the observed load give sum_e load_e ** 2. Bytes
  repeat (runs of spaces in indentation), and a repeated byte in the same
  context tends to go where its predecessor went, so the rate is also given on
  pairs of different bytes only (``same_expert_by_byte_pair``);
- per-batch load CV: the CV of each batch's load, then its mean and spread over
  batches (Shazeer et al. 2017 report the CV per batch). The largest possible
  CV, every assignment on K experts, is sqrt(E / K - 1) (``max_cv``), since
  CV ** 2 = E * sum_e load_e ** 2 - 1 for loads that sum to 1.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

BYTE_CLASSES = ("letter", "digit", "space or indent", "newline", "punctuation", "quote", "other")
_QUOTES = b"'\"`"
_PUNCTUATION = b"!#$%&()*+,-./:;<=>?@[\\]^_{|}~"


def _byte_class_table() -> np.ndarray:
    table = np.full(256, BYTE_CLASSES.index("other"), dtype=np.int64)
    for value in range(256):
        char = bytes([value])
        if char.isalpha():  # bytes.isalpha is ASCII-only
            table[value] = BYTE_CLASSES.index("letter")
        elif char.isdigit():
            table[value] = BYTE_CLASSES.index("digit")
        elif char in (b" ", b"\t"):
            table[value] = BYTE_CLASSES.index("space or indent")
        elif char in (b"\n", b"\r"):
            table[value] = BYTE_CLASSES.index("newline")
        elif char in _QUOTES:
            table[value] = BYTE_CLASSES.index("quote")
        elif char in _PUNCTUATION:
            table[value] = BYTE_CLASSES.index("punctuation")
    return table


_BYTE_CLASS = _byte_class_table()


def byte_classes(data) -> np.ndarray:
    """The class index (into BYTE_CLASSES) of each byte: ASCII letters, digits, space and
    tab, newline (LF, CR), ASCII punctuation other than quotes, quotes (' \" `), other
    (non-ASCII bytes of UTF-8 text, control bytes, the document separator 0)."""
    return _BYTE_CLASS[np.asarray(data, dtype=np.uint8)]


def load_fraction(experts, n_experts: int) -> np.ndarray:
    """(E,) each expert's share of the N * K assignments (sums to 1)."""
    experts = np.asarray(experts).reshape(-1)
    if experts.size == 0:
        raise ValueError("experts: expected at least one assignment, got none")
    return np.bincount(experts, minlength=n_experts).astype(np.float64) / experts.size


def coefficient_of_variation(load) -> float:
    """Population standard deviation over mean of the per-expert load."""
    load = np.asarray(load, dtype=np.float64)
    return float(load.std() / load.mean())


def max_over_mean(load) -> float:
    """The busiest expert's load over the mean load (1 when balanced, E at worst)."""
    load = np.asarray(load, dtype=np.float64)
    return float(load.max() / load.mean())


def mean_entropy(probs) -> float:
    """Mean over tokens of the router's entropy -sum_e p log p, in nats (0 log 0 = 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, -probs * np.log(probs), 0.0)
    return float(terms.sum(axis=1).mean())


def specialisation(experts, classes, n_experts: int, n_classes: int = len(BYTE_CLASSES)) -> np.ndarray:
    """(n_classes, E): row c is the share of class-c tokens' assignments that went to each
    expert (every one of the K choices counts once). A class with no tokens gets NaN."""
    experts = np.asarray(experts)
    classes = np.asarray(classes).reshape(-1)
    K = experts.shape[1]
    counts = np.zeros((n_classes, n_experts), dtype=np.float64)
    np.add.at(counts, (np.repeat(classes, K), experts.reshape(-1)), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def coactivation(experts, n_experts: int) -> np.ndarray:
    """(E, E) P(b | a) for K = 2: row a is, over tokens routed to a (first or second
    choice), the share whose other expert is b. Rows of unused experts are NaN."""
    experts = np.asarray(experts)
    if experts.ndim != 2 or experts.shape[1] != 2:
        raise ValueError(f"experts: expected (N, 2) for co-activation, got shape {experts.shape}")
    pairs = np.zeros((n_experts, n_experts), dtype=np.float64)
    np.add.at(pairs, (experts[:, 0], experts[:, 1]), 1.0)
    pairs = pairs + pairs.T
    totals = pairs.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, pairs / totals, np.nan)


def second_weight_share(weights) -> float:
    """Mean share of the routing weight on the second expert, weights[:, 1] / sum (K = 2)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != 2:
        raise ValueError(f"weights: expected (N, 2), got shape {weights.shape}")
    return float((weights[:, 1] / weights.sum(axis=1)).mean())


def same_expert_rate(experts, sequence=None) -> float:
    """Share of consecutive positions (t - 1, t) within one sequence whose first-choice
    expert is the same. ``sequence`` (N,) labels each position's sequence (default:
    all one sequence); pairs that straddle two sequences are not counted."""
    first = np.asarray(experts).reshape(len(experts), -1)[:, 0]
    same_sequence = np.ones(first.size - 1, dtype=bool) if sequence is None else \
        np.asarray(sequence)[1:] == np.asarray(sequence)[:-1]
    if not same_sequence.any():
        raise ValueError("experts: expected at least two consecutive positions in one sequence")
    return float((first[1:] == first[:-1])[same_sequence].mean())


def shared_expert_rate(experts, sequence=None) -> float:
    """For K = 2: share of consecutive positions whose expert sets overlap (either of
    the two experts in common). Uniform random pairs of E = 8 give 13/28 = 0.464."""
    experts = np.asarray(experts)
    previous, current = experts[:-1], experts[1:]
    overlap = (previous[:, :, None] == current[:, None, :]).any(axis=(1, 2))
    same_sequence = np.ones(overlap.size, dtype=bool) if sequence is None else \
        np.asarray(sequence)[1:] == np.asarray(sequence)[:-1]
    return float(overlap[same_sequence].mean())


def random_same_expert_rate(n_experts: int, load: Optional[np.ndarray] = None) -> float:
    """What the same-expert rate would be by chance: 1 / E for uniform routing, or
    sum_e load_e ** 2 for independent draws from a given load distribution."""
    if load is None:
        return 1.0 / n_experts
    load = np.asarray(load, dtype=np.float64)
    return float(np.sum(load ** 2))


def same_expert_by_byte_pair(experts, data_bytes, sequence=None) -> dict:
    """The same-expert rate of consecutive positions split by whether the two input
    bytes are equal: ``same_byte_share`` (share of the pairs whose bytes are equal),
    ``space_pair_share`` (share of the pairs that are two spaces),
    ``rate_same_bytes`` and ``rate_different_bytes`` (NaN where there are no such pairs)."""
    first = np.asarray(experts).reshape(len(experts), -1)[:, 0]
    data_bytes = np.asarray(data_bytes).reshape(-1)
    if data_bytes.size != first.size:
        raise ValueError(f"data_bytes: expected one byte per position ({first.size}), got {data_bytes.size}")
    in_sequence = np.ones(first.size - 1, dtype=bool) if sequence is None else \
        np.asarray(sequence)[1:] == np.asarray(sequence)[:-1]
    same_expert = (first[1:] == first[:-1])[in_sequence]
    same_byte = (data_bytes[1:] == data_bytes[:-1])[in_sequence]
    if same_expert.size == 0:
        raise ValueError("experts: expected at least two consecutive positions in one sequence")

    def rate(mask):
        return float(same_expert[mask].mean()) if mask.any() else float("nan")

    space_pair = (same_byte & (data_bytes[1:] == ord(" "))[in_sequence])
    return {"same_byte_share": float(same_byte.mean()), "space_pair_share": float(space_pair.mean()),
            "rate_same_bytes": rate(same_byte), "rate_different_bytes": rate(~same_byte)}


def sum_squared_load(load) -> float:
    """sum_e load_e ** 2: 1 / E when balanced, 1 when one expert takes everything; also
    the chance that two independent draws from the load pick the same expert."""
    load = np.asarray(load, dtype=np.float64)
    return float(np.sum(load ** 2))


def max_cv(n_experts: int, top_k: int = 1) -> float:
    """The largest load CV: every assignment on top_k experts, sqrt(E / K - 1)."""
    return math.sqrt(n_experts / top_k - 1)


def per_batch_cv(experts, batch, n_experts: int) -> np.ndarray:
    """The load CV of each batch (``batch`` (N,) labels each position's batch), in batch order."""
    experts = np.asarray(experts)
    batch = np.asarray(batch).reshape(-1)
    if batch.size != experts.shape[0]:
        raise ValueError(f"batch: expected one label per position ({experts.shape[0]}), got {batch.size}")
    return np.array([coefficient_of_variation(load_fraction(experts[batch == b], n_experts))
                     for b in np.unique(batch)])


def random_shared_expert_rate(n_experts: int) -> float:
    """Chance that two uniformly random expert pairs overlap: 1 - C(E-2, 2) / C(E, 2)."""
    return 1.0 - math.comb(n_experts - 2, 2) / math.comb(n_experts, 2)


def drop_rate(experts, n_experts: int, capacity_factor: Optional[float], tokens_per_call: int) -> float:
    """Share of assignments a capacity would drop, with the kernels' dispatch rule.

    The N positions are cut into consecutive calls of ``tokens_per_call`` tokens (a
    training batch); each call keeps at most C = ceil(capacity_factor * T * K / E)
    assignments per expert, j-major (``topk_moe.dispatch``). None: dropless.
    """
    import topk_moe

    experts = np.asarray(experts, dtype=np.int32)
    N, K = experts.shape
    if capacity_factor is None:
        return 0.0
    dropped = 0
    for start in range(0, N, tokens_per_call):
        chunk = experts[start:start + tokens_per_call]
        cfg = topk_moe.MoEConfig(d_model=1, d_ff=1, n_experts=n_experts, top_k=K, capacity_factor=capacity_factor)
        plan = topk_moe.dispatch(chunk, n_experts, capacity=topk_moe.capacity(cfg, chunk.shape[0]), backend="cpu")
        dropped += int(np.count_nonzero(np.asarray(plan.row) < 0))
    return dropped / (N * K)
