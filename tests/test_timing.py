"""The timing helper: sane, ordered percentiles; rotation through argument sets."""

from __future__ import annotations

import time

import pytest

from analysis.measure import timing


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


def test_repeats_fill_the_budget_within_its_bounds():
    budget = timing.Budget(seconds_per_measurement=0.1, min_repeats=3, max_repeats=50)
    assert timing.repeats_for_budget(0.01, budget) == 10
    assert timing.repeats_for_budget(1.0, budget) == 3  # a slow call: the floor
    assert timing.repeats_for_budget(0.0, budget) == 50  # a fast call: the ceiling
    assert timing.repeats_for_budget(0.01, timing.Budget(0.1, min_repeats=20, max_repeats=5)) == 20


def test_time_within_budget_probes_once_then_warms_up_and_times():
    calls = []
    result = timing.time_within_budget(calls.append, [(0,), (1,)], timing.Budget(1.0, min_repeats=2, max_repeats=7))
    # A fast call: the probe (set 0), three warm-ups, then max_repeats timed calls, rotating.
    assert result.repeats == 7
    assert calls == [0] + [0, 1, 0] + [1, 0, 1, 0, 1, 0, 1]


def test_a_slow_call_gets_the_floor_and_one_warmup():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(timing.SELF_WARMING_CALL_S + 0.01)

    result = timing.time_within_budget(slow, [()], timing.Budget(0.01, min_repeats=2, max_repeats=9))
    assert result.repeats == 2 and len(calls) == 1 + 1 + 2  # probe, one warm-up, two timed
    with pytest.raises(ValueError, match="args_sets"):
        timing.time_within_budget(slow, [], timing.Budget())
    with pytest.raises(ValueError, match="device"):
        timing.time_within_budget(slow, [()], timing.Budget(), device="tpu")


def test_gpu_options_are_refused_on_the_cpu():
    with pytest.raises(ValueError, match="flush_bytes"):
        timing.time_function(lambda: None, flush_bytes=1024)
    with pytest.raises(ValueError, match="cuda_graph"):
        timing.time_function(lambda: None, cuda_graph=True)


def test_cuda_timing_without_cupy_says_so(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cupy" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="CuPy"):
        timing.time_function(lambda: None, device="cuda")
    with pytest.raises(RuntimeError, match="CuPy"):
        timing.gpu_l2_cache_bytes()
    with pytest.raises(ValueError, match="flush_bytes"):
        timing.time_function(lambda: None, device="cuda", flush_bytes=-1)


def test_graph_capture_error_is_a_runtime_error():
    assert issubclass(timing.GraphCaptureError, RuntimeError)


# ---------------------------------------------------------------------------
# The CUDA paths' control flow, on a stand-in for CuPy (no GPU here): events
# around each call, the flush before it, capture then replay with graphs.


class _FakeCupy:
    """Just enough of CuPy's interface for analysis.measure.timing: events read the
    wall clock, a 'stream' records what ran on it, a 'graph' replays a call."""

    def __init__(self):
        self.log = []
        fake = self

        class Event:
            def record(self, stream=None):
                self.at = time.perf_counter()

            def synchronize(self):
                pass

        class Stream:
            def __init__(self, non_blocking=False):
                self.capturing = False

            def __enter__(self):
                fake.log.append("enter stream")
                return self

            def __exit__(self, *exc):
                fake.log.append("exit stream")

            def begin_capture(self):
                self.capturing = True
                fake.log.append("begin capture")

            def is_capturing(self):
                return self.capturing

            def end_capture(self):
                self.capturing = False
                fake.log.append("end capture")
                return Graph(fake.last_call)

            def synchronize(self):
                pass

        class Graph:
            def __init__(self, call):
                self.call = call

            def launch(self, stream=None):
                fake.log.append(f"replay {self.call}")

        class Device:
            attributes = {"L2CacheSize": 50 * 2**20}

            def synchronize(self):
                pass

        class Scratch:
            def fill(self, value):
                fake.log.append("flush")

        class Cuda:
            pass

        self.cuda = Cuda()
        self.cuda.Event, self.cuda.Stream, self.cuda.Device = Event, Stream, Device
        self.cuda.get_elapsed_time = lambda start, stop: (stop.at - start.at) * 1e3
        self.uint8 = "uint8"
        self.empty = lambda n, dtype=None: Scratch()
        self.last_call = None


@pytest.fixture
def fake_cupy(monkeypatch):
    import importlib.util
    import sys

    fake = _FakeCupy()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "cupy" else real_find_spec(name, *a))
    return fake


def test_cuda_timing_flushes_before_every_call(fake_cupy):
    def call(index):
        fake_cupy.log.append(f"call {index}")

    result = timing.time_function(call, args_sets=[(0,), (1,)], warmup=1, repeats=3, device="cuda",
                                  flush_bytes=1024)
    assert result.repeats == 3
    assert fake_cupy.log == ["flush", "call 0", "flush", "call 1", "flush", "call 0", "flush", "call 1"]
    assert timing.l2_flush_bytes() == 100 * 2**20


def test_cuda_graphs_are_captured_once_per_set_then_replayed(fake_cupy):
    def call(index):
        fake_cupy.last_call = index
        fake_cupy.log.append(f"call {index}")
        return index

    timing.time_function(call, args_sets=[(0,), (1,)], warmup=1, repeats=2, device="cuda", cuda_graph=True)
    log = fake_cupy.log
    assert log[:8] == ["enter stream", "call 0", "begin capture", "call 0", "end capture",
                       "call 1", "begin capture", "call 1"]
    replays = [entry for entry in log if entry.startswith("replay")]
    assert replays == ["replay 0", "replay 1", "replay 0"]  # warm-up, then two timed
    assert log[-1] == "exit stream"


def test_a_graph_holds_the_scratch_its_launches_keep_and_the_process_does_not(fake_cupy):
    """Launches under capture hand their scratch to topk_moe.cuda.device.keep_for_graph;
    the capturer takes it right after each capture and holds it with that graph's
    output, so nothing stays in the process-wide list (it held every captured
    layer's arrays for the life of the process)."""
    from topk_moe.cuda import device

    stream = fake_cupy.cuda.Stream()

    def call(index):
        fake_cupy.last_call = index
        if stream.is_capturing():
            device.keep_for_graph([f"scratch {index}", None])
        return f"out {index}"

    graphs, outputs = timing._capture_graphs(fake_cupy, stream, call, [(0,), (1,)])
    assert [graph.call for graph in graphs] == [0, 1]
    assert outputs == [("out 0", ["scratch 0"]), ("out 1", ["scratch 1"])]
    assert device.GRAPH_KEEPALIVE == []


def test_a_call_that_cannot_be_captured_raises_graph_capture_error(fake_cupy):
    calls = []

    def synchronising(index):
        calls.append(index)
        if len(calls) == 2:  # the eager warm-up passes, the captured call fails
            raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(timing.GraphCaptureError, match="not permitted"):
        timing.time_function(synchronising, args_sets=[(0,)], device="cuda", cuda_graph=True)
    assert "end capture" in fake_cupy.log  # the capture was ended, the stream usable again


def test_time_within_budget_on_the_gpu_probes_unflushed_then_flushes_every_call(fake_cupy):
    def call(index):
        fake_cupy.log.append(f"call {index}")

    result = timing.time_within_budget(call, [(0,)], timing.Budget(1.0, min_repeats=2, max_repeats=2),
                                       device="cuda", flush_bytes=64)
    assert result.repeats == 2
    assert fake_cupy.log == ["call 0"] + ["flush", "call 0"] * 5  # the probe, three warm-ups, two timed
