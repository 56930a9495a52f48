"""The provenance index (book/notebooks/provenance.ipynb): every results file and where it came from.

Reads every ``*.jsonl`` under the results folder (``records.results_root``),
at any depth, and summarises each file's records by their provenance fields
(``records.PROVENANCE_FIELDS``): device, git commit and dirty flag, first and
last UTC time, and the software versions. A line that is not JSON (a file
being written while this runs) is counted, not fatal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from analysis import records
from analysis.display import Note

#: Columns of the index whose values come straight from record fields, in order.
VERSION_FIELDS = ("python", "numpy", "torch", "cupy", "driver", "cuda_driver", "cuda_runtime")
COMMIT_LENGTH = 12
MISSING = "—"


def results_files(results_dir=None) -> list:
    """Every *.jsonl under the results folder, sorted by path; [] when there is no folder."""
    root = records.results_root(results_dir)
    if not root.is_dir():
        return []
    return sorted(path for path in root.rglob("*.jsonl") if path.is_file())


def load_lines(path: Path) -> tuple:
    """(records, unreadable lines) of one jsonl file."""
    found, unreadable = [], 0
    with open(path, encoding="utf-8", errors="replace") as results_file:
        for line in results_file:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if isinstance(record, dict):
                found.append(record)
            else:
                unreadable += 1
    return found, unreadable


def distinct(values, shorten: Optional[int] = None) -> str:
    """The distinct non-missing values, in first-seen order, joined by ', '; MISSING if none."""
    seen = []
    for value in values:
        if value is None:
            continue
        text = str(value)[:shorten] if shorten else str(value)
        if text not in seen:
            seen.append(text)
    return ", ".join(seen) if seen else MISSING


def file_row(path: Path, root: Path) -> dict:
    """One line of the index for one results file."""
    found, unreadable = load_lines(path)
    times = sorted(str(record["utc"]) for record in found if record.get("utc"))
    row = {
        "path": path.relative_to(root).as_posix(),
        "kind": distinct(record.get("kind") for record in found) if found else path.stem,
        "records": len(found),
        "unreadable lines": unreadable,
        "device": distinct(record.get("device") for record in found),
        "git commit": distinct((record.get("git_commit") for record in found), COMMIT_LENGTH),
        "git dirty": distinct(record.get("git_dirty") for record in found),
        "first utc": times[0] if times else MISSING,
        "last utc": times[-1] if times else MISSING,
    }
    for field in VERSION_FIELDS:
        row[field] = distinct(record.get(field) for record in found)
    return row


def provenance_table(results_dir=None) -> pd.DataFrame:
    """The index: one row per results file (empty, with the columns, when there is none)."""
    root = records.results_root(results_dir)
    rows = [file_row(path, root) for path in results_files(results_dir)]
    columns = ["path", "kind", "records", "unreadable lines", "device", "git commit", "git dirty",
               "first utc", "last utc", *VERSION_FIELDS]
    return pd.DataFrame(rows, columns=columns).set_index("path")


def checkpoints_summary(results_dir=None) -> dict:
    """The checkpoints folder (<results>/checkpoints): its files, at any depth, and their total bytes."""
    folder = records.results_root(results_dir) / "checkpoints"
    files = [path for path in folder.rglob("*") if path.is_file()] if folder.is_dir() else []
    return {"folder": shown_path(folder), "exists": folder.is_dir(), "n_files": len(files),
            "total_bytes": int(sum(path.stat().st_size for path in files))}


def size_text(n_bytes: int) -> str:
    """Bytes in binary units: '5.8 MiB'."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def numbers(table: pd.DataFrame, checkpoints: dict) -> dict:
    """For the prose: files, records, devices, commits and the checkpoint folder."""
    devices = set()
    commits = set()
    for text in table["device"]:
        devices.update(value for value in text.split(", ") if value != MISSING)
    for text in table["git commit"]:
        commits.update(value for value in text.split(", ") if value != MISSING)
    return {
        "n_files": int(len(table)),
        "n_records": int(table["records"].sum()) if len(table) else 0,
        "n_unreadable": int(table["unreadable lines"].sum()) if len(table) else 0,
        "n_devices": len(devices),
        "n_commits": len(commits),
        "any_dirty": bool(any("True" in text for text in table["git dirty"])),
        "n_checkpoints": checkpoints["n_files"],
        "checkpoints_size": size_text(checkpoints["total_bytes"]),
    }


def index_note(table: pd.DataFrame, results_dir=None) -> Note:
    """A visible note: where the index was read, and whether there was anything to read."""
    root = shown_path(records.results_root(results_dir))
    if table.empty:
        return Note("No results", f"No results file (*.jsonl) was found under {root}/: nothing has been "
                    "measured and committed yet.")
    return Note("Read live", f"This index was built while the chapter ran, from {len(table)} files under "
                f"{root}/. A file being written at that moment is read as far as it goes.")


def dirty_text(summary: dict) -> str:
    """One sentence on the dirty flags."""
    if summary["any_dirty"]:
        return ("Some records were made from a working tree with uncommitted changes (git dirty True): "
                "their commit alone does not name the code that made them.")
    return "No record was made from a working tree with uncommitted changes."


def shown_path(path: Path) -> str:
    """A folder as the book shows it: relative to the repository, never the builder's absolute path."""
    path = Path(path).resolve()
    try:
        return path.relative_to(records.REPO_ROOT).as_posix()
    except ValueError:
        return path.name


def validate_parameters(results_dir) -> None:
    """The chapter's one parameter, in one clear sentence (ValueError)."""
    if results_dir is not None and not Path(results_dir).is_dir():
        raise ValueError(f"results_dir: expected None or an existing folder, got {results_dir!r}")


def records_view(table: pd.DataFrame) -> pd.DataFrame:
    """Per file: records, commits, dirty flags and the days its records span (the file's
    folder names its device and its name the kind; the versions are in ``versions_view``)."""
    view = table.reset_index()
    days = [_days(first, last) for first, last in zip(view["first utc"], view["last utc"])]
    shown = pd.DataFrame({"file": view["path"], "records": view["records"],
                          "git commit": view["git commit"], "dirty": view["git dirty"], "dates (UTC)": days})
    if table["unreadable lines"].sum():
        shown["unreadable lines"] = view["unreadable lines"].to_numpy()
    return shown


def _days(first: str, last: str) -> str:
    if first == MISSING:
        return MISSING
    first, last = first[:10], last[:10]
    if first == last:
        return first
    return f"{first} to {last[5:]}" if first[:4] == last[:4] else f"{first} to {last}"


def versions_view(table: pd.DataFrame) -> pd.DataFrame:
    """Per file: the software versions its records carry (only the fields some record has)."""
    view = table.reset_index()[["path", *VERSION_FIELDS]]
    present = [field for field in VERSION_FIELDS if (view[field] != MISSING).any()]
    return view[["path", *present]]


def checkpoints_table(checkpoints: dict) -> pd.DataFrame:
    """The checkpoints folder as one row: where, how many files, how large."""
    return pd.DataFrame([{"folder": checkpoints["folder"], "files": checkpoints["n_files"],
                          "size": size_text(checkpoints["total_bytes"])}])


def counted(n: int, noun: str) -> str:
    """"1 device", "3 devices": a count with its noun, for the prose."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
