"""Run a tool as a child process with a time limit that holds for everything it starts.

``subprocess.run(timeout=...)`` kills only the direct child when the time is
up. The GPU tools start more: compute-sanitizer runs the checked program as a
process of its own, ``ncu`` re-runs the profiled script, pytest may start
workers. Left running, they would keep the GPU busy through the next steps of
``device_check`` (and the sweep's timings). So the child starts a process
group of its own (a new session), and on timeout the whole group is stopped:
SIGTERM, then SIGKILL after a short grace period.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

#: Exit status reported for a command stopped at its time limit (as GNU timeout).
TIMED_OUT = 124
#: Exit status reported for a command that could not be started (as a shell).
NOT_FOUND = 127
#: Seconds between SIGTERM and SIGKILL for a group that outlived its limit.
GRACE_S = 5.0


def run_logged(command: list, log_path: Path, *, timeout_s: float, env: Optional[dict] = None,
               cwd=None, append: bool = False) -> int:
    """Run ``command`` with stdout and stderr to ``log_path`` (after a ``$ command``
    line); return its exit status, TIMED_OUT when it ran past ``timeout_s`` (its
    whole process group is then stopped), NOT_FOUND when it could not start."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    return wait_logged(start_logged(command, log_path, env=env, cwd=cwd, append=append), timeout_s=timeout_s)


@dataclasses.dataclass
class Started:
    """A command started by ``start_logged``: its process (None when it could not
    start) and its log."""

    command: list
    log_path: Path
    child: Optional[subprocess.Popen]
    started_at: float = dataclasses.field(default_factory=time.monotonic)


def start_logged(command: list, log_path: Path, *, env: Optional[dict] = None, cwd=None,
                 append: bool = False) -> Started:
    """Start ``command`` in a process group of its own, its output to ``log_path``
    (after a ``$ command`` line), and return at once; ``wait_logged`` collects it.
    For work that runs beside other steps (device_check's emulated racecheck)."""
    with open(log_path, "a" if append else "w", encoding="utf-8") as log:
        log.write("$ " + subprocess.list2cmdline([str(part) for part in command]) + "\n")
        log.flush()
        try:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                     start_new_session=True)
        except OSError as error:  # missing executable, or not executable
            log.write(f"\n[run_logged] cannot run: {error}\n")
            child = None
    return Started(list(command), Path(log_path), child)


def wait_logged(started: Started, *, timeout_s: float) -> int:
    """The exit status of a ``start_logged`` command, waiting at most ``timeout_s``
    more: TIMED_OUT when it runs past that (its whole process group is then
    stopped), NOT_FOUND when it never started."""
    if started.child is None:
        return NOT_FOUND
    try:
        return started.child.wait(timeout=max(timeout_s, 0.001))
    except subprocess.TimeoutExpired:
        stop_group(started.child)
        with open(started.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n[run_logged] stopped after {time.monotonic() - started.started_at:.0f} s "
                      f"(the whole process group)\n")
        return TIMED_OUT


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left after GRACE_S."""
    for signal_number, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        try:
            os.killpg(child.pid, signal_number)
        except ProcessLookupError:  # the group is gone already
            break
        try:
            child.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(child.pid):
            break
    child.poll()


def _group_alive(group_id: int) -> bool:
    try:
        os.killpg(group_id, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal still exists
        return True
    return True
