"""nvcc's resource report of the CUDA kernels, the kernel-to-launcher map, and
the source hash of the ``topk_moe`` package (folder ``kernels``). No CuPy and no GPU: this runs
wherever nvcc is installed (tests/test_cuda_build.py; the book's Kernels
chapter shows ``resource_report()``).

Every ``.cu`` file of this folder is compiled to a cubin with the options the
loader gives NVRTC (``loader.BASE_OPTIONS``, plus the ``-ftz=true`` that CuPy
appends to every compile) and the ``-D`` sets of
``launch_config.build_variants``, and ptxas's ``-v`` report is parsed into one
row per kernel and variant: registers, spill stores and loads, static shared
memory and stack frame bytes.
"""

from __future__ import annotations

import ast
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from .launch_config import build_variants
from .loader import BASE_OPTIONS, KERNEL_DIR, define_options

REPO_ROOT = KERNEL_DIR.parent.parent.parent  # kernels/topk_moe/cuda -> the repository
#: Options CuPy appends to every NVRTC compile after ours (flush float32
#: subnormals to zero), so nvcc's report is of the code that runs.
CUPY_IMPLICIT_OPTIONS = ("-ftz=true",)
#: Files whose bytes make up ``source_hash``.
SOURCE_SUFFIXES = (".py", ".cu", ".cuh")


class BuildError(RuntimeError):
    """nvcc failed on a source; the message holds its command and output."""


# ---------------------------------------------------------------------------
# sources, kernels and launchers


def kernel_sources() -> list:
    """The ``.cu`` files of this folder, sorted."""
    return sorted(KERNEL_DIR.glob("*.cu"))


_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)")
_EXTERN_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+([A-Za-z_]\w*)\s*\(')


def kernel_names(source: str) -> list:
    """The ``extern "C" __global__`` kernels defined in CUDA source text."""
    text = _LAUNCH_BOUNDS.sub(" ", _COMMENT.sub(" ", source))
    return _EXTERN_KERNEL.findall(text)


def _literal_strings(node: ast.AST) -> Optional[set]:
    """The strings an argument can be when written as literals (a string, or a
    conditional expression between literals); None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        body, orelse = _literal_strings(node.body), _literal_strings(node.orelse)
        return None if body is None or orelse is None else body | orelse
    return None


def launcher_kernels(py_files: Optional[Iterable[Path]] = None) -> tuple:
    """(pairs, problems): the (file, kernel) pairs named by ``get_kernel`` calls
    in this folder's Python files, and a line for each call whose file or
    kernel is not written as literals (the convention of ``loader``)."""
    pairs, problems = set(), []
    for path in sorted(py_files if py_files is not None else KERNEL_DIR.glob("*.py")):
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if called != "get_kernel":
                continue
            files = _literal_strings(node.args[0]) if len(node.args) >= 2 else None
            names = _literal_strings(node.args[1]) if len(node.args) >= 2 else None
            if files is None or names is None:
                problems.append(f"{Path(path).name}:{node.lineno}: get_kernel needs the file and kernel "
                                f"name as string literals")
                continue
            pairs |= {(file, name) for file in files for name in names}
    return pairs, problems


def source_kernels() -> set:
    """The (file, kernel) pairs defined in this folder's ``.cu`` files."""
    return {(path.name, name) for path in kernel_sources()
            for name in kernel_names(path.read_text(encoding="utf-8"))}


# ---------------------------------------------------------------------------
# nvcc


def cuda_tool_path(name: str) -> Optional[str]:
    """A CUDA toolkit program (nvcc, compute-sanitizer, ...) on PATH, else under
    $CUDA_HOME, $CUDA_PATH or /usr/local/cuda; None when absent."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).is_file():
            return str(Path(root) / "bin" / name)
    return None


def nvcc_path() -> Optional[str]:
    """nvcc, found as cuda_tool_path finds it; None when absent."""
    return cuda_tool_path("nvcc")


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(report: str) -> dict:
    """ptxas ``-v`` text -> {function: {registers, spill_stores, spill_loads,
    shared_bytes, stack_bytes}}. Device functions that were not inlined appear
    with ``registers`` None (their spills still count)."""
    functions: dict = {}
    entry = properties_of = None
    for line in report.splitlines():
        match = _ENTRY.search(line)
        if match:
            entry = match.group(1)
            functions.setdefault(entry, _blank())
            continue
        match = _PROPERTIES.search(line)
        if match:
            properties_of = match.group(1)
            functions.setdefault(properties_of, _blank())
            continue
        match = _FRAME.search(line)
        if match and properties_of is not None:
            stack, stores, loads = (int(value) for value in match.groups())
            functions[properties_of].update(stack_bytes=stack, spill_stores=stores, spill_loads=loads)
            continue
        match = _USED.search(line)
        if match and entry is not None:
            shared = _SMEM.search(line)
            functions[entry].update(registers=int(match.group(1)),
                                    shared_bytes=int(shared.group(1)) if shared else 0)
    return functions


def _blank() -> dict:
    return {"registers": None, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0, "stack_bytes": 0}


def compile_command(source: Path, arch: str, defines: dict, output: Path) -> list:
    nvcc = nvcc_path()
    if nvcc is None:
        raise BuildError("nvcc is not installed (looked on PATH, in $CUDA_HOME and /usr/local/cuda)")
    return [nvcc, f"-arch={arch}", "-cubin", "-Xptxas", "-v", *BASE_OPTIONS, *CUPY_IMPLICIT_OPTIONS,
            f"-I{KERNEL_DIR}", *define_options(**defines), "-o", str(output), str(source)]


def compile_report(source: Path, arch: str = "sm_90", defines: Optional[dict] = None) -> list:
    """Compile one source for one variant; its rows of the resource report."""
    defines = dict(defines or {})
    with tempfile.TemporaryDirectory(prefix="moe-nvcc-") as folder:
        command = compile_command(Path(source), arch, defines, Path(folder) / "kernels.cubin")
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(command)}\nexit {done.returncode}\n{done.stdout}{done.stderr}")
    return [
        {"file": Path(source).name, "kernel": function, "arch": arch, "defines": defines, **resources}
        for function, resources in sorted(parse_ptxas(done.stdout + done.stderr).items())
    ]


def resource_report(arch: str = "sm_90", *, sources: Optional[Iterable[Path]] = None,
                    jobs: Optional[int] = None) -> list:
    """One dict per kernel and -D variant of every ``.cu`` file here:
    file, kernel, arch, defines, registers, spill_stores, spill_loads,
    shared_bytes (static), stack_bytes. Raises BuildError when nvcc fails."""
    tasks = [(Path(source), variant) for source in (sources or kernel_sources())
             for variant in build_variants(Path(source).name)]
    jobs = jobs or max(1, min(len(tasks), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        reports = list(pool.map(lambda task: compile_report(task[0], arch, task[1]), tasks))
    return [row for report in reports for row in report]


# ---------------------------------------------------------------------------
# provenance


def source_hash(root: Optional[os.PathLike] = None) -> str:
    """sha256 over every ``kernels/**/*.py``, ``*.cu`` and ``*.cuh`` under
    ``root`` (default: this repository), in sorted order of their paths
    relative to ``root``, each fed as: its relative POSIX path, a NUL byte,
    its bytes, a NUL byte. It names the code a GPU record was made with even
    where there is no git checkout."""
    root = Path(root) if root is not None else REPO_ROOT
    files = [path for path in (root / "kernels").rglob("*")
             if path.is_file() and path.suffix in SOURCE_SUFFIXES]
    digest = hashlib.sha256()
    for relative, path in sorted((path.relative_to(root).as_posix(), path) for path in files):
        digest.update(relative.encode("utf-8") + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()
