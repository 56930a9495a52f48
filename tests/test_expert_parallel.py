"""Expert parallelism (topk_moe.expert_parallel) across processes joined by gloo.

One pool of four worker processes is started for the whole module (spawn and
the gloo rendezvous cost seconds, most of this file's time) and serves P = 4
and, through a sub-group of its first two ranks, P = 2. Each case sends every
rank its tokens and its shard of the weights; each rank's result is compared,
here in the parent, with single-process ``topk_moe.moe_forward`` on the same
tokens under the project's tolerance rule, and its counted bytes with the
byte formula worked out here from the single-process plans.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)

import topk_moe  # noqa: E402
from topk_moe import testing  # noqa: E402
from topk_moe.expert_parallel import COUNT_BYTES, expected_row_bytes  # noqa: E402

from analysis.measure import expert_parallel as measure  # noqa: E402

D, F, E = 16, 24, 8
#: Uneven tokens per rank, one rank with none (T_r = 0), odd sizes.
TOKENS = (37, 0, 64, 5)


@pytest.fixture(scope="module")
def pool():
    with measure.RankPool(4, timeout_s=180) as ranks:
        yield ranks


def make_inputs(P, cfg, seed=0, dtype=np.float32, tokens=TOKENS):
    full = topk_moe.init_weights(cfg, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    xs = [rng.standard_normal((T, cfg.d_model)).astype(dtype) for T in tokens[:P]]
    return full, xs


def cases(P, cfg, full, xs, **extra):
    return [{"x": xs[r], "weights": measure.shard(full, r, P), "cfg": cfg, **extra} for r in range(P)]


def check_against_single_process(cfg, full, xs, results):
    """Every rank's y, routing and drops against moe_forward on its own tokens."""
    for rank, (x, result) in enumerate(zip(xs, results)):
        single = topk_moe.moe_forward(x, full, cfg, backend="cpu")
        np.testing.assert_array_equal(result["experts"], single.routing.experts, err_msg=f"rank {rank} routing")
        np.testing.assert_array_equal(result["row"], single.plan.row, err_msg=f"rank {rank} kept rows")
        expected = testing.expected_moe_forward(x, full, cfg, single.routing)
        plain = testing.plain_moe_forward(x, full, cfg, single.routing)
        scale = testing.moe_term_scale(x, full, cfg, single.routing.experts)
        testing.assert_close_to_reference(result["y"], expected, plain, name=f"rank {rank} y", scale=scale)


def rows_by_destination(cfg, P, x, full):
    """rows[q]: the kept assignments of these tokens whose expert lives on rank q,
    from the single-process plan (expert e lives on rank e // (E/P))."""
    plan = topk_moe.moe_forward(x, full, cfg, backend="cpu").plan
    return plan.counts.reshape(P, cfg.n_experts // P).sum(axis=1)


def check_bytes(cfg, P, full, xs, results, itemsize):
    sent = np.array([rows_by_destination(cfg, P, x, full) for x in xs])  # sent[r, q]: rows r -> q
    for rank, result in enumerate(results):
        traffic = result["traffic"]
        others = [q for q in range(P) if q != rank]
        assert traffic["count_bytes"] == COUNT_BYTES * (cfg.n_experts // P) * (P - 1)
        assert traffic["row_bytes"] == sum(sent[rank, q] for q in others) * cfg.d_model * itemsize
        assert traffic["return_bytes"] == sum(sent[q, rank] for q in others) * cfg.d_model * itemsize
        assert list(traffic["rows_to"]) == list(sent[rank])


# ---------------------------------------------------------------------------
# Same answer as one process


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 1.25])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("P", [2, 4])
def test_matches_single_process_on_each_rank(pool, P, k, capacity_factor):
    cfg = topk_moe.MoEConfig(D, F, E, k, capacity_factor=capacity_factor)
    full, xs = make_inputs(P, cfg, seed=10 * P + k)
    results = pool.values(measure.forward_on_rank, cases(P, cfg, full, xs), P)
    check_against_single_process(cfg, full, xs, results)
    check_bytes(cfg, P, full, xs, results, itemsize=4)
    assert results[1]["y"].shape == (0, D)  # the rank without tokens took part
    if capacity_factor == 1.0 and k == 2:  # the capacity is per rank, and here it dropped rows
        assert any((r["row"] < 0).any() for r in results)


def test_float64_gelu_and_numpy_inputs(pool):
    cfg = topk_moe.MoEConfig(D, F, E, 2, activation="gelu", capacity_factor=1.25)
    full, xs = make_inputs(4, cfg, seed=3, dtype=np.float64)
    results = pool.values(measure.forward_on_rank, cases(4, cfg, full, xs, tensors=False), 4)
    assert all(r["y"].dtype == np.float64 for r in results)
    check_against_single_process(cfg, full, xs, results)
    check_bytes(cfg, 4, full, xs, results, itemsize=8)


def test_a_rank_whose_experts_receive_no_rows(pool):
    """Positive tokens and a router whose columns for rank 1's experts are all
    negative: no token ever picks them, yet rank 1 takes part and is right."""
    cfg = topk_moe.MoEConfig(D, F, E, 2)
    full, xs = make_inputs(4, cfg, seed=5, tokens=(9, 12, 3, 7))
    xs = [np.abs(x) for x in xs]
    router = np.abs(full.router)
    router[:, 2:4] *= -1  # experts 2 and 3: rank 1's at P = 4
    full = dataclasses.replace(full, router=router)
    results = pool.values(measure.forward_on_rank, cases(4, cfg, full, xs), 4)
    assert sum(results[1]["traffic"]["rows_from"]) == 0
    check_against_single_process(cfg, full, xs, results)
    check_bytes(cfg, 4, full, xs, results, itemsize=4)


def test_byte_formula_for_uniform_routing():
    # Each of T_r·K rows leaves the rank with probability (P-1)/P.
    assert expected_row_bytes(100, 2, 16, 4, 4) == 100 * 2 * 16 * 4 * 3 / 4
    assert expected_row_bytes(100, 2, 16, 4, 1) == 0
    assert expected_row_bytes(100, 2, 16, 4, 4) == 2 * expected_row_bytes(100, 1, 16, 4, 4)


# ---------------------------------------------------------------------------
# Bad input raises on every rank and never hangs


def errors(outcomes):
    assert all(outcome.error for outcome in outcomes), [outcome.value for outcome in outcomes]
    return [outcome.error for outcome in outcomes]


def test_experts_not_divisible_by_ranks(pool):
    cfg = topk_moe.MoEConfig(D, F, 6, 1)
    full, xs = make_inputs(4, cfg)
    shards = [{"x": x, "weights": full, "cfg": cfg} for x in xs]
    for message in errors(pool.run(measure.forward_on_rank, shards, 4)):
        assert "ValueError: cfg.n_experts: expected a multiple of the number of ranks P = 4" in message


def test_config_that_differs_across_ranks(pool):
    cfg = topk_moe.MoEConfig(D, F, E, 2)
    full, xs = make_inputs(4, cfg)
    shards = cases(4, cfg, full, xs)
    shards[2]["cfg"] = dataclasses.replace(cfg, capacity_factor=1.0)
    for message in errors(pool.run(measure.forward_on_rank, shards, 4)):
        assert "ranks disagree on the config" in message and "rank 2 has" in message


def test_router_that_differs_across_ranks(pool):
    cfg = topk_moe.MoEConfig(D, F, E, 1)
    full, xs = make_inputs(2, cfg)
    shards = cases(2, cfg, full, xs)
    shards[1]["weights"] = dataclasses.replace(shards[1]["weights"], router=full.router * 1.001)
    for message in errors(pool.run(measure.forward_on_rank, shards, 2)):
        assert "ranks disagree on the router CRC-32" in message


def test_wrong_shard_shape_on_one_rank(pool):
    cfg = topk_moe.MoEConfig(D, F, E, 2)
    full, xs = make_inputs(4, cfg)
    shards = cases(4, cfg, full, xs)
    shards[3]["weights"] = full  # all eight experts instead of two
    for message in errors(pool.run(measure.forward_on_rank, shards, 4)):
        assert "rank 3: ValueError: weights.w1: expected shape (E/P, D, F)" in message
        assert "got (8, 16, 24)" in message


def test_bad_tokens_on_one_rank(pool):
    cfg = topk_moe.MoEConfig(D, F, E, 2)
    full, xs = make_inputs(2, cfg)
    shards = cases(2, cfg, full, xs)
    shards[0]["x"] = np.ones((4, D + 1), dtype=np.float32)
    for message in errors(pool.run(measure.forward_on_rank, shards, 2)):
        assert "rank 0: ValueError: x:" in message and "cfg.d_model" in message


def test_pool_still_works_after_the_errors(pool):
    cfg = topk_moe.MoEConfig(D, F, E, 1)
    full, xs = make_inputs(4, cfg, seed=7)
    check_against_single_process(cfg, full, xs, pool.values(measure.forward_on_rank, cases(4, cfg, full, xs), 4))


# ---------------------------------------------------------------------------
# Negative control: wrong shards give a wrong answer, and the comparison sees it


def test_swapped_shards_are_caught(pool):
    cfg = topk_moe.MoEConfig(D, F, E, 2)
    full, xs = make_inputs(2, cfg, seed=11, tokens=(40, 40))
    shards = cases(2, cfg, full, xs)
    shards[0]["weights"], shards[1]["weights"] = shards[1]["weights"], shards[0]["weights"]  # same shapes
    results = pool.values(measure.forward_on_rank, shards, 2)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_against_single_process(cfg, full, xs, results)


# ---------------------------------------------------------------------------
# The measurement and the model


def test_measure_writes_every_phase_with_its_bytes(pool):
    config = measure.MeasureConfig(ranks=(2,), tokens=(8,), top_k=(2,), d_model=8, d_ff=8, n_experts=4,
                                   warmup=1, repeats=2)
    rows = measure.measure(config, pool)
    assert {(r["rank"], r["phase"]) for r in rows} == {(rank, phase) for rank in (0, 1)
                                                       for phase in (*topk_moe.expert_parallel.PHASES, "forward")}
    for row in rows:
        assert row["median_s"] > 0 and row["repeats"] == 2
        assert row["params"]["transport"] == measure.TRANSPORT
        others = sum(n for q, n in enumerate(row["rows_to"]) if q != row["rank"])
        if row["phase"] == "row_exchange":
            assert row["bytes_sent"] == others * 8 * 4
        elif row["phase"] not in ("count_exchange", "return"):
            assert row["bytes_sent"] == 0


def test_mixtral_model():
    rows = measure.mixtral_model(tokens_per_gpu=(1, 4096), top_k=(1, 2))
    assert all(row["label"] == "predicted (model)" for row in rows)
    by_key = {(row["top_k"], row["tokens_per_gpu"]): row for row in rows}
    # 4096 tokens, k = 2: 4096·2·4096·2 bytes, 7/8 of them leave the GPU, twice per layer.
    assert by_key[2, 4096]["bytes_per_layer"] == 2 * 4096 * 2 * 4096 * 2 * 7 / 8
    assert by_key[2, 4096]["NVLink (H100 SXM) s"] == pytest.approx(by_key[2, 4096]["bytes_per_layer"] / 450e9)
    assert by_key[2, 4096]["bytes_per_layer"] == 2 * by_key[1, 4096]["bytes_per_layer"]
    # Decode reads one expert's weights: memory-bound, 3·D·F·2 bytes over HBM.
    assert by_key[1, 1]["expert_bound"] == "memory"
    assert by_key[1, 1]["expert_floor_s"] > 3 * 4096 * 14336 * 2 / measure.H100.hbm_bytes_per_s
    # Prefill is compute-bound: at least 2·N·D·F·3 FLOPs at 989 TFLOP/s, N = T·k rows on the GPU's expert.
    prefill = by_key[2, 4096]
    assert prefill["expert_bound"] == "compute"
    assert prefill["expert_floor_s"] >= 2 * 4096 * 2 * 4096 * 14336 * 3 / measure.H100.tensor_flop_per_s
    for link in ("NVLink (H100 SXM)", "InfiniBand NDR"):
        assert prefill[f"{link} / experts"] == pytest.approx(prefill[f"{link} s"] / prefill["expert_floor_s"])
    assert prefill["InfiniBand NDR s"] == pytest.approx(9 * prefill["NVLink (H100 SXM) s"])  # 450 / 50 GB/s


# ---------------------------------------------------------------------------
# The chapter's parameters


@pytest.mark.parametrize("change, message", [
    ({"source": "cluster"}, "source: expected 'auto', 'records' or 'live', got 'cluster'"),
    ({"ranks": [3]}, "ranks: expected integers >= 2 that divide E = 8, got [3]"),
    ({"tokens": [-1]}, "tokens: expected integers >= 0 (tokens per rank), got [-1]"),
    ({"top_k": [3]}, "top_k: expected values 1 or 2 (at most E), got [3]"),
    ({"shape": [8, 8]}, "shape: expected three positive integers (D, F, E), got [8, 8]"),
    ({"repeats": 0}, "repeats: expected an integer >= 1, got 0"),
])
def test_chapter_parameters(change, message):
    pytest.importorskip("altair", reason="the book extra is not installed")
    from analysis.chapters import expert_parallel as chapter

    good = dict(source="auto", results_dir=None, ranks=[2, 4], tokens=[0, 16], top_k=[1, 2], shape=[8, 8, 8],
                repeats=3)
    chapter.validate_parameters(**good)
    with pytest.raises(ValueError) as error:
        chapter.validate_parameters(**dict(good, **change))
    assert str(error.value) == message


def test_the_readme_example_runs_under_torchrun(tmp_path):
    """README's "Across processes and machines": its script, as a user would run it
    (torchrun, two processes on this machine), ends on every rank with y of its own tokens."""
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Across processes and machines", 1)[1].split("\n## ", 1)[0]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "torchrun --standalone --nproc-per-node 2 ep.py" in script
    path = tmp_path / "ep.py"
    path.write_text(script + "\nprint(f'rank {rank} of {P}: y {tuple(y.shape)}', flush=True)\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(path)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0 of 2: y (16, 64)" in done.stdout and "rank 1 of 2: y (17, 64)" in done.stdout


def test_model_tables_split_so_each_fits_the_page():
    from analysis.chapters import expert_parallel as chapter

    whole = chapter.model_frame()
    times, ratios = chapter.model_frame(part="times"), chapter.model_frame(part="ratios")
    ratio_columns = [column for column in whole.columns if column.endswith("÷ experts")]
    assert ratio_columns and not set(ratio_columns) & set(times.columns)
    assert list(ratios.columns) == ["k", "T per GPU", "expert bound", *ratio_columns]
    assert set(times.columns) | set(ratios.columns) == set(whole.columns)
    with pytest.raises(ValueError, match="part"):
        chapter.model_frame(part="all")
