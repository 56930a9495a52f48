"""The correctness chapter's helpers (analysis/chapters/correctness.py), on tiny hand-checkable cases."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("altair")

from analysis.chapters import correctness  # noqa: E402


def test_top_k_margins_by_hand():
    logits = np.array([[3.0, 1.0, 2.5, 0.0],   # sorted 3, 2.5, 1: k=1 gap 0.5; k=2 min(0.5, 1.5)
                       [1.0, 1.0, 0.0, -1.0]])  # an exact tie at the top: margin 0
    np.testing.assert_allclose(correctness.top_k_margins(logits, 1), [0.5, 0.0])
    np.testing.assert_allclose(correctness.top_k_margins(logits, 2), [0.5, 0.0])
    # k=2 where the second gap is the smaller one
    np.testing.assert_allclose(correctness.top_k_margins(np.array([[4.0, 1.0, 0.9]]), 2), [0.1])


def test_agreement_summary_and_text():
    frame = pd.DataFrame({"token": range(4), "agree": [True, True, True, False],
                          "margin": [1.0, 2.0, 3.0, 1e-7]})
    summary = correctness.agreement_summary(frame)
    assert summary["n_tokens"] == 4 and summary["n_disagree"] == 1
    assert summary["agree_fraction"] == 0.75
    assert summary["max_disagree_margin"] == 1e-7
    assert summary["disagree_margin_quantile"] == 0.25
    assert "at most 1.00e-07" in correctness.agreement_text(summary)
    none = correctness.agreement_summary(frame.assign(agree=True))
    assert none["n_disagree"] == 0 and none["max_disagree_margin"] is None
    assert correctness.agreement_text(none).startswith("No token disagreed")


def test_differing_bits_by_hand():
    a = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    b = a.copy()
    assert correctness._differing_bits(a, b) == (0, 0)
    b[1] = np.nextafter(b[1], np.float32(10))  # one ulp: the last mantissa bit flips
    assert correctness._differing_bits(a, b) == (1, 1)
    b[2] = -b[2]  # the sign bit
    assert correctness._differing_bits(a, b) == (2, 2)


def test_error_table_is_within_the_rule():
    table = correctness.error_table(T=9, D=4, F=6, E=3, seeds=[0], ks=[1, 2], activations=["swiglu"])
    assert len(table) == 4 and table["passed"].all()
    assert (table["cpu error"] <= table["bound"]).all()
    # float64 on the cpu backend: the plain implementation is the reference itself
    assert (table.xs("float64", level="dtype")["plain error"] == 0).all()
    numbers = correctness.error_numbers(table)
    assert numbers["n_cases"] == numbers["n_passed"] == 4
    correctness.assert_errors_within_bound(table)
    with pytest.raises(AssertionError, match="outside"):
        correctness.assert_errors_within_bound(table.assign(passed=False))


def test_routing_agreement_shape_and_margins():
    frame = correctness.agreement_frame(T=20, D=4, E=3, seeds=[0, 1], ks=[1, 2])
    assert len(frame) == 80 and set(frame["k"]) == {1, 2}
    assert (frame["margin"] >= 0).all()
    table = correctness.agreement_table(frame)
    assert list(table.index) == [1, 2] and (table["tokens"] == 40).all()


def test_determinism_and_batch_invariance_tables():
    determinism = correctness.determinism_table(T=7, D=4, F=6, E=3, seed=0, repeats=2)
    assert list(determinism.index) == ["float32", "float64"]
    assert (determinism["differing bits"] >= determinism["differing elements"]).all()
    batch = correctness.batch_invariance_table(T=7, D=4, F=6, E=3, seed=0, batch_sizes=[1, 3, 50], probes=2)
    # n = 1 is the alone run itself, and n is capped at T
    assert batch.loc[("float32", 1), "differing elements"] == 0
    assert ("float32", 7) in batch.index
    numbers = correctness.batch_invariance_numbers(batch)
    assert numbers["n_settings"] == 6
    unchanged = correctness.batch_invariance_numbers(batch.assign(**{"differing elements": 0}))
    assert unchanged["verdict"].startswith("bitwise batch-invariant")


def test_gpu_tests_view(tmp_path):
    table, note = correctness.gpu_tests_view(tmp_path)
    assert table is None and "No gpu-tests record" in repr(note)
    assert correctness.gpu_tests_text(None).startswith("No gpu-tests record")
    folder = tmp_path / "nvidia-h100"
    folder.mkdir()
    lines = [{"utc": "2026-01-01T00:00:00Z", "device": "NVIDIA H100", "passed": 1, "failed": 9, "source_hash": "a"},
             {"utc": "2026-02-03T00:00:00Z", "device": "NVIDIA H100", "passed": 500, "failed": 0,
              "source_hash": "b" * 64}]
    (folder / "gpu-tests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    table, note = correctness.gpu_tests_view(tmp_path)
    assert table.loc[0, "passed"] == 500
    text = correctness.gpu_tests_text(table)
    assert "500 passed and 0 failed" in text and "bbbbbbbbbbbb" in text
    assert "other kernel sources" in repr(note)


def test_emulated_error_table_is_labelled_and_within_the_rule():
    table = correctness.emulated_error_table(T=9, D=8, F=12, E=4, seeds=[0])
    if table is None:
        pytest.skip(correctness.emulated_error_text(table))
    assert set(table.index.get_level_values("dtype")) == {"float32", "float16"}
    assert "error (CPU emulation)" in table.columns and "cpu error" not in table.columns
    assert table["passed"].all()
    correctness.assert_errors_within_bound(table, what="emulated")
    text = correctness.emulated_error_text(table)
    assert "CPU emulation" in text and "not GPU results" in text


def test_a_failed_case_names_what_failed():
    table = pd.DataFrame({"passed": [True, False]}, index=pd.Index(["a", "b"], name="case"))
    with pytest.raises(AssertionError, match=r"the emulated kernels outside the topk_moe.testing bound: \['b'\]"):
        correctness.assert_errors_within_bound(table, what="the emulated kernels")


def test_bound_explanation_names_the_term_that_sets_the_bound():
    import pandas as pd

    from analysis.chapters import correctness

    index = pd.MultiIndex.from_tuples([("float16", 2, "swiglu"), ("float32", 1, "relu")],
                                      names=["dtype", "k", "activation"])
    table = pd.DataFrame({"error (CPU emulation)": [0.00126, 1e-6], "plain error": [0.00187, 1e-6],
                          "bound": [19.9, 1e-4], "error / bound": [0.00126 / 19.9, 0.01], "passed": [True, True]},
                         index=index)
    text = correctness.bound_explanation(table)
    assert text.startswith("The loosest bound is float16, k = 2, swiglu: 19.9 for an error of 0.00126.")
    assert "The floor sets it" in text and "0.00374" in text
    assert correctness.bound_explanation(None) == ""
