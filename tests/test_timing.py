"""The timing helper: sane, ordered percentiles; rotation through argument sets."""

from __future__ import annotations

import time

import pytest

from analysis import timing


def test_sleep_is_timed_with_ordered_percentiles():
    result = timing.time_function(lambda: time.sleep(0.002), warmup=1, repeats=10)
    assert result.repeats == 10
    assert result.p20_s <= result.median_s <= result.p80_s
    assert 0.002 <= result.median_s < 0.05  # sleep never returns early; a loaded machine is slow
    assert set(result.as_dict()) == {"median_s", "p20_s", "p80_s", "repeats"}


def test_argument_sets_rotate_through_warmup_and_timed_calls():
    seen = []
    result = timing.time_function(seen.append, args_sets=[(0,), (1,), (2,)], warmup=2, repeats=5)
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    assert result.repeats == 5


def test_setup_runs_before_every_call_untimed():
    calls = []
    timing.time_function(lambda: calls.append("fn"), setup=lambda: calls.append("setup"),
                         warmup=1, repeats=2)
    assert calls == ["setup", "fn"] * 3

    slow_setup = timing.time_function(lambda: None, setup=lambda: time.sleep(0.01), warmup=0, repeats=3)
    assert slow_setup.median_s < 0.005


def test_min_time_adds_repeats():
    result = timing.time_function(lambda: time.sleep(0.001), warmup=0, repeats=2, min_time_s=0.02)
    assert result.repeats > 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        timing.time_function(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="args_sets"):
        timing.time_function(lambda: None, args_sets=[])
    with pytest.raises(ValueError, match="device"):
        timing.time_function(lambda: None, device="tpu")


def test_sets_to_exceed_cache():
    assert timing.sets_to_exceed_cache(10, cache_bytes=100) == 20
    assert timing.sets_to_exceed_cache(1000, cache_bytes=100) == 2  # at least two
    assert timing.last_level_cache_bytes() > 0
    with pytest.raises(ValueError):
        timing.sets_to_exceed_cache(0)
