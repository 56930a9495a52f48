"""Contamination, the compressor anchor and the paired statistics, on cases checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.study import compressors, contamination, paired


def _bytes(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8)


def test_window_hashes_agree_for_equal_windows_only():
    data = _bytes(b"abcdabcdxbcd")
    hashes = contamination.window_hashes(data, 4)
    assert hashes.size == 9
    assert hashes[0] == hashes[4]  # "abcd" twice
    assert len(set(hashes.tolist())) == 8  # the other windows all differ


def test_verbatim_overlap_counts_chunks_found_in_train():
    # Test files (separated by 0): "AAAABBBB" and "CCCCDDDDEE"; chunks of 4:
    # AAAA, BBBB | CCCC, DDDD (EE is shorter than a chunk and left out).
    test = _bytes(b"AAAABBBB\x00CCCCDDDDEE\x00")
    train = _bytes(b"xxBBBBxx\x00yyDDDyDDDD\x00")
    result = contamination.verbatim_overlap(test, train, width=4)
    assert result["n_chunks"] == 4 and result["n_found"] == 2 and result["rate"] == 0.5
    assert result["file_chunks"] == [2, 2] and result["file_found"] == [1, 1]
    none = contamination.verbatim_overlap(test, _bytes(b"zzzzzzzz\x00"), width=4)
    assert none["n_found"] == 0


def test_compressors_report_bits_per_byte():
    repetitive = _bytes(b"abc" * 5000)
    noisy = np.random.default_rng(0).integers(0, 256, 15000).astype(np.uint8)
    for low, high in zip(compressors.bits_per_byte(repetitive), compressors.bits_per_byte(noisy)):
        assert low["n_bytes"] == 15000
        assert low["bits_per_byte"] < 0.5 < 7.9 < high["bits_per_byte"]


def test_paired_difference_by_hand():
    # d = [1, 2, 3]: mean 2, std 1, t(0.975, 2) = 4.303, half-width 4.303 / sqrt(3)
    result = paired.paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert result["differences"] == [1.0, 2.0, 3.0]
    assert result["mean"] == 2.0 and result["std"] == 1.0
    half = 4.302652729911275 / math.sqrt(3)
    assert result["low"] == pytest.approx(2 - half) and result["high"] == pytest.approx(2 + half)
    assert not result["supported"]  # half-width 2.48 > 2: the interval holds 0


def test_supported_means_the_interval_excludes_zero():
    wide = paired.paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert wide["supported"] == (wide["low"] > 0 or wide["high"] < 0)
    tight = paired.paired_difference([1.1, 1.22, 1.29, 1.16], [1.0, 1.1, 1.2, 1.05])
    assert tight["supported"] and tight["p_value"] < 0.05
    noisy = paired.paired_difference([1.0, 2.0, 0.5], [1.5, 1.0, 1.2])
    assert not noisy["supported"] and noisy["p_value"] > 0.05


def test_seeds_needed_grows_with_noise():
    assert paired.seeds_needed(1.0, 0.1) == 3  # a huge effect: the fewest seeds a t-test can use well
    small = paired.seeds_needed(0.011, 0.033)
    assert 60 <= small <= 80  # (z_0.975 + z_0.8)^2 * 9 = 70.6 by the normal approximation
    assert paired.seeds_needed(0.0, 1.0) == math.inf
    with pytest.raises(ValueError, match="at least 2"):
        paired.paired_difference([1.0], [2.0])
