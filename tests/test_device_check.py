"""`make device-check` without a GPU: the plan (limits within the deadline, at
most 8 files back, the sweep alone in a second call), each step's reading of
the real tools' output formats, the process-group timeout, the environment
every step's processes inherit, the record, and the rehearsal
(`make device-check DRY=1`: cuda-emulated and stand-in tools; CPU emulation,
never a GPU result). Moved here from tests/test_cuda_build.py, with the
tests of issue 26's fixes."""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import symtable
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from analysis.measure import device_check, processes
from topk_moe.cuda import build_report

REPO_ROOT = Path(__file__).resolve().parent.parent


def _args(*argv):
    return device_check.build_parser().parse_args(list(argv))


# ---------------------------------------------------------------- the plan


def test_device_check_dry_run_prints_the_plan_and_the_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    output = io.StringIO()
    with redirect_stdout(output):
        code = device_check.main(["--dry-run", "--results-dir", str(tmp_path / "results")])
    text = output.getvalue()
    assert code == 0
    assert build_report.source_hash() in text
    for step in ("pytest", "-m gpu", "tests/test_cuda.py", "memcheck", "racecheck", "topk_moe.cuda.smoke",
                 "gpu-tests", "traffic-ncu", "within the 540 s deadline"):
        assert step in text, step
    assert not (tmp_path / "results").exists(), "a dry run writes no records"
    assert not (tmp_path / "out").exists(), "a dry run writes no logs"


def test_device_check_dry_run_as_a_module():
    done = subprocess.run([sys.executable, "-m", "analysis.measure.device_check", "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "source_hash" in done.stdout and "'cupy'" not in done.stderr


def test_the_default_plan_fits_the_deadline_and_the_files_that_come_back():
    """Issue 26, item 10: the limits added up to 960 s against 540, and 10 files
    came back where the device tool returns 8."""
    args = _args()
    steps = device_check.plan_steps(args, Path("/out"))
    assert [step.name for step in steps] == list(device_check.STEPS)
    total = sum(step.timeout_s for step in steps)
    assert total + device_check.MARGIN_S <= args.deadline_s and total < args.deadline_s
    device_check.check_plan(steps, args.deadline_s, record=True)
    files = device_check.out_files(steps, record=True)
    assert len(files) <= device_check.OUT_FILE_LIMIT
    assert "gpu-tests.xml" not in files, "pytest's XML is scratch, not one of the files that come back"
    sweep = steps[-1]
    assert sweep.timeout_s == device_check.DEFAULT_LIMITS_S["sweep"]  # its share, reserved


def test_the_sweep_is_told_its_budget_and_skips_what_does_not_fit():
    """The sweep profiles (150 s limit) before it first checks its budget: with
    its share it runs without that block, which a second call can give it."""
    short = device_check.sweep_command(["python", "-m", "analysis.measure.sweep"], 180)
    assert short[-3:] == ["--budget-s", str(180 - device_check.SWEEP_WIND_DOWN_S), "--no-utilisation"]
    long = device_check.sweep_command(["python", "-m", "analysis.measure.sweep"], 525)
    assert "--no-utilisation" not in long and long[-2:] == ["--budget-s", "435"]


def test_a_second_call_reruns_the_sweep_alone_with_the_whole_deadline():
    args = _args("--steps", "sweep")
    (sweep,) = device_check.plan_steps(args, Path("/out"))
    assert sweep.name == "sweep" and sweep.timeout_s == args.deadline_s - device_check.MARGIN_S
    assert "--no-utilisation" not in sweep.command_for_limit()
    device_check.check_plan([sweep], args.deadline_s, record=False)
    assert device_check.out_files([sweep], record=False) == ["sweep.log", "sweep.jsonl"]


def test_a_plan_over_the_deadline_is_refused_before_anything_runs(tmp_path):
    output = io.StringIO()
    with redirect_stdout(output):
        code = device_check.main(["--tests-timeout", "400", "--out", str(tmp_path / "out")])
    assert code == 2 and "over the 540 s deadline" in output.getvalue()
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="files would come back"):
        many = [device_check.Step(f"s{i}", ["true"], f"log{i}", 1) for i in range(8)]
        device_check.check_plan(many, 540, record=True)
    with pytest.raises(ValueError, match="--steps"):
        device_check.plan_steps(_args("--steps", "gpu-tests,nonsense"), Path("/out"))


# ---------------------------------------------------------------- reading the tools' output


#: compute-sanitizer's summaries as the tools print them.
CLEAN_MEMCHECK = "========= COMPUTE-SANITIZER\nsmoke: 0 failed\n========= ERROR SUMMARY: 0 errors\n"
CLEAN_RACECHECK = ("========= COMPUTE-SANITIZER\nsmoke: 0 failed\n"
                   "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")


def test_a_clean_racecheck_is_clean():
    """Issue 26, item 4: a clean racecheck prints no ERROR SUMMARY, only its own
    RACECHECK SUMMARY; it was read as "failed (exit 0)"."""
    assert device_check.sanitizer_verdict(0, CLEAN_RACECHECK) == "clean"
    assert device_check.sanitizer_verdict(0, CLEAN_MEMCHECK) == "clean"


def test_sanitizer_findings_and_failures_are_named():
    hazards = ("========= Error: Race reported between Write access at expert_mlp_v3_hidden_f16+0x1a0\n"
               "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n")
    assert device_check.sanitizer_verdict(1, hazards) == "1 errors"
    warnings = "========= RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)\n"
    assert device_check.sanitizer_verdict(0, warnings) == "2 warnings"
    both = hazards + "========= ERROR SUMMARY: 1 error\n"  # one finding, counted once
    assert device_check.sanitizer_verdict(1, both) == "1 errors"
    assert device_check.sanitizer_verdict(1, "========= ERROR SUMMARY: 4 errors\n") == "4 errors"
    assert device_check.sanitizer_verdict(0, "no summary at all\n") == "failed (exit 0)"
    assert device_check.sanitizer_verdict(processes.TIMED_OUT, CLEAN_MEMCHECK) == "timed out"
    assert device_check.sanitizer_verdict(processes.NOT_FOUND, "").startswith("not run")


def test_the_stand_in_sanitizer_prints_the_real_formats(tmp_path):
    standin = str(device_check.STANDINS / "compute-sanitizer")
    for tool, expected in (("memcheck", "ERROR SUMMARY: 0 errors"),
                           ("racecheck", "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)")):
        done = subprocess.run([standin, "--tool", tool, "--error-exitcode", "1", sys.executable, "-c", "print(7)"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and expected in done.stdout and "7" in done.stdout
        assert device_check.sanitizer_verdict(done.returncode, done.stdout) == "clean"
    failing = subprocess.run([standin, "--tool", "racecheck", "--error-exitcode", "1", sys.executable, "-c", "0"],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ, STANDIN_SANITIZER_ERRORS="2"))
    assert failing.returncode == 1 and device_check.sanitizer_verdict(1, failing.stdout) == "2 errors"


def test_read_test_counts_falls_back_to_the_summary_line(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text("...\n== 3 failed, 120 passed, 5 skipped, 1 error in 80.0s ==\n")
    counts = device_check.read_test_counts(tmp_path / "missing.xml", log)
    assert counts == {"passed": 120, "failed": 3, "errors": 1, "skipped": 5}


# ---------------------------------------------------------------- processes and environment


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_a_timeout_stops_the_whole_process_group(tmp_path):
    """Issue 26, item 9: subprocess.run's timeout killed only the direct child;
    a sanitizer's target or ncu's Python could keep the GPU busy through the
    next steps."""
    pid_file = tmp_path / "grandchild.pid"
    starts_a_grandchild = (f"import subprocess, time; child = subprocess.Popen([{sys.executable!r}, '-c', "
                           f"'import time; time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); "
                           f"time.sleep(120)")
    started = time.monotonic()
    code = processes.run_logged([sys.executable, "-c", starts_a_grandchild], tmp_path / "log", timeout_s=3)
    assert code == processes.TIMED_OUT and time.monotonic() - started < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the grandchild outlived the step's limit"
    assert "stopped after 3 s" in (tmp_path / "log").read_text()


def test_a_missing_program_is_reported_not_raised(tmp_path):
    assert processes.run_logged([str(tmp_path / "no-such-tool")], tmp_path / "log", timeout_s=5) == processes.NOT_FOUND


def test_every_step_imports_analysis_and_topk_moe_wherever_it_runs(tmp_path):
    """The Makefile sets PYTHONPATH; the steps set it too, so a sanitizer's
    target or ncu's re-run of a script (started from anywhere, as a script)
    imports both packages with nothing installed but the venv's."""
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    environment = device_check.step_environment(False, tmp_path, base=bare)
    folders = environment["PYTHONPATH"].split(os.pathsep)
    assert str(REPO_ROOT) in folders and str(device_check.kernels_folder()) in folders
    assert environment["OUT"] == str(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import analysis.measure.utilisation, topk_moe.cuda.smoke"],
                          env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rehearsal = device_check.step_environment(True, tmp_path, base=bare)
    assert rehearsal["PATH"].split(os.pathsep)[0] == str(device_check.STANDINS)
    assert rehearsal["MOE_DEVICE_CHECK_REHEARSAL"] == "1"


# ---------------------------------------------------------------- the gpu tests themselves


def _undefined_globals(path: Path) -> list:
    """Names a function of ``path`` reads as globals that the module never
    binds and Python does not provide."""
    table = symtable.symtable(path.read_text(encoding="utf-8"), str(path), "exec")
    bound = {symbol.get_name() for symbol in table.get_symbols()
             if symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace()}
    bound |= {"__file__", "__name__", "__doc__", "__spec__", "__loader__", "__package__", "__cached__",
              "__builtins__", "__annotations__"}  # every module has these
    missing = []

    def visit(scope):
        for child in scope.get_children():
            for symbol in child.get_symbols():
                name = symbol.get_name()
                if symbol.is_global() and symbol.is_referenced() and name not in bound \
                        and not hasattr(builtins, name):
                    missing.append(f"{child.get_name()}: {name}")
            visit(child)

    visit(table)
    return missing


def test_the_gpu_test_files_name_nothing_undefined():
    """Issue 26, item 5: the 2^31-element test used `cupy`, which tests/test_cuda.py
    never binds: a NameError on the GPU, and 64-bit indexing never checked.
    GPU-only tests never run here, so this is read from the source."""
    files = device_check.gpu_test_files()
    assert "tests/test_cuda.py" in files
    for file in files:
        assert _undefined_globals(REPO_ROOT / file) == [], file


def test_the_undefined_name_check_sees_a_missing_import(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text("import math\n\ndef test_x():\n    return cupy.zeros(math.pi), len([]), __file__\n")
    assert _undefined_globals(sample) == ["test_x: cupy"]


# ---------------------------------------------------------------- a whole run, with stand-in steps


def test_device_check_records_a_run(tmp_path, monkeypatch):
    """The whole non-dry path with stand-in steps: counts from the JUnit XML,
    sanitizer verdicts from their shared log (the real formats), one gpu-tests
    record with the source hash, the files under $OUT, the table last."""
    import analysis.records
    import topk_moe.backends

    junit = ('<testsuites><testsuite name="pytest" tests="10" failures="1" errors="0" skipped="2">'
             '</testsuite></testsuites>')

    def stand_in_steps(args, log_dir, scratch=None):
        python = sys.executable
        write_xml = f"open({str(scratch / 'gpu-tests.xml')!r}, 'w').write({junit!r})"
        return [
            device_check.Step("gpu-tests", [python, "-c", write_xml], "pytest-gpu.log", 60),
            device_check.Step("memcheck", [python, "-c", f"print({CLEAN_MEMCHECK!r})"], "sanitizer.log", 60),
            device_check.Step("racecheck", [python, "-c", "print('========= RACECHECK SUMMARY: 3 hazards "
                                                          "displayed (3 errors, 0 warnings)'); exit(1)"],
                              "sanitizer.log", 60),
        ]

    monkeypatch.setattr(topk_moe.backends, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(device_check, "plan_steps", stand_in_steps)
    monkeypatch.setattr(device_check, "start_emulated_racecheck", lambda scratch, environment: _fake_emulated_racecheck(
        scratch, {"kernels_run": ["k"], "launches": 1, "failed": {}, "seconds": 0.1,
                  "hazards": ["k: race on shared memory at shared+0: write (a.cu:1) and read (a.cu:2)"]}))
    monkeypatch.setattr(analysis.records, "_gpu_details", lambda: {
        "name": "Test GPU 80GB", "compute_capability": "9.0", "driver": None,
        "cuda_driver": "13.0", "cuda_runtime": "13.0"})
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.delenv("MOE_GIT_COMMIT", raising=False)  # --commit sets it; restored after the test
    output = io.StringIO()
    with redirect_stdout(output):
        code = device_check.main(["--results-dir", str(tmp_path / "results"), "--commit", "abc123"])
    assert code == 1  # a failed test and racecheck errors
    records = [json.loads(line) for line in (out / "gpu-tests.jsonl").read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert record["kind"] == "gpu-tests" and record["device_kind"] == "gpu" and record["rehearsal"] is False
    assert (record["passed"], record["failed"], record["errors"], record["skipped"]) == (7, 1, 0, 2)
    assert record["memcheck"] == "clean" and record["racecheck"] == "3 errors"
    assert record["emulated_racecheck"]["shared_hazards"] == 1
    assert record["racecheck_agreement"] == "agree: both found shared-memory hazards"
    assert record["source_hash"] == build_report.source_hash()
    assert "utc" in record and "git_commit" in record
    assert record["device"] == "Test GPU 80GB"
    assert record["table"][1][0] == "memcheck" and record["table"][1][1].startswith("clean; smoke checks: 0 failed")
    assert set(record["seconds"]) == {"gpu-tests", "memcheck", "racecheck"}
    assert (tmp_path / "results" / "test-gpu-80gb" / "gpu-tests.jsonl").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["gpu-tests.jsonl", "pytest-gpu.log", "sanitizer.log"]
    assert output.getvalue().rstrip().splitlines()[-1].startswith("source_hash")


def test_device_check_without_a_gpu_says_so(monkeypatch, tmp_path):
    import topk_moe.backends

    monkeypatch.setattr(topk_moe.backends, "cuda_unavailable_reason", lambda: "no device in this test")
    output = io.StringIO()
    with redirect_stdout(output):
        code = device_check.main(["--out", str(tmp_path / "out")])
    assert code == 2 and "no device in this test" in output.getvalue()
    assert not (tmp_path / "out").exists()


def test_rehearsal_records_never_count_as_a_gpu_check(tmp_path, monkeypatch):
    import analysis.records

    monkeypatch.setattr(analysis.records, "_gpu_details", lambda: {
        "name": "Test GPU 80GB", "compute_capability": "9.0", "driver": None,
        "cuda_driver": "13.0", "cuda_runtime": "13.0"})
    analysis.records.write_records("gpu-tests", [{"params": {}, "passed": 1, "rehearsal": True}], device_kind="gpu",
                                   results_dir=tmp_path)
    assert device_check.newest_gpu_check(tmp_path) == (None, False)
    analysis.records.write_records("gpu-tests", [{"params": {}, "passed": 2, "rehearsal": False, "source_hash": "x"}],
                                   device_kind="gpu", results_dir=tmp_path)
    record, current = device_check.newest_gpu_check(tmp_path)
    assert record["passed"] == 2 and current is False


# ---------------------------------------------------------------- the rehearsal


def test_a_small_rehearsal_runs_every_kind_of_step_on_the_cpu(tmp_path, monkeypatch):
    """`make device-check DRY=1`, cut down: the gpu tests on the emulator (one
    test, and the GPU-only ones, which skip), racecheck through the stand-in on
    the emulated smoke script, traffic-ncu up to where the GPU is needed.
    Records in a temporary folder, labelled; nothing under results/."""
    from analysis.measure.device_check import REHEARSAL_LABEL

    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("MOE_RESULTS_DIR", str(tmp_path / "must-stay-empty"))
    output = io.StringIO()
    with redirect_stdout(output):
        code = device_check.main(["--rehearse", "--steps", "gpu-tests,racecheck,traffic-ncu",
                                  "--pytest-args", "-k 'test_moe_forward_empty_batch or test_64_bit_indexing'"])
    text = output.getvalue()
    assert code == 0, text
    assert REHEARSAL_LABEL in text and "(stand-in: checks nothing)" in text
    assert sorted(p.name for p in out.iterdir()) == ["gpu-tests.jsonl", "pytest-gpu.log", "sanitizer.log",
                                                     "traffic-ncu.json", "traffic-ncu.log"]
    record = json.loads((out / "gpu-tests.jsonl").read_text())
    assert record["rehearsal"] is True and record["backend"] == "cuda-emulated" and record["device_kind"] == "cpu"
    assert record["passed"] >= 1 and record["skipped"] >= 1 and record["racecheck"] == "clean"
    assert record["traffic_ncu"]["kernels_measured"] == 0
    emulated = record["emulated_racecheck"]  # the real one, every kernel, beside the stand-in sanitizer
    assert emulated["state"] == "done" and emulated["kernels_run"] >= 30 and emulated["hazards"] == 0
    assert record["racecheck_agreement"] == "agree: no shared-memory hazard in either"
    assert not (tmp_path / "must-stay-empty").exists()
    assert "smoke: 0 failed" in (out / "sanitizer.log").read_text()


# ---------------------------------------------------------------- the emulated racecheck beside compute-sanitizer


def _fake_emulated_racecheck(scratch, summary=None, sleep_s=0.0):
    """A stand-in for the emulated racecheck's process: writes ``summary`` as its JSON."""
    write = "" if summary is None else f"open({str(scratch / 'emulated-racecheck.json')!r}, 'w').write({json.dumps(summary)!r})"
    return processes.start_logged([sys.executable, "-c", f"import time; time.sleep({sleep_s}); {write}"],
                                  scratch / "emulated-racecheck.log")


@pytest.mark.parametrize("sanitizer, shared, expected", [
    ("clean", 0, "agree: no shared-memory hazard in either"),
    ("2 errors", 3, "agree: both found shared-memory hazards"),
    ("clean", 1, "disagree: the emulator found 1 shared-memory hazards, compute-sanitizer none"),
    ("2 errors", 0, "disagree: compute-sanitizer's racecheck found 2 errors, the emulator no shared-memory hazard"),
    ("timed out", 0, "not compared: compute-sanitizer's racecheck timed out"),
])
def test_the_two_racechecks_are_compared_on_shared_memory(sanitizer, shared, expected):
    assert device_check.racecheck_agreement(sanitizer, {"state": "done", "shared_hazards": shared}) == expected


def test_the_emulated_racecheck_summary_is_read_and_a_slow_one_is_stopped(tmp_path):
    summary = {"kernels_run": ["a", "b"], "launches": 3, "failed": {}, "seconds": 1.0,
               "hazards": ["a: race on global memory at y+0", "b: race on shared memory at shared+4"]}
    outcome = device_check.finish_emulated_racecheck(_fake_emulated_racecheck(tmp_path, summary), tmp_path, 30)
    assert (outcome["state"], outcome["kernels_run"], outcome["hazards"], outcome["shared_hazards"]) == ("done", 2, 2, 1)
    assert "CPU emulation" in outcome["summary"]
    assert device_check.racecheck_agreement("clean", {**outcome, "state": "done"}).startswith("disagree")
    slow = tmp_path / "slow"
    slow.mkdir()
    outcome = device_check.finish_emulated_racecheck(_fake_emulated_racecheck(slow, summary, sleep_s=60), slow, 1)
    assert outcome["state"] == "did not finish in the time left" and outcome["returncode"] == processes.TIMED_OUT
    assert device_check.racecheck_agreement("clean", outcome).startswith("not compared: the emulated racecheck did not")

