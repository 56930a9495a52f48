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


# ---------------------------------------------------------------- issue 23: compact answers, short sentences

import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parent.parent / "book" / "notebooks" / "answers.ipynb"


def _prose(text: str) -> str:
    """Markdown as a reader reads it: a glue reference counts as one word, markup dropped."""
    text = re.sub(r"\{glue:?\w*\}`[^`]*`", "VALUE", text)
    text = re.sub(r"\{(doc|ref)\}`([^`<]*)(<[^>]*>)?`", r"\2", text)
    return re.sub(r"[*#>]", "", text)


def test_sentence_splitter_and_counter():
    text = "One two three. Four five six seven! `make x` runs. At T = 1.5 it holds."
    assert answers.sentences(text) == ["One two three.", "Four five six seven!", "`make x` runs.",
                                       "At T = 1.5 it holds."]
    assert answers.longest_sentence_words(text) == 6
    long = " ".join(["word"] * (answers.MAX_SENTENCE_WORDS + 1)) + "."
    assert answers.longest_sentence_words(long) > answers.MAX_SENTENCE_WORDS


def test_no_sentence_of_the_answers_notebook_runs_over_45_words():
    notebook = json.loads(NOTEBOOK.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            text = _prose("".join(cell["source"]))
            assert answers.longest_sentence_words(text) <= answers.MAX_SENTENCE_WORDS, text


def _assert_short(text: str) -> None:
    assert text, "expected a sentence"
    for sentence in answers.sentences(text):
        assert len(sentence.split()) <= answers.MAX_SENTENCE_WORDS, sentence


def test_no_generated_sentence_runs_over_45_words_on_the_committed_records():
    bench = answers.bench_speed()
    if bench is not None:
        cpu = answers.with_intervals(bench)
        _assert_short(answers.speed_sentences(cpu))
        assert {"low", "high"} <= set(cpu.ratios.columns)
        _assert_short(cpu.numbers["scale"])
    _assert_short(answers.speed_sentences(None))
    _assert_short(answers.gpu_line(None))
    _assert_short(answers.utilisation_line())
    _assert_short(answers.memory_answer().note)
    _assert_short(answers.gpu_anchor_text())
    _assert_short(answers.accuracy_published_line(None))
    accuracy_answer = answers.accuracy_answer()
    if accuracy_answer is not None:
        _assert_short(answers.accuracy_sentences(accuracy_answer))
        _assert_short(answers.accuracy_published_line(accuracy_answer))
        _assert_short(accuracy_answer.numbers["accuracy_scale"])
        cost = answers.cost_answer(accuracy_answer)
        if cost.chart is not None:
            _assert_short(cost.caption)
    sweep = answers.speed("cpu")
    if sweep is not None:
        skews = answers.skew_table(sweep)
        if not skews.empty:
            _assert_short(answers.skew_sentences(skews, answers.skew_experts(sweep)))


ROUTING_NUMBERS = {"n_experts": 8, "uniform_same_expert": 0.125,
                   "moe_k1_load_max_over_mean": 1.65, "moe_k1_nobal_load_max_over_mean": 4.2,
                   "moe_k1_same_expert_rate": 0.39, "moe_k1_same_expert_different_bytes": 0.179,
                   "moe_k1_same_expert_by_load": 0.158, "moe_k2_load_max_over_mean": 1.5,
                   "moe_k2_same_expert_rate": 0.35, "moe_k2_same_expert_different_bytes": 0.16,
                   "moe_k2_same_expert_by_load": 0.15}


def test_routing_answer_quotes_rates_beside_chance():
    answer = answers.RoutingAnswer(averages=pd.DataFrame(), numbers=ROUTING_NUMBERS, positions=1024)
    text = answers.routing_sentences(answer)
    _assert_short(text)
    assert "17.9%" in text and "15.8%" in text and "barely above" in text and "far above the 12.5%" in text
    table = answers.routing_compact_table(answer)
    assert list(table["arm"]) == ["top-1 MoE", "top-2 MoE", "top-1 MoE, no balancing loss"]
    assert {"same expert, consecutive bytes (chance 12.5%)", "chance for these, from the load"} <= set(table.columns)
    assert table.loc[0, "chance for these, from the load"] == "15.8%"


def test_speed_table_gives_interval_and_verdict():
    ratios = pd.DataFrame({"top_k": [1, 1, 1, 1], "tokens": [1, 1, 64, 64],
                           "baseline": ["dense, equal active FLOPs (K·F)", "dense, equal parameters (E·F)"] * 2,
                           "ratio": [1.4, 0.3, 1.05, 0.2], "low": [1.1, 0.2, 0.9, 0.1], "high": [1.7, 0.4, 1.2, 0.3]})
    answer = answers.SpeedAnswer("cpu", None, ratios, pd.DataFrame(), {"device": "cpu", "crossovers": ""}, "")
    table = answers.speed_table(answer)
    assert list(table["verdict"]) == ["MoE slower", "MoE faster", "no difference shown (interval contains 1)",
                                      "MoE faster"]
    assert table.loc[0, "95% interval"] == "[1.10, 1.70]"
    text = answers.speed_sentences(answer)
    _assert_short(text)
    assert "equal parameters, the MoE is faster at every measured T" in text
    assert "equal active FLOPs, the MoE is faster at no measured T" in text
    spec = answers.speed_chart_with_intervals(answer).to_dict()
    assert spec["layer"][0]["encoding"]["x"]["scale"]["domain"] == [1, 64]  # the axis ends at the data


def test_memory_answer_includes_the_weights(results):
    answer = answers.memory_answer(results, preset="tiny", tokens=(4, 16))
    table = answers.memory_with_weights(answer, preset="tiny")
    weights = table.set_index("arm")["weights (MiB)"]
    # The MoE keeps E experts' weights whatever k is, E times those of the dense MLP of width F.
    assert weights["MoE, k = 1"] == weights["MoE, k = 2"]
    assert weights["dense, F' = E·F (equal parameters)"] < weights["MoE, k = 1"]  # the router's weights
    assert weights["MoE, k = 1"] > 4 * weights["dense, F' = 1·F (equal active FLOPs, k = 1)"]


def test_headline_lines_without_records_say_so():
    lines = answers.headline_lines(None, None, None, None)
    assert set(lines) == {"headline_speed", "headline_accuracy", "headline_routing", "headline_status"}
    assert "no GPU run yet" in lines["headline_status"]
    for line in lines.values():
        _assert_short(line)


def test_no_glued_sentence_of_the_executed_page_runs_over_45_words():
    """Where `python -m analysis.run_notebooks --only answers` has run, every text it glued
    into the page (what a reader reads between the tables) keeps sentences short."""
    executed = NOTEBOOK.parent.parent / "generated" / "answers.ipynb"
    if not executed.exists():
        pytest.skip("the Answers page has not been executed here (python -m analysis.run_notebooks --only answers)")
    notebook = json.loads(executed.read_text())
    texts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            for mime in ("text/markdown", "application/papermill.record/text/markdown",
                         "application/papermill.record/text/plain"):
                if mime in data:
                    texts.append("".join(data[mime]).strip("'\""))
    assert texts
    for text in texts:
        if text in ("True", "False") or text.isdigit():
            continue
        for sentence in answers.sentences(_prose(text)):
            assert len(sentence.split()) <= answers.MAX_SENTENCE_WORDS, sentence


def test_the_gpu_prediction_answer_says_it_is_a_model_and_stays_short():
    prediction = answers.gpu_prediction_answer()
    if prediction is None:
        pytest.skip("no committed GPU-model records (python -m analysis.measure.gpu_model)")
    assert prediction.text.startswith("Predicted (model), not measured")
    assert set(prediction.table["device"]) == {"H100 SXM", "A100 SXM"}
    assert (prediction.table["floor, k = 2 (µs)"] > prediction.table["floor, k = 1 (µs)"]).all()
    assert len(answers.sentences(prediction.text)) <= 3
    _assert_short(prediction.text)


def test_the_communication_answer_counts_and_models_and_stays_short():
    text = answers.communication_answer()
    if text is None:
        pytest.skip("no committed expert-parallel records (python -m analysis.measure.expert_parallel)")
    assert "predicted (model)" in text and "loopback" in text
    _assert_short(text)


def test_without_records_the_gpu_and_communication_answers_are_left_out(tmp_path):
    assert answers.gpu_prediction_answer(tmp_path) is None
    assert answers.communication_answer(tmp_path) is None


def test_the_dense_peak_note_tells_an_output_only_measurement_from_a_whole_one():
    import dataclasses

    import pandas as pd

    from analysis.measure import sweep_plan

    answer = answers.memory_answer()
    if answer.measured.empty:
        pytest.skip("no committed memory records (python -m analysis.measure.memory)")
    assert "grows with the hidden width" in answers.dense_peak_note(answer)
    output = 4096 * sweep_plan.PRESETS["cpu"].d_model * 4
    old = pd.DataFrame({"tokens": [4096] * 3, "arm": ["dense F", "dense 2F", "dense 8F"], "bytes": [output] * 3})
    assert "missed the hidden activations" in answers.dense_peak_note(dataclasses.replace(answer, measured=old))
