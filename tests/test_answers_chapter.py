"""The Answers chapter's module (analysis/chapters/answers.py) on a temporary results folder:
answers from records where there are some, one line naming the command where there are none."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

pytest.importorskip("altair", reason="the book extra is not installed")
pytest.importorskip("torch", reason="the peers need the torch extra")

from analysis import charts  # noqa: E402
from analysis.chapters import answers  # noqa: E402
from analysis.measure import memory  # noqa: E402

@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_sweep_results):
    """The tiny sweep's records plus memory records."""
    root = tmp_path_factory.mktemp("results")
    shutil.copytree(tiny_sweep_results, root, dirs_exist_ok=True)
    memory.run("tiny", tokens=[4, 16], results_dir=root, echo=lambda message: None)
    return root


def test_without_records_every_answer_names_its_command(tmp_path):
    assert answers.speed("gpu", tmp_path) is None and answers.speed("cpu", tmp_path) is None
    assert "make device-check PY=python3" in answers.gpu_line(None)
    assert "make sweep-cpu" in answers.cpu_speed_line(None)
    assert "make device-check PY=python3" in answers.utilisation_line(tmp_path)
    assert answers.accuracy_answer(tmp_path) is None and answers.trained_runs(tmp_path) is None
    assert "python -m analysis.study.evaluation" in answers.accuracy_sentence(None)
    assert answers.routing_answer(None, 1024) is None and "make train-cpu" in answers.routing_sentence(None)
    assert answers.speed_figure(None, None) is None
    empty = answers.memory_answer(tmp_path, preset="tiny")
    assert empty.measured.empty and "python -m analysis.measure.memory" in empty.note


def test_speed_and_stages_from_cpu_records(results):
    cpu = answers.speed("cpu", results)
    assert cpu is not None and set(cpu.ratios["top_k"]) == {1, 2}
    assert (cpu.ratios["ratio"] > 0).all() and cpu.numbers["largest_T"] == 16
    sentence = answers.speed_sentence(cpu)
    assert f"{cpu.numbers['k1_active_ratio_largest']:.2f}x" in sentence
    assert "<svg" in charts.to_svg(answers.speed_chart(cpu))
    stages = answers.stage_ratios(cpu)
    assert {"expert MLPs", "whole layer", "router"} <= set(stages["stage"])
    numbers = answers.stage_numbers(stages)
    assert numbers["stage_T"] == 16 and numbers["stage_layer_ratio"] > 0
    assert "<svg" in charts.to_svg(answers.stage_chart(stages, "cpu"))


def test_memory_answer_puts_formula_beside_measurement(results):
    answer = answers.memory_answer(results, preset="tiny", tokens=(4, 16))
    assert set(answer.measured["tokens"]) == {4, 16}
    table = answers.memory_table(answer)
    assert list(table.columns) == ["arm", "peak by formula, whole hidden (MiB)", "measured peak, CPU backend (MiB)"]
    assert len(table) == 5 and table.notna().all().all()
    assert answer.numbers["memory_ratio"] > 1.5
    assert "<svg" in charts.to_svg(answers.memory_chart(answer))


def test_traffic_is_labelled_cpu_emulation(monkeypatch):
    from analysis.chapters import kernels as kernels_chapter

    frame = pd.DataFrame({"stage": ["expert_mlp"], "k = 1 (KiB)": [100.0], "k = 2 (KiB)": [200.0],
                          "k = 2 / k = 1": [2.0]})
    monkeypatch.setattr(kernels_chapter, "traffic_k_answer", lambda results_dir=None: frame)
    monkeypatch.setattr(kernels_chapter, "traffic_records", lambda results_dir=None: [])
    shown, sentence = answers.traffic()
    assert shown is frame and "CPU emulation" in sentence and "2.00x" in sentence
    monkeypatch.setattr(kernels_chapter, "traffic_k_answer", lambda results_dir=None: frame.iloc[:0])
    assert answers.traffic()[1] == ""


def test_cpu_speed_from_the_committed_bench_cpu_run(tmp_path):
    assert answers.bench_speed(tmp_path) is None
    answer = answers.bench_speed()
    if answer is None:
        pytest.skip("no bench-cpu run is committed")
    assert set(answer.ratios["top_k"]) == {1, 2}
    assert {"k1_active_ratio_largest", "k2_params_ratio_largest", "crossovers"} <= set(answer.numbers)
    assert "bench-cpu.jsonl" in answer.evidence and "/" not in answer.evidence.split("results/")[0]
    assert "<svg" in charts.to_svg(answers.speed_chart(answer))
