"""The record writer: every record carries its full provenance, survives a JSON
round trip, lands in results/<device>/<kind>.jsonl, and names its commit even
where git can't be asked."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from analysis import records

REQUIRED_FIELDS = {
    "kind", "utc", "host", "device", "device_kind",
    "compute_capability", "driver", "cuda_runtime",
    "python", "numpy", "scipy", "torch", "cupy",
    "git_commit", "git_dirty", "params",
}


def test_device_slug_makes_folder_names():
    assert records.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert records.device_slug("  AMD EPYC 7B13 64-Core Processor ") == "amd-epyc-7b13-64-core-processor"
    assert records.device_slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-r-xeon-r-cpu-2-20ghz"
    assert records.device_folder("AMD EPYC", "cpu") == "cpu-amd-epyc"
    assert records.device_folder("NVIDIA H100 80GB HBM3", "gpu") == "nvidia-h100-80gb-hbm3"


def test_provenance_has_every_field_and_is_json():
    prov = records.provenance("cpu")
    assert set(records.PROVENANCE_FIELDS) <= set(prov)
    assert prov["device_kind"] == "cpu"
    assert prov["device"]
    assert prov["utc"].endswith("Z") and "T" in prov["utc"]
    assert prov["numpy"] == np.__version__
    # No GPU details on a CPU record.
    assert prov["compute_capability"] is None and prov["cuda_runtime"] is None
    assert json.loads(json.dumps(prov)) == prov


def test_write_records_round_trip(tmp_path):
    measurements = [
        {"implementation": "moe-cpu", "median_s": np.float64(0.25), "repeats": np.int64(5),
         "params": {"tokens": np.int32(16), "dtype": np.dtype("float32"), "shape": np.array([2, 3])}},
        {"implementation": "dense-cpu", "median_s": 0.5, "ratio": float("nan"), "params": {"tokens": 16}},
    ]
    path = records.write_records("bench-test", measurements, results_dir=tmp_path)

    assert path.name == "bench-test.jsonl"
    assert path.parent.parent == tmp_path
    assert path.parent.name == records.device_folder(records.provenance()["device"], "cpu")
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    for record in (first, second):
        assert REQUIRED_FIELDS <= set(record), REQUIRED_FIELDS - set(record)
        assert record["kind"] == "bench-test"
    assert first["params"] == {"tokens": 16, "dtype": "float32", "shape": [2, 3]}
    assert first["median_s"] == 0.25 and first["repeats"] == 5
    assert second["ratio"] is None  # NaN has no JSON spelling

    # Appending, then reading back the newest device folder.
    records.write_records("bench-test", [{"median_s": 1.0, "params": {}}], results_dir=tmp_path)
    read = records.read_records("bench-test", results_dir=tmp_path)
    assert [r["median_s"] for r in read] == [0.25, 0.5, 1.0]


def test_results_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_RESULTS_DIR", str(tmp_path))
    path = records.write_records("env-test", [{"value": 1, "params": {}}])
    assert tmp_path in path.parents


def test_read_records_picks_newest_device_and_named_device(tmp_path):
    older = {"kind": "k", "utc": "2025-01-01T00:00:00.000000Z", "params": {}}
    newer = {"kind": "k", "utc": "2026-01-01T00:00:00.000000Z", "params": {}}
    for folder, record in (("gpu-old", older), ("gpu-new", newer)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "k.jsonl").write_text(json.dumps(record) + "\n")
    assert records.read_records("k", results_dir=tmp_path) == [newer]
    assert records.read_records("k", results_dir=tmp_path, device="gpu-old") == [older]
    with pytest.raises(FileNotFoundError, match="gpu-missing"):
        records.read_records("k", results_dir=tmp_path, device="gpu-missing")
    with pytest.raises(FileNotFoundError):
        records.read_records("other-kind", results_dir=tmp_path)


def test_bad_records_are_refused(tmp_path):
    with pytest.raises(ValueError, match="params"):
        records.write_records("k", [{"median_s": 1.0}], results_dir=tmp_path)
    with pytest.raises(ValueError, match="provenance"):
        records.write_records("k", [{"device": "mine", "params": {}}], results_dir=tmp_path)
    with pytest.raises(ValueError, match="kind"):
        records.write_records("Bad Kind/..", [{"params": {}}], results_dir=tmp_path)
    with pytest.raises(TypeError, match="JSON"):
        records.write_records("k", [{"value": object(), "params": {}}], results_dir=tmp_path)
    with pytest.raises(ValueError, match="device_kind"):
        records.provenance("tpu")


def test_git_commit_falls_back_to_environment_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_GIT_COMMIT", "abc1234")
    prov = records.provenance("cpu", repo_root=tmp_path)  # tmp_path has no .git
    assert prov["git_commit"] == "abc1234"
    assert prov["git_dirty"] is None

    monkeypatch.delenv("MOE_GIT_COMMIT")
    prov = records.provenance("cpu", repo_root=tmp_path)
    assert prov["git_commit"] is None and prov["git_dirty"] is None


def test_git_commit_and_dirty_from_a_repository(tmp_path, monkeypatch):
    def git(*arguments):
        subprocess.run(["git", "-C", str(tmp_path), *arguments], check=True, capture_output=True)

    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "first")
    monkeypatch.setenv("MOE_GIT_COMMIT", "should-not-be-used")

    prov = records.provenance("cpu", repo_root=tmp_path)
    assert len(prov["git_commit"]) == 40 and prov["git_dirty"] is False

    # New results don't make the code dirty; new code does.
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.jsonl").write_text("{}\n")
    assert records.provenance("cpu", repo_root=tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 1\n")
    assert records.provenance("cpu", repo_root=tmp_path)["git_dirty"] is True


def test_provenance_imports_neither_cupy_nor_torch():
    code = ("import sys; from analysis import records; records.provenance('cpu'); "
            "assert 'cupy' not in sys.modules and 'torch' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=records.REPO_ROOT)


def test_gpu_records_need_a_named_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "_gpu_details", lambda: dict(records._NO_GPU))
    with pytest.raises(RuntimeError, match="device"):
        records.write_records("k", [{"params": {}}], device_kind="gpu", results_dir=tmp_path)
