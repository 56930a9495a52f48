"""Each routing metric on cases small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.study import routing_stats as stats


def test_byte_classes():
    text = b"aZ 9\t\n\r.'\"`_\xc3\x00"
    expected = ["letter", "letter", "space or indent", "digit", "space or indent", "newline", "newline",
                "punctuation", "quote", "quote", "quote", "punctuation", "other", "other"]
    assert [stats.BYTE_CLASSES[c] for c in stats.byte_classes(np.frombuffer(text, np.uint8))] == expected


def test_load_fraction_cv_and_max_over_mean():
    # E = 4, K = 2: assignments 0,1 | 0,2 | 0,1 | 3,0 -> counts [4, 2, 1, 1] of 8
    experts = np.array([[0, 1], [0, 2], [0, 1], [3, 0]])
    load = stats.load_fraction(experts, 4)
    np.testing.assert_allclose(load, [0.5, 0.25, 0.125, 0.125])
    # mean 0.25; deviations 0.25, 0, -0.125, -0.125; variance (0.0625 + 2 * 0.015625) / 4
    assert stats.coefficient_of_variation(load) == pytest.approx(math.sqrt(0.09375 / 4) / 0.25)
    assert stats.max_over_mean(load) == pytest.approx(2.0)
    balanced = stats.load_fraction([[0], [1], [2], [3]], 4)
    assert stats.coefficient_of_variation(balanced) == 0.0 and stats.max_over_mean(balanced) == 1.0
    assert stats.max_over_mean(stats.load_fraction([[2], [2]], 4)) == 4.0  # all on one: E


def test_entropy():
    uniform = np.full((3, 8), 1 / 8)
    assert stats.mean_entropy(uniform) == pytest.approx(math.log(8))
    one_hot = np.eye(4)[[0, 2]]
    assert stats.mean_entropy(one_hot) == 0.0
    assert stats.mean_entropy([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]) == pytest.approx(math.log(2) / 2)


def test_specialisation_rows_are_shares_of_each_class():
    experts = np.array([[0], [0], [1], [2]])
    classes = np.array([0, 0, 0, 1])  # class 0: experts 0, 0, 1; class 1: expert 2; class 2: none
    matrix = stats.specialisation(experts, classes, n_experts=3, n_classes=3)
    np.testing.assert_allclose(matrix[0], [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(matrix[1], [0, 0, 1])
    assert np.isnan(matrix[2]).all()
    # with K = 2 both choices count
    matrix = stats.specialisation(np.array([[0, 1]]), np.array([0]), n_experts=2, n_classes=1)
    np.testing.assert_allclose(matrix, [[0.5, 0.5]])


def test_coactivation_is_p_b_given_a():
    experts = np.array([[0, 1], [1, 0], [0, 2], [3, 1]])
    matrix = stats.coactivation(experts, 4)
    # pairs {0,1} twice, {0,2} once, {3,1} once
    np.testing.assert_allclose(matrix[0], [0, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(matrix[1], [2 / 3, 0, 0, 1 / 3])
    np.testing.assert_allclose(matrix[2], [1, 0, 0, 0])
    np.testing.assert_allclose(matrix[3], [0, 1, 0, 0])
    with pytest.raises(ValueError, match="experts"):
        stats.coactivation(np.array([[0], [1]]), 4)


def test_second_weight_share():
    assert stats.second_weight_share([[0.75, 0.25], [0.5, 0.5]]) == pytest.approx(0.375)
    assert stats.second_weight_share([[0.6, 0.2]]) == pytest.approx(0.25)  # not renormalised: share of the sum


def test_same_expert_rate_counts_pairs_within_a_sequence():
    experts = np.array([[1], [1], [2], [2], [2], [0]])
    # pairs: (1,1) yes, (1,2) no, (2,2) yes, (2,2) yes, (2,0) no
    assert stats.same_expert_rate(experts) == pytest.approx(3 / 5)
    sequence = np.array([0, 0, 0, 1, 1, 1])  # the (2 | 2) pair straddles sequences: not counted
    assert stats.same_expert_rate(experts, sequence) == pytest.approx(2 / 4)
    # K = 2: only the first choice counts
    assert stats.same_expert_rate(np.array([[0, 1], [0, 2], [1, 0]])) == pytest.approx(1 / 2)


def test_shared_expert_rate_and_chance_levels():
    experts = np.array([[0, 1], [1, 2], [3, 4], [4, 3]])
    assert stats.shared_expert_rate(experts) == pytest.approx(2 / 3)
    assert stats.random_same_expert_rate(8) == 0.125
    assert stats.random_same_expert_rate(4, np.array([0.5, 0.5, 0, 0])) == 0.5
    assert stats.random_shared_expert_rate(8) == pytest.approx(13 / 28)


def test_drop_rate_follows_the_kernels_dispatch():
    # E = 2, K = 1, calls of 4 tokens, capacity factor 1: C = ceil(1 * 4 * 1 / 2) = 2
    experts = np.array([[0], [0], [0], [1], [0], [1], [1], [1]])
    # call 1: expert 0 gets 3, keeps 2 -> 1 dropped; call 2: expert 1 gets 3 -> 1 dropped
    assert stats.drop_rate(experts, 2, 1.0, tokens_per_call=4) == pytest.approx(2 / 8)
    assert stats.drop_rate(experts, 2, None, tokens_per_call=4) == 0.0
    assert stats.drop_rate(experts, 2, 2.0, tokens_per_call=4) == 0.0
    # K = 2, E = 2, 2 tokens, factor 0.5: C = ceil(0.5 * 2 * 2 / 2) = 1; j-major: first choices win
    experts = np.array([[0, 1], [1, 0]])
    assert stats.drop_rate(experts, 2, 0.5, tokens_per_call=2) == pytest.approx(2 / 4)


def _collected(n_experts: int) -> dict:
    rng = np.random.default_rng(0)
    experts = rng.integers(0, n_experts, size=(64, 1))
    probs = rng.dirichlet(np.ones(n_experts), size=64)
    return {("moe-k1", 0): {"n_experts": n_experts, "top_k": 1, "experts": [experts],
                            "weights": [np.take_along_axis(probs, experts, axis=1)], "probs": [probs],
                            "sequence": np.repeat(np.arange(4), 16), "batch": np.repeat(np.arange(2), 32),
                            "bytes": rng.integers(0, 3, size=64).astype(np.uint8)}}


@pytest.mark.parametrize("n_experts", [4, 16])
def test_routing_headline_takes_e_from_the_runs(n_experts):
    from analysis.chapters import routing
    table = routing.metrics_table(_collected(n_experts))
    numbers = routing.headline_numbers(table)
    assert numbers["n_experts"] == n_experts
    assert numbers["uniform_same_expert"] == pytest.approx(1 / n_experts)
    assert numbers["log_E"] == pytest.approx(math.log(n_experts))
    mixed = routing.metrics_table({**_collected(4), ("moe-k1", 1): _collected(8)[("moe-k1", 0)]})
    with pytest.raises(ValueError, match="n_experts"):
        routing.headline_numbers(mixed)


def test_routing_published_figures_are_read_from_the_one_table(monkeypatch):
    from analysis.chapters import published, routing
    changed = [dict(entry) for entry in published.ANCHORS]
    for entry in changed:
        if entry["source"] == "Mixtral":
            entry.update(value_text="31.0% to 33.0%", baseline=0.25, setting="a model of E = 4")
    monkeypatch.setattr(published, "ANCHORS", changed)
    table = routing.beside_published(routing.metrics_table(_collected(16)))
    mixtral = table[table["source"].str.startswith("Mixtral")]
    assert len(mixtral) == 2 and (mixtral["published (far larger models)"] == "31.0% to 33.0%").all()
    assert "25.0% for Mixtral" in mixtral["quantity"].iloc[0] and "6.2% for ours" in mixtral["quantity"].iloc[0]
    assert "different bytes" in mixtral["quantity"].iloc[1]
    # The CV row gives both bounds: sqrt(E - 1) for our E = 16 and for Shazeer's E = 256.
    assert "3.87 for our E = 16" in table["quantity"].iloc[0] and "16.0 for their E = 256" in table["quantity"].iloc[0]
    assert routing.published_settings()["mixtral_setting"] == "a model of E = 4"


def test_same_expert_rate_by_byte_pair():
    # bytes a a b c c, experts 0 0 1 1 2: pairs (a,a) same expert, (a,b) differ,
    # (b,c) same expert, (c,c) differ. Same-byte pairs: 2 of 4, one of them same expert.
    result = stats.same_expert_by_byte_pair([[0], [0], [1], [1], [2]], np.frombuffer(b"aabcc", np.uint8))
    assert result == {"same_byte_share": 0.5, "space_pair_share": 0.0, "rate_same_bytes": 0.5,
                      "rate_different_bytes": 0.5}
    spaces = stats.same_expert_by_byte_pair([[0], [0], [1]], np.frombuffer(b"  x", np.uint8))
    assert spaces["space_pair_share"] == 0.5 and spaces["same_byte_share"] == 0.5
    # A sequence boundary between positions 1 and 2 drops the pair (a, b).
    split = stats.same_expert_by_byte_pair([[0], [0], [1], [1], [2]], np.frombuffer(b"aabcc", np.uint8),
                                           sequence=[0, 0, 1, 1, 1])
    assert split["same_byte_share"] == pytest.approx(2 / 3) and split["rate_different_bytes"] == 1.0


def test_max_cv_and_sum_of_squares():
    E = 8
    collapsed = stats.load_fraction([[3]] * 5, E)
    assert stats.coefficient_of_variation(collapsed) == pytest.approx(stats.max_cv(E)) == pytest.approx(math.sqrt(7))
    two = stats.load_fraction([[1, 2]] * 5, E)
    assert stats.coefficient_of_variation(two) == pytest.approx(stats.max_cv(E, top_k=2))
    load = stats.load_fraction([[0], [0], [1], [2]], 4)
    assert stats.sum_squared_load(load) == pytest.approx(0.25 + 0.0625 * 2)
    # CV ** 2 = E * sum load ** 2 - 1
    assert stats.coefficient_of_variation(load) ** 2 == pytest.approx(4 * stats.sum_squared_load(load) - 1)


def test_per_batch_cv():
    experts = np.array([[0], [1], [0], [0]])
    cvs = stats.per_batch_cv(experts, [0, 0, 1, 1], 2)
    np.testing.assert_allclose(cvs, [0.0, 1.0])


def test_versus_chance_words():
    from analysis.chapters import routing

    assert routing.versus_chance(0.179, 0.158) == "barely above"
    assert routing.versus_chance(0.39, 0.125) == "far above"
    assert routing.versus_chance(0.2, 0.125) == "above"
    assert routing.versus_chance(0.1, 0.125) == "no higher than"
    numbers = {"uniform_same_expert": 0.125, "moe_k1_same_expert_rate": 0.39,
               "moe_k1_same_expert_different_bytes": 0.179, "moe_k1_same_expert_by_load": 0.158}
    assert routing.chance_numbers(numbers) == {"moe_k1_same_vs_chance": "far above",
                                               "moe_k1_different_vs_chance": "barely above"}


def test_metrics_tables_split_the_summary_and_name_the_arms():
    import pandas as pd

    from analysis.chapters import routing

    formatted = pd.DataFrame({"arm": ["moe-k1"], "layer": [0], "load CV per batch": ["0.10 ± 0.01"],
                              "load max/mean": ["1.60 ± 0.10"], "entropy / log E": ["0.9 ± 0.0"],
                              "same expert, consecutive bytes": ["0.39 ± 0.01"],
                              "same expert, different bytes": ["0.18 ± 0.01"], "chance (from load)": ["0.16 ± 0.0"],
                              "2nd-expert weight share": [""], "seeds": [3]})
    load, reuse = routing.metrics_tables(formatted)
    assert list(load.columns) == ["arm", "layer", "load CV per batch", "load max/mean", "entropy / log E", "seeds"]
    assert list(reuse.columns) == ["arm", "layer", "same expert, consecutive bytes", "same expert, different bytes",
                                   "chance (from load)"]  # the k = 2 column is empty for a top-1 arm
    assert load["arm"].iloc[0] == "top-1 MoE"
    assert list(routing.published_view().columns) == ["source", "where", "quantity", "published"]
