"""The project's one timing helper.

``time_function`` runs a function a few times untimed (warm-up), then times
each of many calls separately and reports the median with the 20th and 80th
percentiles, the spread the book draws as error bars.

Caches flatter a benchmark that calls a function on the same arrays again and
again: the second call finds its inputs (and, for small problems, its weights)
in cache, which a real model running other layers in between would not. So
``args_sets`` takes several argument tuples, and successive calls cycle through
them. On the CPU, choose the number of sets so that their total size is larger
than the last-level cache (``sets_to_exceed_cache`` does that sum); then every
call reads its data from memory, as it would in a model.

``device="cpu"`` times with ``time.perf_counter``. ``device="cuda"`` times with
CUDA events recorded on the current stream around each call, the GPU-side time
of the work the call launched. On the GPU the weights of a large layer dwarf
the L2 cache but a small one's do not, so ``flush_bytes`` (``l2_flush_bytes()``
gives twice the device's L2) overwrites a scratch buffer before every call,
untimed: each call then finds its weights in device memory, as it would after
the other layers of a model had run.

``cuda_graph=True`` captures one call per argument set into a CUDA graph and
times the graphs' replays: a layer of many small kernels (decode) is then
timed without the host's launch gaps. Replays are for timing only: the
captured calls' outputs live in memory the allocator may hand out again.

``time_within_budget`` is ``time_function`` for callers that time many
functions of very different cost (the sweep, ``bench_cpu``): one untimed probe
call says how long a call takes, and the repeats are chosen so that the
measurement takes about ``Budget.seconds_per_measurement``, within
``Budget.min_repeats`` and ``Budget.max_repeats``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy

#: What ``last_level_cache_bytes`` returns where the machine won't say:
#: a generous server L3, so that rotation errs on the side of more sets.
FALLBACK_LAST_LEVEL_CACHE_BYTES = 64 * 1024 * 1024


#: A probe call slower than this has warmed itself up: one warm-up call follows, not three.
SELF_WARMING_CALL_S = 0.05


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20th/80th percentiles of ``repeats`` calls."""

    median_s: float
    p20_s: float
    p80_s: float
    repeats: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_function(
    fn: Callable,
    *,
    args_sets: Sequence[tuple] | None = None,
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
    setup: Callable[[], object] | None = None,
    device: str = "cpu",
    flush_bytes: int = 0,
    cuda_graph: bool = False,
) -> Timing:
    """Time ``fn``; return the median and p20/p80 of the per-call times.

    ``args_sets``: a list of argument tuples; call ``i`` (warm-up included) is
    ``fn(*args_sets[i % len(args_sets)])``. Without it, ``fn()``. To rotate a
    buffer index instead, pass ``[(0,), (1,), ...]``.
    ``warmup``: untimed calls first (first-touch, BLAS thread start-up, kernel
    compilation).
    ``repeats``: timed calls at least; more are made until the timed calls add
    up to ``min_time_s``, so a fast function is not judged on a few microseconds.
    ``setup``: called untimed before every call, e.g. to flush a cache.
    ``device``: ``"cpu"`` (wall clock, ``time.perf_counter``) or ``"cuda"``
    (CUDA events through CuPy).
    ``flush_bytes`` (``device="cuda"`` only): before every call, untimed, write
    a scratch buffer of this many bytes so the L2 cache holds nothing of the
    last call (0: no flush).
    ``cuda_graph`` (``device="cuda"`` only): capture each argument set's call
    into a CUDA graph (after one eager call on the capture stream, which
    compiles kernels and fills the allocator's pool for it) and time replays.
    A function that synchronises with the host cannot be captured: then this
    raises ``GraphCaptureError``, and the caller may time it eagerly instead.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup: expected at least 0, got {warmup}")
    if args_sets is not None and len(args_sets) == 0:
        raise ValueError("args_sets: expected at least one argument tuple, got an empty sequence")
    argument_sets = [tuple(arguments) for arguments in args_sets] if args_sets is not None else [()]

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cpu" and (flush_bytes or cuda_graph):
        raise ValueError("flush_bytes, cuda_graph: expected only with device='cuda'")
    if flush_bytes < 0:
        raise ValueError(f"flush_bytes: expected at least 0, got {flush_bytes}")
    if device == "cpu":
        return _timed_calls(fn, argument_sets, warmup, repeats, min_time_s, setup, _cpu_call_timer())

    cupy = _import_cupy()
    setup = _with_l2_flush(cupy, setup, flush_bytes)
    if not cuda_graph:
        return _timed_calls(fn, argument_sets, warmup, repeats, min_time_s, setup, _cuda_call_timer())
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:  # capture, flushes, events and replays all on one stream
        graphs, outputs = _capture_graphs(cupy, stream, fn, argument_sets)
        replay_sets = [(graph,) for graph in graphs]
        return _timed_calls(lambda graph: graph.launch(stream), replay_sets, warmup, repeats,
                            min_time_s, setup, _cuda_call_timer())


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long one measurement may take: the repeats are fitted to
    ``seconds_per_measurement`` from one probe call, within [min_repeats, max_repeats]
    (``min_repeats`` wins where the two disagree)."""

    seconds_per_measurement: float = 0.3
    min_repeats: int = 5
    max_repeats: int = 30


def repeats_for_budget(probe_s: float, budget: Budget) -> int:
    """Timed calls that fill ``budget.seconds_per_measurement`` at ``probe_s`` per call."""
    fitted = math.ceil(budget.seconds_per_measurement / max(probe_s, 1e-9))
    return max(budget.min_repeats, min(budget.max_repeats, fitted))


def time_within_budget(fn: Callable, args_sets: Sequence[tuple], budget: Budget, *, device: str = "cpu",
                       flush_bytes: int = 0, cuda_graph: bool = False) -> Timing:
    """``time_function`` with its repeats fitted to ``budget``.

    One probe call of ``fn(*args_sets[0])`` (eager, untimed by the result; on
    the GPU the device is synchronised before and after it, so it measures
    the work, not the launch) gives the seconds per call; the repeats are
    ``repeats_for_budget`` of that, and a call slower than
    ``SELF_WARMING_CALL_S`` gets one warm-up call instead of three (the probe
    has warmed it up). The other options are ``time_function``'s.
    """
    if not args_sets:
        raise ValueError("args_sets: expected at least one argument tuple, got an empty sequence")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    synchronize = _import_cupy().cuda.Device().synchronize if device == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    fn(*args_sets[0])
    synchronize()
    probe_s = time.perf_counter() - start
    warmup = 1 if probe_s > SELF_WARMING_CALL_S else 3
    return time_function(fn, args_sets=args_sets, warmup=warmup, repeats=repeats_for_budget(probe_s, budget),
                         device=device, flush_bytes=flush_bytes, cuda_graph=cuda_graph)


class GraphCaptureError(RuntimeError):
    """The function could not be captured into a CUDA graph (it synchronises
    with the host, or allocates outside the pool)."""


def _timed_calls(fn, argument_sets, warmup, repeats, min_time_s, setup, time_one_call) -> Timing:
    call_index = 0
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn(*argument_sets[call_index % len(argument_sets)])
        call_index += 1

    seconds_per_call: list[float] = []
    while len(seconds_per_call) < repeats or sum(seconds_per_call) < min_time_s:
        if setup is not None:
            setup()
        seconds_per_call.append(time_one_call(fn, argument_sets[call_index % len(argument_sets)]))
        call_index += 1

    p20, median, p80 = numpy.percentile(seconds_per_call, [20, 50, 80])
    return Timing(median_s=float(median), p20_s=float(p20), p80_s=float(p80),
                  repeats=len(seconds_per_call))


def _cpu_call_timer() -> Callable[[Callable, tuple], float]:
    def time_one_call(fn: Callable, arguments: tuple) -> float:
        start = time.perf_counter()
        fn(*arguments)
        return time.perf_counter() - start

    return time_one_call


def _import_cupy():
    if importlib.util.find_spec("cupy") is None:
        raise RuntimeError("device='cuda' needs CuPy, which is not installed")
    import cupy  # noqa: PLC0415 - never imported unless CUDA timing is asked for

    return cupy


def _with_l2_flush(cupy, setup, flush_bytes: int):
    """``setup`` followed by a write of ``flush_bytes`` bytes (a memset), both
    on the current stream and so before the start event: untimed."""
    if not flush_bytes:
        return setup
    scratch = cupy.empty(int(flush_bytes), dtype=cupy.uint8)

    def flush_then_setup():
        scratch.fill(1)
        if setup is not None:
            setup()

    return flush_then_setup


def _capture_graphs(cupy, stream, fn: Callable, argument_sets: list) -> tuple:
    """(graphs, outputs): one CUDA graph per argument set, each capturing one
    call of ``fn``, and for each what the captured call returned together with
    the scratch arrays its launches write (topk_moe.cuda.device's keepalive),
    both kept alive with the graphs so that no replay writes into memory the
    allocator has handed to something else; they are freed with the graphs."""
    from topk_moe.cuda.device import take_graph_keepalive  # noqa: PLC0415 - with CuPy only

    graphs, outputs = [], []
    for arguments in argument_sets:
        fn(*arguments)  # compiles, and leaves pool blocks for this stream to reuse
        stream.synchronize()
        stream.begin_capture()
        try:
            outputs.append(fn(*arguments))
        except Exception as error:
            _abandon_capture(stream)
            take_graph_keepalive()  # no graph will replay them
            raise GraphCaptureError(f"could not capture {getattr(fn, '__name__', fn)!r}: "
                                    f"{type(error).__name__}: {error}") from error
        try:
            graphs.append(stream.end_capture())
        except Exception as error:  # the capture was invalidated by a call inside fn
            take_graph_keepalive()  # no graph will replay them
            raise GraphCaptureError(f"capture of {getattr(fn, '__name__', fn)!r} failed: "
                                    f"{type(error).__name__}: {error}") from error
        outputs[-1] = (outputs[-1], take_graph_keepalive())
    stream.synchronize()
    return graphs, outputs


def _abandon_capture(stream) -> None:
    """End a capture that failed part-way, so the stream can be used again."""
    try:
        if stream.is_capturing():
            stream.end_capture()
    except Exception:  # an invalidated capture reports its error here; it is already being raised
        pass


def _cuda_call_timer() -> Callable[[Callable, tuple], float]:
    """CUDA-event timing. NOT TESTED on the development machine (it has no GPU):
    the GPU issue that first uses it must check it against a known kernel.

    Events are recorded on the current stream, so the time is the GPU's time
    for the work ``fn`` launched, excluding Python overhead before the first
    launch; ``stop.synchronize()`` makes each call finish before the next.
    Work on the legacy default stream (CuPy's and PyTorch's default) is
    ordered with these events, so PyTorch code is timed the same way.
    """
    cupy = _import_cupy()

    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    # Work queued before timing starts (warm-up, setup) must not be counted.
    cupy.cuda.Device().synchronize()

    def time_one_call(fn: Callable, arguments: tuple) -> float:
        start.record()
        fn(*arguments)
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1e3  # milliseconds to seconds

    return time_one_call


def gpu_l2_cache_bytes() -> int:
    """The current CUDA device's L2 cache size in bytes (CuPy)."""
    cupy = _import_cupy()
    return int(cupy.cuda.Device().attributes["L2CacheSize"])


def l2_flush_bytes() -> int:
    """Bytes to write before each GPU call so that nothing of the last call
    survives in L2: twice its size."""
    return 2 * gpu_l2_cache_bytes()


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache, from Linux sysfs; a generous fallback
    (``FALLBACK_LAST_LEVEL_CACHE_BYTES``) where sysfs doesn't say."""
    largest = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip().upper()
        except OSError:
            continue
        multiplier = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * multiplier)
    return largest or FALLBACK_LAST_LEVEL_CACHE_BYTES


def sets_to_exceed_cache(bytes_per_set: int, *, cache_bytes: int | None = None,
                         factor: float = 2.0, minimum: int = 2) -> int:
    """How many argument sets to rotate so that together they are ``factor``
    times the last-level cache: by the time a set comes round again, it has
    been evicted. At least ``minimum`` sets, so no two calls in a row share data."""
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set: expected a positive size, got {bytes_per_set}")
    cache_bytes = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    return max(minimum, math.ceil(factor * cache_bytes / bytes_per_set))
