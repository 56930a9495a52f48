"""Each chapter's parameter check (the cell after `parameters`): one clear sentence
naming the parameter, what was expected and what came."""

from __future__ import annotations

import pytest

pytest.importorskip("altair", reason="the book extra is not installed")

from analysis.chapters import answers, gpu_performance, provenance, semantics  # noqa: E402

GOOD_SEMANTICS = dict(T=10, D=8, F=16, E=4, k=2, activation="swiglu", capacity_factor=1.0, seed=0)


@pytest.mark.parametrize("change, message", [
    ({"k": 3}, "k: expected 1 or 2, got 3"),
    ({"k": 2, "E": 1}, "k: expected at most E = 1, got 2"),
    ({"T": -1}, "T: expected an integer >= 0, got -1"),
    ({"D": 2.5}, "D: expected an integer >= 1, got 2.5"),
    ({"activation": "tanh"}, "activation: expected 'relu', 'gelu' or 'swiglu', got 'tanh'"),
    ({"capacity_factor": 0}, "capacity_factor: expected None or a finite number > 0, got 0"),
])
def test_semantics_parameters(change, message):
    semantics.validate_parameters(**GOOD_SEMANTICS)
    semantics.validate_parameters(**dict(GOOD_SEMANTICS, capacity_factor=None))
    with pytest.raises(ValueError) as error:
        semantics.validate_parameters(**dict(GOOD_SEMANTICS, **change))
    assert str(error.value) == message


def test_gpu_chapter_parameters(tmp_path):
    gpu_performance.validate_parameters("auto", None, None)
    gpu_performance.validate_parameters("live", "gpu-default", tmp_path)
    with pytest.raises(ValueError, match="source: expected 'auto', 'live' or 'records', got 'gpu'"):
        gpu_performance.validate_parameters("gpu", None, None)
    with pytest.raises(ValueError, match="plan: expected None or one of the GPU plans"):
        gpu_performance.validate_parameters("live", "cpu-tiny", None)
    with pytest.raises(ValueError, match="results_dir: expected None or an existing folder"):
        gpu_performance.validate_parameters("auto", None, tmp_path / "nowhere")


def test_provenance_and_answers_parameters(tmp_path):
    provenance.validate_parameters(None)
    with pytest.raises(ValueError, match="results_dir: expected None or an existing folder"):
        provenance.validate_parameters(tmp_path / "nowhere")
    answers.validate_parameters("cpu", 4096)
    with pytest.raises(ValueError, match="preset: expected one of"):
        answers.validate_parameters("huge", 4096)
    with pytest.raises(ValueError, match="routing_bytes: expected an integer of at least 256, got 10"):
        answers.validate_parameters("cpu", 10)
