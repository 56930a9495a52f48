"""The kernel loader of the emulated device: the twin of kernels/topk_moe/cuda/loader.py.

    kernel = get_kernel("router.cu", "router_top2_f32", N_EXPERTS=64, ROUTER_TOKENS=8)
    kernel((blocks,), (threads,), (x, router, numpy.int64(T), ...), shared_mem=0)

takes the arguments CuPy's RawKernel takes and checks more than CuPy can: every
array must be an emulator array (``arrays``), of the element size the kernel's
pointer parameter has; every scalar a NumPy scalar of the parameter's exact C
type (a ``numpy.int32`` for a ``long long`` is an error here, garbage on a GPU).
After the launch the fences of every array argument are checked. A fault raises
``KernelFault`` naming the kernel, block, thread and source line.

``schedule(...)`` picks the order the fibers of a block run in and when
cp.async copies land; results must be bitwise equal under every schedule.
``LAUNCHES`` counts the launches per (file, kernel). Inside
``traffic.counting()`` the traffic flavour of each file is built and run, and
each launch's memory traffic is counted (traffic.py); inside
``racecheck.checking()`` (or with ``MOE_EMULATOR_RACECHECK=1``) the same
instrumented flavour runs and each launch is checked for data races (racecheck.py).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
from pathlib import Path

import numpy

from ..loader import define_options
from . import arrays, build, racecheck, rewrite, traffic

SCHEDULES = {"ascending": 0, "descending": 1, "shuffled": 2, "warp-by-warp": 3}
_settings = {"order": "ascending", "seed": 0, "copy_async": "late", "kernel_dir": str(build.KERNEL_DIR)}

#: (file, kernel) -> number of launches in this process.
LAUNCHES: collections.Counter = collections.Counter()

_SCALAR_TYPES = {"i32": numpy.int32, "u32": numpy.uint32, "i64": numpy.int64, "u64": numpy.uint64,
                 "f32": numpy.float32}
_CTYPES = {"i32": ctypes.c_int32, "u32": ctypes.c_uint32, "i64": ctypes.c_int64, "u64": ctypes.c_uint64,
           "f32": ctypes.c_float}


class KernelFault(RuntimeError):
    """A kernel did something a GPU would punish with garbage, a hang or a crash."""


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("dynamic_shared_bytes", ctypes.c_ulonglong), ("schedule", ctypes.c_int),
                ("seed", ctypes.c_ulonglong), ("copy_async_eager", ctypes.c_int),
                ("check_launch_bounds", ctypes.c_int)]


@contextlib.contextmanager
def schedule(order: str = "ascending", *, seed: int = 0, copy_async: str = "late"):
    """Run the launches inside under another schedule: ``order`` of the fibers
    (ascending, descending, shuffled, warp-by-warp) and cp.async landing
    ("late": at the wait that needs it; "eager": at issue)."""
    if order not in SCHEDULES or copy_async not in ("late", "eager"):
        raise ValueError(f"schedule: order in {tuple(SCHEDULES)}, copy_async 'late' or 'eager'")
    saved = dict(_settings)
    _settings.update(order=order, seed=seed, copy_async=copy_async)
    try:
        yield
    finally:
        _settings.update(saved)


def _dims(value) -> tuple:
    value = (value,) if isinstance(value, (int, numpy.integer)) else tuple(value)
    return tuple(int(v) for v in value) + (1,) * (3 - len(value))


class EmulatedKernel:
    """One kernel of a built library, called like a CuPy RawKernel."""

    def __init__(self, library: ctypes.CDLL, file: str, name: str, kernel_dir: str = str(build.KERNEL_DIR)):
        self.file, self.name = file, name
        self._library, self._source = library, str(Path(kernel_dir) / file)
        self._instrumented = hasattr(library, "emu_instrument")  # the traffic flavour
        self._launch = getattr(library, f"emu_launch_{name}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        signature = getattr(library, f"emu_signature_{name}")
        signature.restype = ctypes.c_char_p
        self.parameters = tuple(signature().decode().rstrip(",").split(","))

    def __call__(self, grid, block, args, *, shared_mem: int = 0):
        if len(args) != len(self.parameters):
            raise TypeError(f"kernel {self.name}: takes {len(self.parameters)} arguments, got {len(args)}")
        holders, fenced = [], []
        for position, (code, value) in enumerate(zip(self.parameters, args)):
            holders.append(self._argument(position, code, value, fenced))
        pointers = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.addressof(h) for h in holders])
        config = _LaunchConfig((ctypes.c_uint * 3)(*_dims(grid)), (ctypes.c_uint * 3)(*_dims(block)),
                               int(shared_mem), SCHEDULES[_settings["order"]], _settings["seed"],
                               int(_settings["copy_async"] == "eager"), 1)
        error = ctypes.create_string_buffer(4096)
        LAUNCHES[(self.file, self.name)] += 1
        rng = numpy.random.default_rng(sum(LAUNCHES.values()))
        armed, seen = [], set()
        for position, info in fenced:
            if id(info[0]) not in seen:  # two views of one buffer share its fences
                seen.add(id(info[0]))
                armed.append((position, info, arrays.arm_guards(info, rng)))
        counts_traffic = self._instrumented and traffic.active()
        checks_races = self._instrumented and racecheck.active()
        if self._instrumented:
            names = traffic.parameter_names(self._source, self.name)
            names = [names[position] if position < len(names) else f"argument {position}" for position, _ in fenced]
            regions = [(info[0].ctypes.data + info[1], info[2]) for _, info in fenced]
            self._library.emu_instrument(int(counts_traffic), int(checks_races))
            if counts_traffic:
                traffic.begin(self._library, regions)
            if checks_races:
                racecheck.begin(self._library, regions)
        status = self._launch(ctypes.byref(config), pointers, error, len(error))
        if status != 0:
            if checks_races:
                self._library.emu_race_end()
            raise KernelFault(error.value.decode(errors="replace"))
        if counts_traffic:
            traffic.finish(self._library, self._library._name, self.file, self.name, _dims(grid), _dims(block), names)
        if checks_races:
            racecheck.finish(self._library, self._library._name, self.file, self.name, _dims(grid), _dims(block),
                             names)
        for position, info, fences in armed:
            damage = arrays.guard_damage(info, fences)
            if damage:
                raise KernelFault(f"kernel {self.name}: wrote outside argument {position} "
                                  f"({damage} of its buffer)")

    def _argument(self, position: int, code: str, value, fenced: list):
        where = f"kernel {self.name}, argument {position}"
        if code[0] in "fiuv" and code not in _SCALAR_TYPES:
            info = arrays.guarded_buffer(value)
            if info is None:
                raise TypeError(f"{where}: expected an emulator device array (topk_moe.cuda.emulator.arrays), "
                                f"got {type(value).__name__}")
            kinds = {"f": "f", "i": "iu"}.get(code[0])  # unsigned and vector pointees are raw bytes
            if kinds and (value.dtype.kind not in kinds or value.dtype.itemsize != int(code[1:])):
                raise TypeError(f"{where}: the kernel takes {code[1:]}-byte "
                                f"{'floats' if code[0] == 'f' else 'integers'}, got {value.dtype}")
            fenced.append((position, info))
            return ctypes.c_void_p(value.ctypes.data)
        if code not in _SCALAR_TYPES:
            raise TypeError(f"{where}: parameter type the emulator cannot pass ({code})")
        if type(value) is not _SCALAR_TYPES[code]:
            raise TypeError(f"{where}: expected numpy.{numpy.dtype(_SCALAR_TYPES[code]).name} for the kernel's "
                            f"C type, got {type(value).__name__} (CuPy would pass its bytes unchecked)")
        return _CTYPES[code](value.item())


@functools.lru_cache(maxsize=None)
def _library(file: str, options: tuple, kernel_dir: str, instrumented: bool = False) -> ctypes.CDLL:
    return ctypes.CDLL(str(build.build(file, options, Path(kernel_dir), traffic=instrumented)))


@functools.lru_cache(maxsize=None)
def _kernel(file: str, name: str, options: tuple, kernel_dir: str = str(build.KERNEL_DIR),
            instrumented: bool = False) -> EmulatedKernel:
    return EmulatedKernel(_library(file, options, kernel_dir, instrumented), file, name, kernel_dir)


def _instrumented() -> bool:
    """Whether launches now need the instrumented (traffic) flavour."""
    return traffic.active() or racecheck.active()


def get_kernel(file: str, name: str, **defines) -> EmulatedKernel:
    """The emulated kernel ``name`` of ``file`` (in kernels/topk_moe/cuda, or the folder of
    ``kernel_sources``) built with ``-D`` ``defines``; the instrumented (traffic) flavour
    inside ``traffic.counting()`` and ``racecheck.checking()``."""
    return _kernel(file, name, define_options(**defines), _settings["kernel_dir"], _instrumented())


@contextlib.contextmanager
def kernel_sources(folder):
    """Build the kernels launched inside from the .cu files of ``folder`` instead
    of kernels/topk_moe/cuda (the mutation check runs the backend on mutated copies)."""
    saved = _settings["kernel_dir"]
    _settings["kernel_dir"] = str(Path(folder).resolve())
    try:
        yield
    finally:
        _settings["kernel_dir"] = saved


def prebuild(builds, folder=None, workers: int = 0, *, traffic: bool = False) -> None:
    """Build (file, defines) pairs in parallel threads (the compiler runs as a
    process), so a cold cache costs wall time / cores; the traffic flavour
    (traffic.py) when ``traffic``."""
    import concurrent.futures
    import os

    folder = Path(folder or _settings["kernel_dir"])
    workers = workers or max(1, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(build.build, file, define_options(**defines), folder, traffic=traffic)
                       for file, defines in builds]:
            future.result()


def load_kernel(path, name: str, **defines) -> EmulatedKernel:
    """The emulated kernel ``name`` of the .cu file at ``path`` (any folder; for tests)."""
    path = Path(path).resolve()
    return _kernel(path.name, name, define_options(**defines), str(path.parent), _instrumented())


def kernels_of(file: str) -> list:
    """The extern "C" __global__ kernels of a kernels/topk_moe/cuda file."""
    return rewrite.kernel_names((build.KERNEL_DIR / file).read_text(encoding="utf-8"))
