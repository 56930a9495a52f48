"""The accuracy study's corpus: the interpreter's stdlib, split by a hash of each file's path."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.study import corpus


def _write(root, relative, text):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)


@pytest.fixture()
def tree(tmp_path):
    for index in range(40):
        _write(tmp_path, f"pkg{index % 3}/module{index}.py", f"x = {index}\n".encode())
    _write(tmp_path, "test/test_skipped.py", b"skipped\n")
    _write(tmp_path, "pkg0/tests/test_skipped.py", b"skipped\n")
    _write(tmp_path, "site-packages/third_party.py", b"skipped\n")
    _write(tmp_path, "notes.txt", b"not python\n")
    return tmp_path


def test_split_of_is_a_pure_function_of_the_path():
    assert corpus.split_of("os.py") == corpus.split_of("os.py")
    assigned = {corpus.split_of(f"module{i}.py") for i in range(200)}
    assert assigned == set(corpus.SPLITS)


def test_source_files_skip_tests_and_third_party(tree):
    files = corpus.source_files(tree)
    assert len(files) == 40
    assert not any("test" in f or "site-packages" in f for f in files)
    assert files == sorted(files)


def test_the_split_is_deterministic_and_by_file(tree):
    first, second = corpus.build_corpus(tree), corpus.build_corpus(tree)
    assert first.manifest == second.manifest
    for split in corpus.SPLITS:
        np.testing.assert_array_equal(first[split], second[split])
    # every file lands whole in the split its path hashes to, followed by one separator
    expected = {split: b"" for split in corpus.SPLITS}
    for relative in corpus.source_files(tree):
        expected[corpus.split_of(relative)] += (tree / relative).read_bytes() + b"\0"
    for split in corpus.SPLITS:
        assert first[split].tobytes() == expected[split]
    assert sum(first.manifest["files"].values()) == first.manifest["n_files"] == 40


def test_the_manifest_hash_changes_with_the_text(tree):
    before = corpus.build_corpus(tree).manifest["sha256"]
    _write(tree, "pkg1/module1.py", b"x = 'changed'\n")
    assert corpus.build_corpus(tree).manifest["sha256"] != before


def test_an_empty_root_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.py files"):
        corpus.build_corpus(tmp_path)


def test_unknown_split_is_an_error(tree):
    with pytest.raises(ValueError, match="split"):
        corpus.build_corpus(tree)["training"]


def test_the_stdlib_corpus_is_real_python_split_about_80_10_10():
    data = corpus.load_corpus()
    manifest = data.manifest
    assert manifest["python"].count(".") == 2 and len(manifest["sha256"]) == 64
    assert manifest["n_files"] > 100
    share = {split: manifest["files"][split] / manifest["n_files"] for split in corpus.SPLITS}
    assert 0.7 < share["train"] < 0.9 and share["validation"] > 0.03 and share["test"] > 0.03
    assert b"def " in data["test"][:200_000].tobytes()
    assert manifest == corpus.manifest()
