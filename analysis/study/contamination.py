"""How much test text occurs verbatim in the training text.

The corpus splits by file (analysis/study/corpus.py), which keeps files apart,
not text: two files may share a license header or a docstring. This module
measures that overlap: the test split's files are cut into non-overlapping
chunks of ``width`` bytes (64 by default) from each file's first byte (the
remainder of a file shorter than a chunk is left out), and a chunk counts as
contaminated when the same ``width`` bytes occur anywhere in the train split.

Matching is exact: every window of the train split is hashed (a polynomial
hash over uint64, wrapping), the test chunks' hashes are looked up among them,
and each hit is confirmed byte for byte, so a hash collision can't count.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from analysis.study import corpus
from analysis.study.evaluation import document_bounds

#: An odd 64-bit multiplier (FNV-1a's prime): any odd number makes a hash; this one mixes well.
_MULTIPLIER = np.uint64(0x100000001B3)


def window_hashes(data: np.ndarray, width: int) -> np.ndarray:
    """(n - width + 1,) uint64: a hash of every window of `width` bytes of `data`."""
    data = np.asarray(data, dtype=np.uint8)
    n = data.size - width + 1
    if n < 1:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(width):
            hashes = hashes * _MULTIPLIER + data[offset:offset + n].astype(np.uint64)
    return hashes


def chunk_offsets(test: np.ndarray, width: int) -> tuple:
    """(offsets, file index) of every non-overlapping `width`-byte chunk inside a file of `test`."""
    starts, ends = document_bounds(test)
    offsets, files = [], []
    for index, (start, end) in enumerate(zip(starts, ends)):
        count = (end - start) // width
        offsets.append(start + width * np.arange(count))
        files.append(np.full(count, index))
    return np.concatenate(offsets).astype(np.int64), np.concatenate(files).astype(np.int64)


def verbatim_overlap(test: np.ndarray, train: np.ndarray, width: int = 64) -> dict:
    """The test chunks found verbatim in `train`: ``rate`` (their share), ``n_chunks``,
    ``n_found``, and per test file (in split order) ``file_chunks`` and ``file_found``."""
    test, train = np.asarray(test, dtype=np.uint8), np.asarray(train, dtype=np.uint8)
    offsets, files = chunk_offsets(test, width)
    if offsets.size == 0:
        raise ValueError(f"test: expected a file of at least width = {width} bytes, got none")
    train_hashes = window_hashes(train, width)
    order = np.argsort(train_hashes, kind="stable")
    sorted_hashes = train_hashes[order]
    chunk_hashes = window_hashes(test, width)[offsets]
    where = np.searchsorted(sorted_hashes, chunk_hashes)
    found = np.zeros(offsets.size, dtype=bool)
    for i in np.flatnonzero(where < sorted_hashes.size):
        # Every train window with this hash, confirmed byte for byte.
        j = where[i]
        chunk = test[offsets[i]:offsets[i] + width]
        while j < sorted_hashes.size and sorted_hashes[j] == chunk_hashes[i]:
            start = order[j]
            if np.array_equal(train[start:start + width], chunk):
                found[i] = True
                break
            j += 1
    n_files = document_bounds(test)[0].size
    return {"width": width, "n_chunks": int(offsets.size), "n_found": int(found.sum()),
            "rate": float(found.mean()),
            "file_chunks": np.bincount(files, minlength=n_files).tolist(),
            "file_found": np.bincount(files[found], minlength=n_files).tolist()}


def corpus_overlap(width: int = 64, root: Optional[str] = None) -> dict:
    """verbatim_overlap of this machine's test split against its train split, with the
    test files' paths (``files``, in split order)."""
    data = corpus.load_corpus(root)
    result = verbatim_overlap(data["test"], data["train"], width)
    result["files"] = corpus.split_paths("test", root)
    if len(result["files"]) != len(result["file_chunks"]):
        raise AssertionError("the test split's file count differs from its separator count")
    return result
