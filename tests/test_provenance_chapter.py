"""The provenance chapter's helpers (analysis/chapters/provenance.py) on a temporary results folder."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pandas")

from analysis import records  # noqa: E402
from analysis.chapters import provenance  # noqa: E402


def _results(tmp_path):
    records.write_records("alpha", [{"params": {"n": 1}, "value": 1.0}, {"params": {"n": 2}, "value": 2.0}],
                          results_dir=tmp_path)
    records.write_records("beta", [{"params": {"n": 3}, "value": 3.0}], results_dir=tmp_path)
    return tmp_path


def test_index_of_two_files(tmp_path):
    root = _results(tmp_path)
    table = provenance.provenance_table(root)
    assert len(table) == 2
    folder = records.device_folder(records.provenance("cpu")["device"], "cpu")
    assert list(table.index) == [f"{folder}/alpha.jsonl", f"{folder}/beta.jsonl"]
    assert list(table["kind"]) == ["alpha", "beta"]
    assert list(table["records"]) == [2, 1]
    assert (table["unreadable lines"] == 0).all()
    shared = records.provenance("cpu")
    assert (table["device"] == shared["device"]).all()
    assert (table["python"] == shared["python"]).all()
    assert (table["numpy"] == shared["numpy"]).all()
    assert (table["driver"] == provenance.MISSING).all()  # CPU records carry no driver
    first = table.iloc[0]
    assert first["first utc"] <= first["last utc"]


def test_nested_files_partial_lines_and_missing_fields(tmp_path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "x.jsonl").write_text(
        '{"kind": "x", "utc": "2026-01-02T00:00:00Z", "git_commit": "0123456789abcdef", "git_dirty": true}\n'
        '{"kind": "x", "utc": "2026-01-01T00:00:00Z", "git_commit": "0123456789abcdef", "git_dirty": false}\n'
        '{"kind": "x", "utc": "2026-01-0',  # a line still being written
        encoding="utf-8")
    table = provenance.provenance_table(tmp_path)
    row = table.loc["a/b/x.jsonl"]
    assert row["records"] == 2 and row["unreadable lines"] == 1
    assert row["git commit"] == "0123456789ab"
    assert row["git dirty"] == "True, False"
    assert (row["first utc"], row["last utc"]) == ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")
    assert row["device"] == provenance.MISSING
    summary = provenance.numbers(table, provenance.checkpoints_summary(tmp_path))
    assert summary["any_dirty"] and summary["n_commits"] == 1 and summary["n_devices"] == 0
    assert "uncommitted" in provenance.dirty_text(summary)


def test_empty_results_folder_shows_a_note(tmp_path):
    table = provenance.provenance_table(tmp_path / "nothing")
    assert table.empty and "records" in table.columns
    assert "No results file" in repr(provenance.index_note(table, tmp_path / "nothing"))
    summary = provenance.numbers(table, provenance.checkpoints_summary(tmp_path / "nothing"))
    assert summary["n_files"] == summary["n_records"] == summary["n_checkpoints"] == 0


def test_checkpoints_summary(tmp_path):
    folder = tmp_path / "checkpoints" / "cpu"
    folder.mkdir(parents=True)
    (folder / "a.pt").write_bytes(b"x" * 1000)
    (folder / "b.pt").write_bytes(b"x" * 24)
    summary = provenance.checkpoints_summary(tmp_path)
    assert summary["n_files"] == 2 and summary["total_bytes"] == 1024
    assert provenance.size_text(1024) == "1.0 KiB" and provenance.size_text(5) == "5 B"


def test_every_committed_record_kind_is_placed_in_a_chapter():
    """A new kind of record under results/ must be named in CHAPTER_RECORDS or UNREAD_KINDS."""
    table = provenance.provenance_table()
    placed = {kind for kinds in provenance.CHAPTER_RECORDS.values() for kind in kinds} | set(provenance.UNREAD_KINDS)
    assert set(table["kind"]) <= placed, set(table["kind"]) - placed
    shown = provenance.chapter_map(table)
    assert "answers" in set(shown["chapter"]) and "arm-cost" in shown.iloc[0]["record kinds it reads"]


def test_machine_view_gives_kind_device_blas_and_threads(tmp_path):
    folder = tmp_path / "cpu-x"
    folder.mkdir()
    record = {"kind": "sweep", "utc": "2026-01-01T00:00:00Z", "device": "X CPU", "device_kind": "cpu",
              "cpu_count": 4, "blas": "openblas 0.3", "thread_settings": {"OMP_NUM_THREADS": "2",
                                                                          "MKL_NUM_THREADS": None}}
    (folder / "sweep.jsonl").write_text(json.dumps(record) + "\n")
    view = provenance.machine_view(provenance.provenance_table(tmp_path), tmp_path)
    row = view.iloc[0]
    assert (row["kind"], row["device kind"], row["device"], row["cores"], row["BLAS"]) == (
        "sweep", "cpu", "X CPU", "4", "openblas 0.3")
    assert row["BLAS and OpenMP threads"] == "OMP_NUM_THREADS=2"
