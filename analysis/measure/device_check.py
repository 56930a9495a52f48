"""The checks that need a GPU, in one command, with one record of the outcome.

    python -m analysis.measure.device_check            (make device-check PY=python3)
    python -m analysis.measure.device_check --dry-run  (prints the plan and the source hash)

On a machine with a CUDA device it runs, in order:

1. ``pytest -m gpu`` over the test files that hold gpu-marked tests (the CUDA
   backend against the reference), read from its JUnit XML: passed, failed,
   errors, skipped;
2. compute-sanitizer's memcheck and racecheck on ``python -m topk_moe.cuda.smoke``;
3. Nsight Compute's memory counters (global requests and sectors, shared
   wavefronts and bank conflicts, DRAM bytes; ``analysis.measure.utilisation``)
   for every kernel of one layer at the shape whose requests the CPU emulator
   counts (``analysis.measure.traffic``: preset "cpu", T = 256, k = 1 and 2,
   float16), into ``traffic-ncu.json``, so the first GPU run compares measured
   and emulated counts side by side;
4. the benchmark sweep, ``python -m analysis.measure.sweep``, only where that module exists;

Each step gets at most the time left of ``--deadline-s`` (default 540 s, so
one call fits the device tool's 10-minute limit with room to copy results
back); the sweep is told to start no new cell once its share is nearly
spent. ``--skip-tests --skip-sanitizer`` reruns the sweep alone in a second
call.

Unless the tests were skipped, it then appends a record of kind ``gpu-tests`` to ``results/<device>/gpu-tests.jsonl``
(through ``analysis.records.write_records``, which adds the device, the UTC
time, the commit from git or ``$MOE_GIT_COMMIT``, and the versions) carrying
the counts, each sanitizer's verdict and ``source_hash``, the hash of the
``kernels`` sources (``topk_moe.cuda.build_report.source_hash``) that names the
code even where there is no git checkout. Logs, the XML and the record go to
``$OUT`` when it is set (else ``--out``, else a temporary folder): at most
eight flat files. A short table is printed last. Exit status: 0 when every
test passed and both sanitizers were clean, 1 otherwise, 2 when there is no
usable GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from topk_moe.cuda.build_report import REPO_ROOT, cuda_tool_path, source_hash

KIND = "gpu-tests"
#: The shape of the committed emulated traffic counts (analysis.measure.traffic).
TRAFFIC_NCU_ARGS = ("--preset", "cpu", "--tokens", "256", "--k", "1", "2", "--dtype", "float16")
SANITIZER_TOOLS = ("memcheck", "racecheck")


@dataclass
class Step:
    name: str
    command: list
    log: str
    timeout_s: int
    outcome: dict = field(default_factory=dict)


def newest_gpu_check(results_dir=None) -> tuple:
    """(the newest committed ``gpu-tests`` record, whether it was made with the
    kernels sources here), or (None, False) where there is none. The chapters
    that report on GPU verification read it through this one function."""
    from analysis import records  # noqa: PLC0415

    try:
        found = records.read_records(KIND, results_dir=results_dir)
    except FileNotFoundError:
        return None, False
    record = max(found, key=lambda item: item.get("utc", ""))
    return record, record.get("source_hash") == source_hash()


def gpu_test_files() -> list:
    """The test files that hold gpu-marked tests. Only they are collected, so a
    module whose imports the GPU machine lacks (book tooling, say) can't stop
    the run; relative paths, sorted."""
    return sorted(path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in path.read_text(encoding="utf-8", errors="replace"))


#: Seconds the sweep keeps after its last new cell starts: the cell in flight,
#: the summary tables and the records.
SWEEP_WIND_DOWN_S = 90


def plan_steps(args, log_dir: Path) -> list:
    python = sys.executable
    steps = []
    if not args.skip_tests:
        steps.append(Step(
            "gpu-tests",
            [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
             f"--junitxml={log_dir / 'gpu-tests.xml'}", *gpu_test_files(), *shlex.split(args.pytest_args)],
            "pytest-gpu.log", args.tests_timeout,
        ))
    if not args.skip_sanitizer:
        sanitizer = cuda_tool_path("compute-sanitizer") or "compute-sanitizer"
        for tool in SANITIZER_TOOLS:
            steps.append(Step(
                tool,
                [sanitizer, "--tool", tool, "--error-exitcode", "1", python, "-m", "topk_moe.cuda.smoke"],
                f"{tool}.log", args.sanitizer_timeout,
            ))
    if not args.skip_traffic_ncu:
        steps.append(Step(
            "traffic-ncu",
            [python, "-m", "analysis.measure.utilisation", *TRAFFIC_NCU_ARGS, "--out",
             str(log_dir / "traffic-ncu.json")],
            "traffic-ncu.log", args.traffic_ncu_timeout,
        ))
    if not args.skip_bench and importlib.util.find_spec("analysis.measure.sweep") is not None:
        steps.append(Step("sweep", [python, "-m", "analysis.measure.sweep", *shlex.split(args.sweep_args)],
                          "sweep.log", args.sweep_timeout))
    return steps


def _run(step: Step, log_dir: Path) -> int:
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_dir / step.log, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(step.command) + "\n")
        log.flush()
        try:
            done = subprocess.run(step.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                  env=environment, timeout=step.timeout_s)
            return done.returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[device_check] stopped after {step.timeout_s} s\n")
            return 124
        except FileNotFoundError as error:
            log.write(f"\n[device_check] cannot run: {error}\n")
            return 127


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


def sanitizer_verdict(returncode: int, log_path: Path) -> str:
    text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
    summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
    if returncode == 127:
        return "not run (compute-sanitizer missing)"
    if returncode == 124:
        return "timed out"
    if returncode == 0 and summary and int(summary.group(1)) == 0:
        return "clean"
    if summary and int(summary.group(1)) > 0:
        return f"{summary.group(1)} errors"
    return f"failed (exit {returncode})"


def _print_table(rows: list) -> None:
    width = max(len(name) for name, _ in rows)
    print("\n" + "step".ljust(width) + "  result")
    for name, result in rows:
        print(name.ljust(width) + "  " + result)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.measure.device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would run and the source hash; run nothing")
    parser.add_argument("--out", default=None, help="folder for logs (default: $OUT, else a temporary folder)")
    parser.add_argument("--results-dir", default=None, help="results root (default: $MOE_RESULTS_DIR or results/)")
    parser.add_argument("--commit", default=None, help="the commit to record where there is no git ($MOE_GIT_COMMIT)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string")
    parser.add_argument("--sweep-args", default="", help="arguments for python -m analysis.measure.sweep, one string")
    parser.add_argument("--skip-sanitizer", action="store_true")
    parser.add_argument("--skip-tests", action="store_true", help="no pytest and no gpu-tests record")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-traffic-ncu", action="store_true", help="no Nsight Compute memory counters")
    parser.add_argument("--traffic-ncu-timeout", type=int, default=120)
    parser.add_argument("--deadline-s", type=int, default=540, help="time for all the steps together")
    parser.add_argument("--tests-timeout", type=int, default=300)
    parser.add_argument("--sanitizer-timeout", type=int, default=60)
    parser.add_argument("--sweep-timeout", type=int, default=420)
    args = parser.parse_args(argv)

    out = args.out or os.environ.get("OUT")
    log_dir = Path(out) if out else None
    digest = source_hash()
    steps = plan_steps(args, log_dir or Path("<a temporary folder>"))

    if args.dry_run:
        print(f"source_hash {digest}")
        print(f"logs to {log_dir or 'a temporary folder'}; a {KIND!r} record to "
              f"{args.results_dir or os.environ.get('MOE_RESULTS_DIR') or REPO_ROOT / 'results'}/<device>/{KIND}.jsonl")
        for step in steps:
            print(f"would run [{step.name}, {step.timeout_s} s, log {step.log}]: {shlex.join(step.command)}")
        if importlib.util.find_spec("analysis.measure.sweep") is None:
            print("no analysis/measure/sweep.py here: the benchmark step is left out")
        return 0

    from topk_moe.backends import cuda_unavailable_reason  # noqa: PLC0415 - imports CuPy where present

    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"device_check: no usable GPU here: {reason}")
        return 2
    if args.commit:
        os.environ["MOE_GIT_COMMIT"] = args.commit
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="device-check-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    steps = plan_steps(args, log_dir)

    table = []
    started = time.monotonic()
    for step in steps:
        remaining = int(args.deadline_s - (time.monotonic() - started))
        if remaining < 20:
            step.outcome = {"returncode": None, "verdict": "not run (deadline)", "passed": 0, "failed": 0,
                            "errors": 0, "skipped": 0}
            table.append((step.name, "not run: the deadline was reached"))
            continue
        step.timeout_s = min(step.timeout_s, remaining)
        if step.name == "sweep" and "--budget-s" not in step.command:
            step.command += ["--budget-s", str(max(30, step.timeout_s - SWEEP_WIND_DOWN_S))]
        print(f"[device_check] {step.name} (at most {step.timeout_s} s): {shlex.join(step.command)}", flush=True)
        returncode = _run(step, log_dir)
        if step.name == "gpu-tests":
            step.outcome = read_test_counts(log_dir / "gpu-tests.xml", log_dir / step.log)
            step.outcome["returncode"] = returncode
            table.append((step.name, "{passed} passed, {failed} failed, {errors} errors, {skipped} skipped"
                          .format(**step.outcome)))
        elif step.name in SANITIZER_TOOLS:
            step.outcome = {"verdict": sanitizer_verdict(returncode, log_dir / step.log)}
            table.append((step.name, step.outcome["verdict"]))
        else:
            step.outcome = {"returncode": returncode}
            table.append((step.name, "ok" if returncode == 0 else f"exit {returncode}"))

    by_name = {step.name: step.outcome for step in steps}
    clean = all(by_name[tool]["verdict"] == "clean" for tool in SANITIZER_TOOLS if tool in by_name)
    if "gpu-tests" not in by_name:  # a sweep-only call: no test outcome to record
        _print_table(table)
        return 0 if clean and all(o.get("returncode") in (0, None) for o in by_name.values()
                                  if "returncode" in o) else 1
    tests = by_name["gpu-tests"]
    record = {
        "params": {"pytest_args": args.pytest_args, "sanitizer_tools": [] if args.skip_sanitizer else
                   list(SANITIZER_TOOLS), "sweep": "sweep" in by_name, "sweep_args": args.sweep_args},
        "passed": tests["passed"], "failed": tests["failed"], "errors": tests["errors"],
        "skipped": tests["skipped"],
        **{tool: by_name[tool]["verdict"] for tool in SANITIZER_TOOLS if tool in by_name},
        "sweep_exit": by_name["sweep"]["returncode"] if "sweep" in by_name else None,
        "source_hash": digest,
    }
    from analysis.records import write_records  # noqa: PLC0415

    path = write_records(KIND, [record], device_kind="gpu", results_dir=args.results_dir)
    last_line = path.read_text(encoding="utf-8").splitlines()[-1]
    (log_dir / f"{KIND}.jsonl").write_text(last_line + "\n", encoding="utf-8")
    table.append(("record", str(path)))
    table.append(("source_hash", digest[:16] + "..."))
    (log_dir / "summary.txt").write_text("\n".join(f"{name}\t{result}" for name, result in table) + "\n",
                                         encoding="utf-8")
    _print_table(table)
    return 0 if tests["failed"] == 0 and tests["errors"] == 0 and tests["passed"] > 0 and clean else 1


if __name__ == "__main__":
    sys.exit(main())
