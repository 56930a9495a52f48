"""The project's one record writer and loader.

Every number in the book comes from a *tidy record*: one JSON object per line,
appended to ``results/<device>/<kind>.jsonl``. A record is the measurement's
own fields plus ``params`` (what produced it) plus provenance (where, when and
with what it was produced), so that a figure can always say where it came from.

The device folder is a slug of the device name: ``cpu-<cpu model>`` for CPU
runs (``cpu-amd-epyc``), the GPU's name for GPU runs
(``nvidia-h100-80gb-hbm3``).

Importing this module never imports CuPy or torch: versions come from package
metadata, and GPU details are read only when CuPy is importable and a GPU
record is being written.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Distributions whose versions every record carries. CuPy ships under several
#: names (one per CUDA major version); the first one installed wins.
_PACKAGE_DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "torch": ("torch",),
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"),
}

#: The fields ``provenance`` returns; a record may not use these names for
#: its own measurements.
PROVENANCE_FIELDS = (
    "utc", "host", "device", "device_kind", "cpu_count", "blas", "thread_settings",
    "compute_capability", "driver", "cuda_driver", "cuda_runtime",
    "python", "numpy", "scipy", "torch", "cupy",
    "git_commit", "git_dirty",
)

#: Environment variables that set the BLAS and OpenMP thread counts.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_KIND_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")


# ---------------------------------------------------------------- names


def device_slug(name: str) -> str:
    """A file-system-safe folder name for a device: ``"NVIDIA H100 80GB HBM3"``
    becomes ``"nvidia-h100-80gb-hbm3"``. Lower case, runs of anything other
    than letters and digits collapsed to one ``-``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def device_folder(device_name: str, device_kind: str) -> str:
    """The results sub-folder for a device: CPU folders get a ``cpu-`` prefix
    so that a CPU and a GPU can never share a folder."""
    _check_device_kind(device_kind)
    slug = device_slug(device_name)
    return f"cpu-{slug}" if device_kind == "cpu" else slug


def results_root(results_dir: str | os.PathLike | None = None) -> Path:
    """Where results live: the argument if given, else ``$MOE_RESULTS_DIR``,
    else ``<repo>/results``."""
    if results_dir is not None:
        return Path(results_dir)
    from_environment = os.environ.get("MOE_RESULTS_DIR")
    if from_environment:
        return Path(from_environment)
    return REPO_ROOT / "results"


# ---------------------------------------------------------------- provenance


def provenance(device_kind: str = "cpu", *, repo_root: str | os.PathLike | None = None) -> dict:
    """Where, when and with what a measurement is being made.

    ``device_kind`` is ``"cpu"`` or ``"gpu"``. GPU details (name, compute
    capability, driver, CUDA runtime) come from CuPy, and only when CuPy is
    already installed; otherwise they are ``None``. ``repo_root`` (default: this
    repository) is where ``git`` is asked for the commit and dirty flag; where
    that fails (no ``.git``, no ``git``, no commit yet), the commit comes from
    ``$MOE_GIT_COMMIT`` and the dirty flag is ``None``. For this repository the
    state is the one taken when this module was first imported (see
    ``_CODE_STATE``), not the one at the time of the call.
    """
    _check_device_kind(device_kind)
    gpu = _gpu_details() if device_kind == "gpu" else _NO_GPU
    if repo_root is None:
        git_commit, git_dirty = _CODE_STATE
        if git_commit is None:  # no git here: $MOE_GIT_COMMIT may have been set since
            git_commit = os.environ.get("MOE_GIT_COMMIT") or None
    else:
        git_commit, git_dirty = _git_state(Path(repo_root))
    return {
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "host": platform.node(),
        "device": _cpu_name() if device_kind == "cpu" else gpu["name"],
        "device_kind": device_kind,
        "cpu_count": os.cpu_count(),
        "blas": _numpy_blas(),
        # On a shared CPU these decide the timings (a BLAS thread waiting for a
        # busy core stalls every call): unset means the library's default.
        "thread_settings": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "compute_capability": gpu["compute_capability"],
        "driver": gpu["driver"],
        "cuda_driver": gpu["cuda_driver"],
        "cuda_runtime": gpu["cuda_runtime"],
        "python": platform.python_version(),
        **{package: _installed_version(package) for package in ("numpy", "scipy", "torch", "cupy")},
        "git_commit": git_commit,
        "git_dirty": git_dirty,
    }


def _check_device_kind(device_kind: str) -> None:
    if device_kind not in ("cpu", "gpu"):
        raise ValueError(f"device_kind: expected 'cpu' or 'gpu', got {device_kind!r}")


def _cpu_name() -> str:
    """The CPU model as the kernel reports it; platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _numpy_blas() -> str | None:
    """NumPy's BLAS, e.g. ``"scipy-openblas 0.3.31"``: on the CPU it sets the
    GEMM speed, so it belongs beside every CPU number."""
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:  # show_config's layout is not a stable API
        return None


def _installed_version(package: str) -> str | None:
    for distribution in _PACKAGE_DISTRIBUTIONS[package]:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


_NO_GPU = {"name": None, "compute_capability": None, "driver": None,
           "cuda_driver": None, "cuda_runtime": None}


def _gpu_details() -> dict:
    """Device 0 as CuPy sees it. CuPy is imported here, never at module import,
    and only when it is installed. Without CuPy, a process that already runs
    PyTorch on CUDA (the training CLI) names the device through torch, which
    this module never imports itself; otherwise every field is ``None``."""
    if importlib.util.find_spec("cupy") is None:
        return _gpu_details_from_torch()
    import cupy  # noqa: PLC0415 - deliberately lazy, see the module docstring

    runtime = cupy.cuda.runtime
    properties = runtime.getDeviceProperties(0)
    name = properties["name"]
    details = {
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": f"{properties['major']}.{properties['minor']}",
        "driver": _nvidia_driver_version(),
        "cuda_driver": _cuda_version_string(runtime.driverGetVersion()),
        "cuda_runtime": _cuda_version_string(runtime.runtimeGetVersion()),
    }
    return details


def _gpu_details_from_torch() -> dict:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return dict(_NO_GPU)
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "name": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
        "driver": _nvidia_driver_version(),
        "cuda_driver": None,
        "cuda_runtime": torch.version.cuda,
    }


def _cuda_version_string(encoded: int) -> str:
    """CUDA encodes 12.4 as 12040."""
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def _nvidia_driver_version() -> str | None:
    """The NVIDIA driver (e.g. ``"570.124.06"``) via NVML where nvidia-ml-py is
    installed; CuPy itself only knows the CUDA version the driver supports."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # NVML missing at run time: the field stays empty
        return None


def _git_state(repo_root: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) from git; (``$MOE_GIT_COMMIT``, None) where git can't say.

    Changes under ``results/`` don't count as dirty: writing one batch of
    records must not mark the next batch as coming from modified code.
    """
    try:
        commit = _run_git(repo_root, "rev-parse", "HEAD")
        status = _run_git(repo_root, "status", "--porcelain", "--", ".", ":(exclude)results")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MOE_GIT_COMMIT") or None, None
    return commit, bool(status)


def _run_git(repo_root: Path, *arguments: str) -> str:
    if not (repo_root / ".git").exists():
        # A parent directory's repository is not this project's history.
        raise FileNotFoundError(f"no .git in {repo_root}")
    completed = subprocess.run(
        ["git", "-C", str(repo_root), *arguments],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return completed.stdout.strip()


#: The commit and dirty flag of the code this process runs, taken once, when
#: the module is imported (every entry point imports it at start-up). Taken
#: at each write instead, a run that lasts an hour would stamp its later
#: records with whatever was committed while it ran.
_CODE_STATE = _git_state(REPO_ROOT)


# ---------------------------------------------------------------- JSON


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for a record: NumPy scalars and arrays become Python
    numbers and lists, paths become strings, dataclasses become dicts, and
    NaN or infinity becomes ``None`` (JSON has no spelling for them)."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, numpy.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, numpy.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, numpy.dtype):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    raise TypeError(f"record value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


# ---------------------------------------------------------------- write and read


def write_records(
    kind: str,
    records: list[dict],
    *,
    device_kind: str = "cpu",
    results_dir: str | os.PathLike | None = None,
) -> Path:
    """Append ``records`` to ``<results>/<device>/<kind>.jsonl``; return that path.

    Each record must hold a ``params`` dict (the parameters that produced it)
    and its measurement fields; ``kind`` and provenance are merged in, the same
    provenance for the whole batch. A record may not reuse a provenance field
    name. ``kind`` is lower case letters, digits and ``-`` (it names a file).
    """
    if not _KIND_PATTERN.match(kind):
        raise ValueError(f"kind: expected lower case letters, digits and '-', got {kind!r}")
    shared = provenance(device_kind)
    if shared["device"] is None:
        # A GPU number whose GPU is unknown can't be placed; refuse rather than guess.
        raise RuntimeError(f"can't name the {device_kind} device (CuPy not installed?); no records written")
    lines = []
    for index, record in enumerate(records):
        if not isinstance(record.get("params"), dict):
            raise ValueError(f"records[{index}]: expected a 'params' dict, got {record.get('params')!r}")
        clashes = sorted(set(record) & (set(PROVENANCE_FIELDS) | {"kind"}))
        if clashes:
            raise ValueError(f"records[{index}]: fields {clashes} are provenance, set by write_records")
        # Identity first, then the measurement, then the rest of the provenance:
        # the order a reader scanning the file wants.
        tidy = {
            "kind": kind,
            "utc": shared["utc"],
            "device": shared["device"],
            "device_kind": shared["device_kind"],
            **record,
            **shared,
        }
        lines.append(json.dumps(to_jsonable(tidy), allow_nan=False))

    folder = results_root(results_dir) / device_folder(shared["device"], device_kind)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.jsonl"
    with open(path, "a", encoding="utf-8") as results_file:
        for line in lines:
            results_file.write(line + "\n")
    return path


def read_records(
    kind: str,
    *,
    results_dir: str | os.PathLike | None = None,
    device: str | None = None,
) -> list[dict]:
    """All records of ``kind`` from one device folder.

    ``device`` is a folder name under the results directory (as
    ``device_folder`` makes it, e.g. ``"cpu-amd-epyc"``). Without it, the
    folder holding the newest record of this kind (by ``utc``) is read: that
    is how a chapter without a GPU picks the latest committed GPU results.
    """
    root = results_root(results_dir)
    if device is not None:
        path = root / device / f"{kind}.jsonl"
        if not path.exists():
            available = sorted(p.parent.name for p in root.glob(f"*/{kind}.jsonl"))
            raise FileNotFoundError(f"no {kind!r} records for device {device!r} in {root}; found {available}")
        return _load_jsonl(path)

    candidates = [_load_jsonl(path) for path in sorted(root.glob(f"*/{kind}.jsonl"))]
    candidates = [records for records in candidates if records]
    if not candidates:
        raise FileNotFoundError(f"no {kind!r} records under {root}")
    return max(candidates, key=lambda records: max(record.get("utc", "") for record in records))


def _load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as results_file:
        return [json.loads(line) for line in results_file if line.strip()]
