"""The checks that need a GPU, in one command, with one record of the outcome.

    python -m analysis.measure.device_check            (make device-check PY=python3)
    python -m analysis.measure.device_check --dry-run  (prints the plan and the source hash)
    python -m analysis.measure.device_check --rehearse (make device-check DRY=1: the whole run on the CPU)
    python -m analysis.measure.device_check --steps sweep   (a second call: the sweep alone)

On a machine with a CUDA device it runs these steps, in order (``STEPS``):

1. ``gpu-tests``: ``pytest -m gpu`` over the test files that hold gpu-marked
   tests (the CUDA backend against the reference), read from its JUnit XML:
   passed, failed, errors, skipped;
2. ``memcheck`` and ``racecheck``: compute-sanitizer on ``python -m topk_moe.cuda.smoke``,
   each verdict read from the tool's own summary line (memcheck's ``ERROR
   SUMMARY``, racecheck's ``RACECHECK SUMMARY``);
3. ``traffic-ncu``: Nsight Compute (``analysis.measure.utilisation``) for every
   kernel of one layer at the shape whose requests the CPU emulator counts
   (``analysis.measure.traffic``: preset "cpu", T = 256, k = 1 and 2, float16),
   which is also one of the shapes the GPU model predicts
   (``analysis.measure.gpu_model``, uniform routing): the memory counters, and
   the measured counterparts of the prediction, achieved occupancy, SM and DRAM
   throughput and each kernel's time, into ``traffic-ncu.json``; each measured
   kernel also becomes a record of kind ``gpu-ncu`` (``NCU_KIND``), which the GPU
   chapter puts beside the prediction;
4. ``sweep``: the benchmark sweep, ``python -m analysis.measure.sweep``.

Beside them, from the start, whenever racecheck is a step: the emulated
racecheck (``python -m topk_moe.cuda.emulator.racecheck_cases``), every kernel
at small shapes on the CPU emulator. It needs only the host's CPU and C++
compiler, so it takes none of the GPU steps' time: it gets what is left of the
deadline after them. The record says what it found (``emulated_racecheck``)
and whether it agrees with compute-sanitizer's racecheck on shared memory, the
only memory compute-sanitizer's racecheck watches (``racecheck_agreement``).
Its log stays in the scratch folder (the files that come back are at their limit).

The time plan. Each step has a limit, and the limits plus ``MARGIN_S`` must fit
in ``--deadline-s`` (default 540 s: one call fits the device tool's 10-minute
limit with room to start and to copy results back); a plan that does not fit
is refused before anything runs. The sweep's limit is its reserved share; it
also gets whatever the earlier steps left unused, and is told to start no new
cell ``SWEEP_WIND_DOWN_S`` before its end. Where its time is too short for its
own Nsight Compute and NVML block (``SWEEP_UTILISATION_S``) it runs without
it (``--no-utilisation``; the traffic-ncu step profiles in this call). A second
call, ``--steps sweep``, gives the sweep the whole deadline (pass a
``--deadline-s`` that fits the lease's time left).

Each step runs as a child process in a process group of its own, with
``PYTHONPATH`` naming the repository root (``analysis``) and the folder of
``topk_moe``, so that every process it starts imports both, also where nothing
is installed; at its limit the whole group is stopped
(``analysis.measure.processes``), so no sanitizer target or profiled process
keeps the GPU busy through the next step.

Files. Logs and results go to ``$OUT`` when it is set (else ``--out``, else a
temporary folder): at most ``OUT_FILE_LIMIT`` (8) flat files, the number the
device tool brings back, checked before the run (``Step.files``) and after
it. Scratch (pytest's XML, Nsight reports) goes to a temporary folder.
Unless the tests were left out, a record of kind ``gpu-tests`` is appended to
``results/<device>/gpu-tests.jsonl`` (``analysis.records.write_records``: the
device, the UTC time, the commit from git or ``$MOE_GIT_COMMIT``, the
versions) with the counts, each sanitizer's verdict, the other steps'
outcomes, the table, and ``source_hash``, the hash of the kernel sources
(``topk_moe.cuda.build_report.source_hash``) that names the code even where
there is no git checkout; its line is copied to ``$OUT/gpu-tests.jsonl``.
Where traffic-ncu measured kernels (never in a rehearsal), their ``gpu-ncu``
records go beside it, and their lines to ``$OUT/gpu-ncu.jsonl``. The
table is printed last. Exit status: 0 when every step passed, 1 otherwise, 2
when there is no usable GPU or the plan does not fit.

The rehearsal (``--rehearse``) runs the same steps through the same plumbing
on a machine without a GPU: the same subprocesses, environment, limits,
record writing, files and table. The ``cuda-emulated`` backend stands in for
the GPU (the gpu-marked tests run on it, as they do wherever there is no GPU,
and so does the smoke script); the stand-in programs in
``analysis/measure/standins`` replace compute-sanitizer and ncu (they check
nothing and print the real tools' summary formats); the traffic-ncu step
ends where the GPU is needed, with that reason; the sweep runs its
``cpu-tiny`` plan. Records go to a temporary folder, marked
``"rehearsal": true``. Nothing a rehearsal prints or writes is a GPU result.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Optional

from analysis.measure.processes import NOT_FOUND, TIMED_OUT, run_logged, start_logged, wait_logged
from topk_moe.cuda.build_report import REPO_ROOT, cuda_tool_path, source_hash

KIND = "gpu-tests"
#: The records of the traffic-ncu step's measured kernels, one per (k, kernel).
NCU_KIND = "gpu-ncu"
#: The shape of the committed emulated traffic counts (analysis.measure.traffic),
#: which the GPU model also predicts (preset "cpu", T = 256 is one of its cases).
TRAFFIC_NCU_SHAPE = {"preset": "cpu", "tokens": 256, "top_ks": (1, 2), "dtype": "float16"}
TRAFFIC_NCU_ARGS = ("--preset", TRAFFIC_NCU_SHAPE["preset"], "--tokens", str(TRAFFIC_NCU_SHAPE["tokens"]),
                    "--k", *map(str, TRAFFIC_NCU_SHAPE["top_ks"]), "--dtype", TRAFFIC_NCU_SHAPE["dtype"])
SANITIZER_TOOLS = ("memcheck", "racecheck")
#: Every step, in the order they run.
STEPS = ("gpu-tests", "memcheck", "racecheck", "traffic-ncu", "sweep")
#: Each step's limit in seconds; the sweep's is its reserved share. With
#: MARGIN_S they add up to 535 s, under the default deadline of 540 s. These
#: are estimates, never yet measured on a GPU: the tests are sized for about two
#: minutes on an H100 plus NVRTC's first compiles; the sanitizers run the small
#: smoke script (racecheck is the slower); traffic-ncu is two ncu re-runs of a
#: T = 256 layer. Each step's seconds go into the record, so the first GPU run
#: tells the real ones.
DEFAULT_LIMITS_S = {"gpu-tests": 200, "memcheck": 40, "racecheck": 55, "traffic-ncu": 75, "sweep": 150}
DEFAULT_DEADLINE_S = 540
#: Seconds kept outside every step: starting Python, the record, the table.
MARGIN_S = 15
#: Files the device tool brings back from $OUT.
OUT_FILE_LIMIT = 8
#: Seconds the sweep keeps after its last new cell starts: the cell in flight,
#: the summary tables and the records.
SWEEP_WIND_DOWN_S = 90
#: The sweep's own Nsight Compute and NVML block runs before its budget is
#: first checked: ceilings (~30 s), profile_kernels (its 150 s limit), NVML
#: (~5 s), with the wind-down after. Below this limit the sweep runs without it.
SWEEP_UTILISATION_S = 300
#: Where the stand-ins for compute-sanitizer and ncu live (rehearsal only).
STANDINS = Path(__file__).resolve().parent / "standins"
#: The gpu-marked tests a rehearsal runs on the emulator: a few quick ones of
#: each stage and the whole layer, plus the GPU-only ones, which skip with
#: their reason (the skipped count goes through the same XML).
REHEARSAL_PYTEST_ARGS = ("-k", "test_route_empty_batch or test_moe_forward_empty_batch or "
                         "test_repeated_runs_are_bitwise_identical or test_dropless_moe_forward_in_a_cuda_graph "
                         "or test_64_bit_indexing")
REHEARSAL_SWEEP_ARGS = ("--plan", "cpu-tiny", "--quiet")
REHEARSAL_LABEL = "REHEARSAL on the CPU (cuda-emulated backend, stand-in tools): no GPU result"


@dataclasses.dataclass
class Step:
    """One step: a command, its log (several steps may share one; each reads
    its own part), its limit, and the other files it leaves in the log folder."""

    name: str
    command: list
    log: str
    timeout_s: int
    files: tuple = ()
    #: (command, limit_s) -> the command to run with that limit, for a step told its time (the sweep).
    fit: Optional[Callable] = None
    outcome: dict = dataclasses.field(default_factory=dict)

    def command_for_limit(self) -> list:
        return self.fit(list(self.command), self.timeout_s) if self.fit else list(self.command)


@dataclasses.dataclass
class Verdict:
    """What a step's reader makes of its run: the fields for the record, one
    line for the table, and whether the step passed."""

    outcome: dict
    summary: str
    ok: bool


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a step's reader may need besides its own run: the log folder (the
    files that come back), the scratch folder, whether this is a rehearsal."""

    log_dir: Path
    scratch: Path
    rehearse: bool


def newest_gpu_check(results_dir=None) -> tuple:
    """(the newest committed ``gpu-tests`` record, whether it was made with the
    kernels sources here), or (None, False) where there is none. The chapters
    that report on GPU verification read it through this one function;
    rehearsal records (CPU emulation) never count."""
    from analysis import records  # noqa: PLC0415

    try:
        found = [record for record in records.read_records(KIND, results_dir=results_dir)
                 if not record.get("rehearsal")]
    except FileNotFoundError:
        return None, False
    if not found:
        return None, False
    record = max(found, key=lambda item: item.get("utc", ""))
    return record, record.get("source_hash") == source_hash()


def gpu_test_files() -> list:
    """The test files that hold gpu-marked tests. Only they are collected, so a
    module whose imports the GPU machine lacks (book tooling, say) can't stop
    the run; relative paths, sorted."""
    return sorted(path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in path.read_text(encoding="utf-8", errors="replace"))


def kernels_folder() -> Path:
    """The folder holding the ``topk_moe`` package (kernels/ in a checkout)."""
    spec = importlib.util.find_spec("topk_moe")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    return REPO_ROOT / "kernels"


def step_environment(rehearse: bool, log_dir: Path, base: Optional[dict] = None) -> dict:
    """The environment of every step: ``base`` (this process's) with the
    repository root and the folder of ``topk_moe`` first on PYTHONPATH, so
    every process a step starts (pytest, the sanitizer's target, ncu's re-run
    of a script) imports ``analysis`` and ``topk_moe``; OUT set to the log
    folder (the sweep copies its records there); unbuffered output. A
    rehearsal puts the stand-ins first on PATH and says so in
    ``MOE_DEVICE_CHECK_REHEARSAL``."""
    environment = dict(os.environ if base is None else base)
    folders = [str(REPO_ROOT), str(kernels_folder())]
    present = [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(folders + present))
    environment["PYTHONUNBUFFERED"] = "1"
    environment["OUT"] = str(log_dir)
    if rehearse:
        environment["PATH"] = os.pathsep.join([str(STANDINS), environment.get("PATH", "")])
        environment["MOE_DEVICE_CHECK_REHEARSAL"] = "1"
    else:
        environment.pop("MOE_DEVICE_CHECK_REHEARSAL", None)
    return environment


def selected_steps(args) -> list:
    """The steps asked for, in STEPS order: ``--steps`` less the ``--skip-*`` ones;
    the sweep only where analysis/measure/sweep.py exists."""
    wanted = STEPS if args.steps is None else tuple(name.strip() for name in args.steps.split(",") if name.strip())
    unknown = [name for name in wanted if name not in STEPS]
    if unknown:
        raise ValueError(f"--steps: expected names from {', '.join(STEPS)}, got {', '.join(unknown)}")
    skipped = {"gpu-tests": args.skip_tests, "memcheck": args.skip_sanitizer, "racecheck": args.skip_sanitizer,
               "traffic-ncu": args.skip_traffic_ncu, "sweep": args.skip_bench}
    have_sweep = importlib.util.find_spec("analysis.measure.sweep") is not None
    return [name for name in STEPS if name in wanted and not skipped[name] and (name != "sweep" or have_sweep)]


def step_limits(args) -> dict:
    return {"gpu-tests": args.tests_timeout, "memcheck": args.memcheck_timeout,
            "racecheck": args.racecheck_timeout, "traffic-ncu": args.traffic_ncu_timeout,
            "sweep": args.sweep_timeout}


def plan_steps(args, log_dir: Path, scratch: Optional[Path] = None) -> list:
    """The steps of this call, each with its command, log, limit and files."""
    scratch = scratch or Path(tempfile.gettempdir())
    python = sys.executable
    limits = step_limits(args)
    names = selected_steps(args)
    only_sweep = names == ["sweep"]
    steps = []
    for name in names:
        if name == "gpu-tests":
            extra = list(REHEARSAL_PYTEST_ARGS) if args.rehearse and not args.pytest_args else []
            steps.append(Step(name, [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                     "--continue-on-collection-errors", f"--junitxml={scratch / 'gpu-tests.xml'}",
                                     *gpu_test_files(), *extra, *shlex.split(args.pytest_args)],
                              "pytest-gpu.log", limits[name]))
        elif name in SANITIZER_TOOLS:
            sanitizer = (str(STANDINS / "compute-sanitizer") if args.rehearse
                         else cuda_tool_path("compute-sanitizer") or "compute-sanitizer")
            smoke = [python, "-m", "topk_moe.cuda.smoke"] + (["--backend", "cuda-emulated"] if args.rehearse else [])
            steps.append(Step(name, [sanitizer, "--tool", name, "--error-exitcode", "1", *smoke],
                              "sanitizer.log", limits[name]))
        elif name == "traffic-ncu":
            steps.append(Step(name, [python, "-m", "analysis.measure.utilisation", *TRAFFIC_NCU_ARGS,
                                     "--out", str(log_dir / "traffic-ncu.json"), "--work-dir", str(scratch / "ncu")],
                              "traffic-ncu.log", limits[name], files=("traffic-ncu.json", f"{NCU_KIND}.jsonl")))
        else:
            limit = args.deadline_s - MARGIN_S if only_sweep else limits[name]
            rehearsal = list(REHEARSAL_SWEEP_ARGS) + ["--results-dir", str(scratch / "results")] \
                if args.rehearse else []
            steps.append(Step(name, [python, "-m", "analysis.measure.sweep", *rehearsal,
                                     *shlex.split(args.sweep_args)],
                              "sweep.log", limit, files=("sweep.jsonl",), fit=sweep_command))
    return steps


def out_files(steps: list, record: bool) -> list:
    """The file names the steps (and the record) leave in the log folder."""
    names = []
    for step in steps:
        for name in (step.log, *step.files):
            if name not in names:
                names.append(name)
    if record:
        names.append(f"{KIND}.jsonl")
    return names


def check_plan(steps: list, deadline_s: int, record: bool) -> None:
    """ValueError unless the limits and MARGIN_S fit the deadline and at most
    OUT_FILE_LIMIT files come back."""
    total = sum(step.timeout_s for step in steps) + MARGIN_S
    if total > deadline_s:
        parts = " + ".join(f"{step.name} {step.timeout_s}" for step in steps)
        raise ValueError(f"the step limits ({parts}) and the {MARGIN_S} s margin add up to {total} s, "
                         f"over the {deadline_s} s deadline: lower a limit or leave a step out")
    files = out_files(steps, record)
    if len(files) > OUT_FILE_LIMIT:
        raise ValueError(f"{len(files)} files would come back ({', '.join(files)}), over the device tool's "
                         f"{OUT_FILE_LIMIT}: let steps share a log")


# ---------------------------------------------------------------- reading the steps' results


def read_test_counts(xml_path: Path, log_path: Path) -> dict:
    """passed / failed / errors / skipped from pytest's JUnit XML, or from the
    summary line of its log when the XML is missing (pytest died early)."""
    if xml_path.exists():
        root = ElementTree.parse(xml_path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        total = {name: sum(int(suite.get(name, 0)) for suite in suites)
                 for name in ("tests", "failures", "errors", "skipped")}
        return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
                "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}
    text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
    count = lambda word: sum(int(n) for n in re.findall(rf"(\d+) {word}", text))  # noqa: E731
    return {"passed": count("passed"), "failed": count("failed"), "errors": count("errors?"),
            "skipped": count("skipped")}


#: memcheck (and initcheck, synccheck) end with this line ...
_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
#: ... racecheck with this one, and without an ERROR SUMMARY when it is clean.
_RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")


def sanitizer_verdict(returncode: int, text: str) -> str:
    """"clean", "<n> errors", "<n> warnings", "timed out", "not run (...)" or
    "failed (exit n)", from compute-sanitizer's exit status and its output (a
    log's text, or a Path to it)."""
    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8", errors="replace") if text.exists() else ""
    if returncode == NOT_FOUND:
        return "not run (compute-sanitizer missing)"
    if returncode == TIMED_OUT:
        return "timed out"
    errors = [int(n) for n in _ERROR_SUMMARY.findall(text)]
    races = [tuple(map(int, found)) for found in _RACECHECK_SUMMARY.findall(text)]
    # a racecheck that found hazards may print both lines: the larger count, not their sum
    error_count = max(sum(errors), sum(race[1] for race in races))
    warning_count = sum(race[2] for race in races)
    if error_count > 0:
        return f"{error_count} errors"
    if warning_count > 0:
        return f"{warning_count} warnings"
    if returncode == 0 and (errors or races):
        return "clean"
    return f"failed (exit {returncode})"


def read_gpu_tests(step: Step, returncode: int, text: str, context: RunContext) -> Verdict:
    counts = read_test_counts(context.scratch / "gpu-tests.xml", context.log_dir / step.log)
    counts["returncode"] = returncode
    summary = "{passed} passed, {failed} failed, {errors} errors, {skipped} skipped".format(**counts)
    if returncode == TIMED_OUT:
        summary += f" (stopped at its {step.timeout_s} s limit)"
    ok = counts["failed"] == 0 and counts["errors"] == 0 and counts["passed"] > 0 and returncode == 0
    return Verdict(counts, summary, ok)


def read_sanitizer(step: Step, returncode: int, text: str, context: RunContext) -> Verdict:
    verdict = sanitizer_verdict(returncode, text)
    smoke = re.search(r"smoke: (\d+) failed", text)
    summary = verdict + (f"; smoke checks: {smoke.group(1)} failed" if smoke else "")
    if context.rehearse:
        summary += " (stand-in: checks nothing)"
    return Verdict({"verdict": verdict, "returncode": returncode}, summary, verdict == "clean")


def read_traffic_ncu(step: Step, returncode: int, text: str, context: RunContext) -> Verdict:
    from analysis.measure import utilisation  # noqa: PLC0415

    rows = []
    path = context.log_dir / "traffic-ncu.json"
    if path.is_file():
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            rows = []
    measured = [row for row in rows if row.get("message") is None]
    messages = sorted({row["message"] for row in rows if row.get("message")})
    outcome = {"returncode": returncode, "kernels_measured": len(measured), "messages": messages}
    if returncode == 0 and measured:
        return Verdict(outcome, f"{len(measured)} kernel ranges measured", True)
    why = messages[0] if messages else f"exit {returncode}"
    if returncode == TIMED_OUT:
        why = f"stopped at its {step.timeout_s} s limit"
    if context.rehearse and returncode == utilisation.EXIT_TOOLS_MISSING:  # the expected end on a CPU
        return Verdict(outcome, f"not measured, as expected without a GPU: {why}", True)
    return Verdict(outcome, f"not measured (exit {returncode}): {why}", False)


def read_exit_status(step: Step, returncode: int, text: str, context: RunContext) -> Verdict:
    summary = "ok" if returncode == 0 else (f"stopped at its {step.timeout_s} s limit" if returncode == TIMED_OUT
                                            else f"exit {returncode}")
    return Verdict({"returncode": returncode}, summary, returncode == 0)


#: How each step's result is read: reader(step, returncode, the text of its
#: part of the log, RunContext) -> Verdict. A new step adds its reader here.
READERS: dict = {"gpu-tests": read_gpu_tests, "memcheck": read_sanitizer, "racecheck": read_sanitizer,
                 "traffic-ncu": read_traffic_ncu, "sweep": read_exit_status}


def _print_table(rows: list, title: Optional[str] = None) -> None:
    width = max(len(name) for name, _ in rows)
    print()
    if title:
        print(title)
    print("step".ljust(width) + "  result")
    for name, result in rows:
        print(name.ljust(width) + "  " + result)


# ---------------------------------------------------------------- the run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.measure.device_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would run and the source hash; run nothing")
    parser.add_argument("--rehearse", action="store_true",
                        help="run every step on this CPU: cuda-emulated for the GPU, stand-ins for "
                             "compute-sanitizer and ncu, records in a temporary folder")
    parser.add_argument("--steps", default=None, help=f"comma-separated steps to run (default: all of {','.join(STEPS)})")
    parser.add_argument("--out", default=None, help="folder for logs (default: $OUT, else a temporary folder)")
    parser.add_argument("--results-dir", default=None, help="results root (default: $MOE_RESULTS_DIR or results/)")
    parser.add_argument("--commit", default=None, help="the commit to record where there is no git ($MOE_GIT_COMMIT)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string")
    parser.add_argument("--sweep-args", default="", help="arguments for python -m analysis.measure.sweep, one string")
    parser.add_argument("--skip-sanitizer", action="store_true")
    parser.add_argument("--skip-tests", action="store_true", help="no pytest and no gpu-tests record")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-traffic-ncu", action="store_true", help="no Nsight Compute memory counters")
    parser.add_argument("--deadline-s", type=int, default=DEFAULT_DEADLINE_S, help="time for all the steps together")
    parser.add_argument("--tests-timeout", type=int, default=DEFAULT_LIMITS_S["gpu-tests"])
    parser.add_argument("--memcheck-timeout", type=int, default=DEFAULT_LIMITS_S["memcheck"])
    parser.add_argument("--racecheck-timeout", type=int, default=DEFAULT_LIMITS_S["racecheck"])
    parser.add_argument("--traffic-ncu-timeout", type=int, default=DEFAULT_LIMITS_S["traffic-ncu"])
    parser.add_argument("--sweep-timeout", type=int, default=DEFAULT_LIMITS_S["sweep"],
                        help="the sweep's reserved share; it also gets what earlier steps leave unused")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rehearse = args.rehearse
    out = args.out or os.environ.get("OUT")
    log_dir = Path(out) if out else None
    digest = source_hash()
    try:
        steps = plan_steps(args, log_dir or Path("<a temporary folder>"), Path("<scratch>"))
        record_wanted = any(step.name == "gpu-tests" for step in steps)
        check_plan(steps, args.deadline_s, record_wanted)
    except ValueError as error:
        print(f"device_check: {error}")
        return 2

    if args.dry_run:
        print(f"source_hash {digest}")
        print(f"logs to {log_dir or 'a temporary folder'} ({len(out_files(steps, record_wanted))} files: "
              f"{', '.join(out_files(steps, record_wanted))}); a {KIND!r} record to "
              f"{args.results_dir or os.environ.get('MOE_RESULTS_DIR') or REPO_ROOT / 'results'}/<device>/{KIND}.jsonl")
        for step in steps:
            print(f"would run [{step.name}, {step.timeout_s} s, log {step.log}]: {shlex.join(step.command_for_limit())}")
        if "racecheck" in {step.name for step in steps}:
            print("beside them, in what the deadline leaves: the emulated racecheck of every kernel "
                  "(python -m topk_moe.cuda.emulator.racecheck_cases; CPU emulation), compared with racecheck's verdict")
        print(f"limits {sum(step.timeout_s for step in steps)} s + margin {MARGIN_S} s "
              f"within the {args.deadline_s} s deadline")
        if importlib.util.find_spec("analysis.measure.sweep") is None:
            print("no analysis/measure/sweep.py here: the benchmark step is left out")
        return 0

    if rehearse:
        from topk_moe.backends import emulator_unavailable_reason  # noqa: PLC0415

        reason = emulator_unavailable_reason()
        if reason is not None:
            print(f"device_check --rehearse: the CUDA emulator can't run here: {reason}")
            return 2
    else:
        from topk_moe.backends import cuda_unavailable_reason  # noqa: PLC0415 - imports CuPy where present

        reason = cuda_unavailable_reason()
        if reason is not None:
            print(f"device_check: no usable GPU here: {reason}")
            return 2
    if args.commit:
        os.environ["MOE_GIT_COMMIT"] = args.commit
    scratch = Path(tempfile.mkdtemp(prefix="device-check-rehearsal-" if rehearse else "device-check-scratch-"))
    if log_dir is None:
        log_dir = scratch / "out"
    log_dir.mkdir(parents=True, exist_ok=True)
    results_dir = scratch / "results" if rehearse else args.results_dir
    steps = plan_steps(args, log_dir, scratch)
    environment = step_environment(rehearse, log_dir)
    if rehearse:
        print(f"[device_check] {REHEARSAL_LABEL}; records and scratch in {scratch}", flush=True)

    started = time.monotonic()
    emulated = start_emulated_racecheck(scratch, environment) if "racecheck" in {s.name for s in steps} else None
    table, passed = run_steps(steps, args, log_dir, scratch, environment)
    by_name = {step.name: step.outcome for step in steps}
    emulated_outcome = None
    if emulated is not None:
        left_s = args.deadline_s - MARGIN_S - (time.monotonic() - started)
        emulated_outcome = finish_emulated_racecheck(emulated, scratch, left_s)
        emulated_outcome["agreement"] = racecheck_agreement(by_name["racecheck"].get("verdict", "not run"),
                                                             emulated_outcome)
        table.append(("emulated racecheck", f"{emulated_outcome['summary']}; {emulated_outcome['agreement']}"))

    if "gpu-tests" in by_name:
        path = write_record(args, steps, table, digest, log_dir, results_dir, rehearse, emulated_outcome)
        table.append(("record", str(path)))
    if "traffic-ncu" in by_name and not rehearse:
        path = write_ncu_records(log_dir, results_dir, digest)
        if path is not None:
            table.append((NCU_KIND, str(path)))
    files = sorted(p.name for p in log_dir.iterdir())
    files_ok = len(files) <= OUT_FILE_LIMIT and all(p.is_file() for p in log_dir.iterdir())
    table.append(("files", f"{len(files)} in {log_dir}" + ("" if files_ok else f": over {OUT_FILE_LIMIT}, "
                                                                               f"{', '.join(files)}")))
    table.append(("source_hash", digest[:16] + "..."))
    _print_table(table, REHEARSAL_LABEL if rehearse else None)
    return 0 if passed and files_ok else 1


def run_steps(steps: list, args, log_dir: Path, scratch: Path, environment: dict) -> tuple:
    """Run each step inside the deadline; ([(name, summary)], all passed)."""
    table, passed = [], True
    context = RunContext(log_dir, scratch, args.rehearse)
    started = time.monotonic()
    for index, step in enumerate(steps):
        reserved_later = sum(later.timeout_s for later in steps[index + 1:])
        available = int(args.deadline_s - MARGIN_S - (time.monotonic() - started) - reserved_later)
        if step.name == "sweep":  # its reserved share, and whatever the steps before it left unused
            step.timeout_s = available
        else:
            step.timeout_s = min(step.timeout_s, available)
        if step.timeout_s < 10:
            step.outcome = {"returncode": None, "verdict": "not run (deadline)"}
            table.append((step.name, "not run: the deadline was reached"))
            passed = False
            continue
        command = step.command_for_limit()
        print(f"[device_check] {step.name} (at most {step.timeout_s} s): {shlex.join(command)}", flush=True)
        log_path = log_dir / step.log
        start_of_part = log_path.stat().st_size if log_path.exists() else 0
        shared = any(other.log == step.log for other in steps[:index])
        step_started = time.monotonic()
        returncode = run_logged(command, log_path, timeout_s=step.timeout_s, env=environment, cwd=REPO_ROOT,
                                append=shared)
        seconds = round(time.monotonic() - step_started, 1)
        with open(log_path, encoding="utf-8", errors="replace") as log:
            log.seek(start_of_part if shared else 0)
            text = log.read()
        if text.startswith("$ "):  # the command line run_logged wrote first is not the tool's output
            text = text.partition("\n")[2]
        reader: Callable = READERS.get(step.name, read_exit_status)
        verdict = reader(step, returncode, text, context)
        step.outcome = {**verdict.outcome, "seconds": seconds, "limit_s": step.timeout_s}
        table.append((step.name, f"{verdict.summary} [{seconds:.0f} s]"))
        passed = passed and verdict.ok
    return table, passed


def sweep_command(command: list, limit_s: int) -> list:
    """The sweep told its budget (start no cell in the last SWEEP_WIND_DOWN_S),
    and without its utilisation block where the limit is too short for it
    (SWEEP_UTILISATION_S): that block runs before the sweep first checks its
    budget, so it could outlast the limit before any record is written."""
    if "--budget-s" not in command:
        command += ["--budget-s", str(max(10, limit_s - SWEEP_WIND_DOWN_S))]
    if limit_s < SWEEP_UTILISATION_S and "--no-utilisation" not in command:
        command.append("--no-utilisation")
    return command


def start_emulated_racecheck(scratch: Path, environment: dict):
    """Start the emulated racecheck of every kernel beside the GPU steps (CPU only)."""
    # nice: on the GPU machine its compiles must not slow the GPU steps' host side
    command = ["nice", "-n", "10", sys.executable, "-m", "topk_moe.cuda.emulator.racecheck_cases",
               "--json", str(scratch / "emulated-racecheck.json")]
    print(f"[device_check] emulated racecheck, beside the other steps: {shlex.join(command)}", flush=True)
    return start_logged(command, scratch / "emulated-racecheck.log", env=environment, cwd=REPO_ROOT)


def finish_emulated_racecheck(started, scratch: Path, left_s: float) -> dict:
    """Wait for the emulated racecheck at most ``left_s`` more (5 s at least) and read
    its summary: kernels run, hazards (all, and those on shared memory), cases that
    did not run, seconds, and one line for the table."""
    returncode = wait_logged(started, timeout_s=max(left_s, 5.0))
    path = scratch / "emulated-racecheck.json"
    outcome = {"returncode": returncode, "backend": "CPU emulation"}
    if not path.is_file():
        why = {TIMED_OUT: "did not finish in the time left", NOT_FOUND: "could not start"}.get(
            returncode, f"ended without a summary (exit {returncode})")
        log = started.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        outcome.update({"state": why, "summary": f"not run: {why}", "log_tail": log[-5:]})
        return outcome
    summary = json.loads(path.read_text(encoding="utf-8"))
    shared = [hazard for hazard in summary["hazards"] if "race on shared memory" in hazard]
    outcome.update({"state": "done", "kernels_run": len(summary["kernels_run"]), "launches": summary["launches"],
                    "hazards": len(summary["hazards"]), "shared_hazards": len(shared),
                    "hazard_reports": summary["hazards"][:20], "failed": summary["failed"],
                    "seconds": summary["seconds"]})
    outcome["summary"] = (f"{outcome['kernels_run']} kernels, {outcome['hazards']} hazards "
                          f"({outcome['shared_hazards']} on shared memory)"
                          + (f", {len(summary['failed'])} cases did not run" if summary["failed"] else "")
                          + " (CPU emulation)")
    return outcome


def racecheck_agreement(sanitizer: str, emulated: dict) -> str:
    """Whether compute-sanitizer's racecheck (its verdict, ``sanitizer_verdict``) and
    the emulated one agree on shared memory, in words. They run different launches
    (the smoke script on the GPU; every kernel at small shapes in emulation), so a
    disagreement names which side found what, for a person to look at."""
    if emulated.get("state") != "done":
        return f"not compared: the emulated racecheck {emulated.get('state', 'did not run')}"
    found_on_gpu = sanitizer.endswith(("errors", "warnings"))
    if sanitizer != "clean" and not found_on_gpu:
        return f"not compared: compute-sanitizer's racecheck {sanitizer}"
    found_emulated = emulated["shared_hazards"] > 0
    if found_on_gpu == found_emulated:
        return ("agree: both found shared-memory hazards" if found_on_gpu
                else "agree: no shared-memory hazard in either")
    if found_emulated:
        return (f"disagree: the emulator found {emulated['shared_hazards']} shared-memory hazards, "
                f"compute-sanitizer none")
    return f"disagree: compute-sanitizer's racecheck found {sanitizer}, the emulator no shared-memory hazard"


def write_record(args, steps: list, table: list, digest: str, log_dir: Path, results_dir, rehearse: bool,
                 emulated_racecheck: Optional[dict] = None) -> Path:
    """Append the gpu-tests record; copy its line to the log folder."""
    from analysis.records import write_records  # noqa: PLC0415

    by_name = {step.name: step.outcome for step in steps}
    tests = by_name["gpu-tests"]
    record = {
        "params": {"pytest_args": args.pytest_args, "sanitizer_tools": [t for t in SANITIZER_TOOLS if t in by_name],
                   "sweep": "sweep" in by_name, "sweep_args": args.sweep_args, "deadline_s": args.deadline_s,
                   "limits_s": {step.name: step.timeout_s for step in steps}},
        "passed": tests["passed"], "failed": tests["failed"], "errors": tests["errors"],
        "skipped": tests["skipped"],
        **{tool: by_name[tool]["verdict"] for tool in SANITIZER_TOOLS if tool in by_name},
        "traffic_ncu": by_name.get("traffic-ncu"),
        "emulated_racecheck": emulated_racecheck,
        "racecheck_agreement": emulated_racecheck["agreement"] if emulated_racecheck else None,
        "seconds": {step.name: step.outcome.get("seconds") for step in steps},
        "sweep_exit": by_name["sweep"]["returncode"] if "sweep" in by_name else None,
        "table": [list(row) for row in table],
        "source_hash": digest,
        "rehearsal": rehearse,
        "backend": "cuda-emulated" if rehearse else "cuda",
    }
    if rehearse:
        record["note"] = REHEARSAL_LABEL
    path = write_records(KIND, [record], device_kind="cpu" if rehearse else "gpu", results_dir=results_dir)
    last_line = path.read_text(encoding="utf-8").splitlines()[-1]
    (log_dir / f"{KIND}.jsonl").write_text(last_line + "\n", encoding="utf-8")
    return path


def ncu_records(rows: list, digest: str) -> list:
    """The traffic-ncu step's measured rows (``utilisation``'s, one per (k, kernel)
    range) as ``gpu-ncu`` records: the shape in ``params`` as the sweep names it
    (preset, tokens, dtype, top_k), the Nsight Compute fields as measured; rows
    that carry a message (nothing measured) are left out."""
    shape = {"preset": TRAFFIC_NCU_SHAPE["preset"], "tokens": TRAFFIC_NCU_SHAPE["tokens"],
             "dtype": TRAFFIC_NCU_SHAPE["dtype"], "skew": "uniform"}
    out = []
    for row in rows:
        if row.get("message") is not None or row.get("kernel") is None:
            continue
        fields = {key: value for key, value in row.items() if key != "top_k"}
        out.append({"measurement": "ncu", "step": "traffic-ncu", "source_hash": digest, **fields,
                    "params": dict(shape, top_k=row.get("top_k"))})
    return out


def write_ncu_records(log_dir: Path, results_dir, digest: str) -> Optional[Path]:
    """Append the ``gpu-ncu`` records of ``traffic-ncu.json`` and copy their lines
    to the log folder; None (and no file) when no kernel was measured."""
    from analysis.records import write_records  # noqa: PLC0415

    path = log_dir / "traffic-ncu.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    except ValueError:
        rows = []
    found = ncu_records(rows if isinstance(rows, list) else [], digest)
    if not found:
        return None
    written = write_records(NCU_KIND, found, device_kind="gpu", results_dir=results_dir)
    lines = written.read_text(encoding="utf-8").splitlines()[-len(found):]
    (log_dir / f"{NCU_KIND}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written


if __name__ == "__main__":
    sys.exit(main())
