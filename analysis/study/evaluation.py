"""Scoring a trained model: held-out bits per byte and next-byte accuracy, and its routing.

Needs only torch and NumPy (no pandas or plotting), so the training CLI can use it.

Which bytes are scored (``sample``, one of ``SAMPLES``). In every case the split is
cut into windows of ``seq_len + 1`` bytes, taken in batches of ``batch_size``
windows; every window predicts its last ``seq_len`` bytes from the ones before
them (so early positions of a window see little context, identically for every
arm).

- ``"prefix"``: the split's first ``max_bytes`` bytes, non-overlapping windows at
  stride ``seq_len``, whole batches only. The rule of the score recorded at the
  end of training (2^18 bytes for the cpu preset: about a fifth of the test
  split, and only the files that come first in path order).
- ``"whole"``: every window at stride ``seq_len`` over the whole split (the last
  batch may be smaller): every byte but the last ``(n - 1) % seq_len`` is scored.
- ``"spread"``: about ``max_bytes / seq_len`` windows spread over every file of
  the split, each file getting windows in proportion to its size and at least
  one, evenly spaced inside it (``spread_starts``). For the experiments and the
  routing metrics, where the whole split would take too long.

Bits per byte is the mean cross-entropy in nats over ln 2; accuracy is how often
the most likely byte is the next byte.

``python -m analysis.study.evaluation --preset cpu`` scores every committed
checkpoint of a preset on the whole test split and writes one
``accuracy-rescore`` record per run (analysis.records): the book reads those,
and re-checks one of them live.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F_nn

from analysis import records
from analysis.study import corpus
from analysis.study.moe_model import ByteTransformer, load_checkpoint

EVAL_KIND = "accuracy-eval"
TRAIN_LOG_KIND = "accuracy-train-log"
RESCORE_KIND = "accuracy-rescore"
SAMPLES = ("prefix", "whole", "spread")
#: Capacity factors of the inference-time experiments (None: dropless).
CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0, None)


def eval_windows(data: np.ndarray, seq_len: int, batch_size: int, max_bytes: Optional[int] = None) -> np.ndarray:
    """(n_batches, batch_size, seq_len + 1) int64 windows of `data`: the ``"prefix"`` rule."""
    available = data.size - 1 if max_bytes is None else min(int(max_bytes), data.size - 1)
    n_windows = available // seq_len
    n_batches = n_windows // batch_size
    if n_batches == 0:
        raise ValueError(f"max_bytes: expected at least batch_size * seq_len = {batch_size * seq_len} bytes "
                         f"of data, got {available}")
    starts = np.arange(n_batches * batch_size) * seq_len
    windows = data[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int64)
    return windows.reshape(n_batches, batch_size, seq_len + 1)


def document_bounds(data: np.ndarray) -> tuple:
    """(starts, ends) of each file in a split: a file is the bytes before each
    document separator (corpus.DOCUMENT_SEPARATOR), ``ends`` the separators' offsets."""
    ends = np.flatnonzero(np.asarray(data) == corpus.DOCUMENT_SEPARATOR)
    if ends.size == 0 or ends[-1] != data.size - 1:
        ends = np.append(ends, data.size)  # text without a final separator: one more file
    starts = np.concatenate([[0], ends[:-1] + 1])
    return starts, ends


def document_of(data: np.ndarray, offsets) -> np.ndarray:
    """The file index (0, 1, ... in split order) of each byte offset."""
    starts, _ = document_bounds(data)
    return np.searchsorted(starts, np.asarray(offsets), side="right") - 1


def spread_starts(data: np.ndarray, seq_len: int, n_windows: int) -> np.ndarray:
    """Start offsets of about `n_windows` windows spread over every file of `data`.

    Each file gets windows in proportion to its size (largest remainders), at least
    one, placed evenly inside it: window i of n at lo + (hi - lo) * (i + 0.5) / n,
    where lo is the file's first byte and hi the last start whose window ends at the
    file's separator. A file shorter than a window gets one window from its first
    byte, which runs on into the next file, as windows of the contiguous rules do."""
    if n_windows < 1:
        raise ValueError(f"n_windows: expected at least 1, got {n_windows}")
    starts, ends = document_bounds(data)
    sizes = (ends - starts + 1).astype(np.float64)
    share = n_windows * sizes / sizes.sum()
    counts = np.maximum(1, np.floor(share).astype(np.int64))
    left = n_windows - int(counts.sum())
    if left > 0:
        counts[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] += 1
    last_start = data.size - seq_len - 1
    if last_start < 0:
        raise ValueError(f"data: expected more than seq_len + 1 = {seq_len + 1} bytes, got {data.size}")
    chosen = []
    for lo, end, count in zip(starts, ends, counts):
        hi = max(lo, end - seq_len)
        chosen.append(np.round(lo + (hi - lo) * (np.arange(count) + 0.5) / count).astype(np.int64))
    return np.unique(np.minimum(np.concatenate(chosen), last_start))


def window_starts(data: np.ndarray, seq_len: int, batch_size: int, *, sample: str = "prefix",
                  max_bytes: Optional[int] = None) -> np.ndarray:
    """The start offset of every scored window under `sample` (module docstring)."""
    if sample not in SAMPLES:
        raise ValueError(f"sample: expected one of {SAMPLES}, got {sample!r}")
    if sample == "prefix":
        n_windows = eval_windows(data, seq_len, batch_size, max_bytes).shape[0] * batch_size
        return np.arange(n_windows) * seq_len
    if sample == "whole":
        if max_bytes is not None:
            raise ValueError(f"max_bytes: expected None with sample='whole' (it scores every byte), got {max_bytes}")
        return np.arange((data.size - 1) // seq_len) * seq_len
    if max_bytes is None:
        raise ValueError("max_bytes: expected the number of bytes to spread over the files with sample='spread'")
    return spread_starts(data, seq_len, max(1, int(max_bytes) // seq_len))


def window_batches(data: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int) -> list:
    """The windows at `starts` as int64 arrays of (up to) batch_size windows each."""
    windows = data[np.asarray(starts)[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int64)
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


def sample_summary(data: np.ndarray, starts: np.ndarray, seq_len: int) -> dict:
    """What a sample scores: windows, bytes, files touched (a predicted byte in the
    file) out of the split's files, and the largest share one file has of the bytes."""
    predicted = (np.asarray(starts)[:, None] + 1 + np.arange(seq_len)[None, :]).reshape(-1)
    files = document_of(data, predicted)
    n_files = document_bounds(data)[0].size
    per_file = np.bincount(files, minlength=n_files)
    return {"n_windows": int(len(starts)), "n_bytes": int(predicted.size), "split_bytes": int(data.size),
            "share_of_split": float(predicted.size / data.size), "files_touched": int(np.count_nonzero(per_file)),
            "n_files": int(n_files), "largest_file_share": float(per_file.max() / predicted.size)}


@torch.no_grad()
def evaluate_model(model: ByteTransformer, data: np.ndarray, *, batch_size: int, max_bytes: Optional[int] = None,
                   sample: str = "prefix", top_k: Optional[int] = None, renormalize: Optional[bool] = None,
                   capacity_factor: Optional[float] = None, capacity_scope: str = "position",
                   progress: bool = False) -> dict:
    """Bits per byte and accuracy of `model` on `data` (uint8), plus the MoE drop rate.

    ``sample`` and ``max_bytes`` choose the bytes (module docstring). ``top_k``,
    ``renormalize`` and ``capacity_factor`` override the MoE layers' settings; a
    capacity applies per position of each batch (``capacity_scope="position"``, causal)
    unless ``capacity_scope="batch"`` asks for the kernels' batch-wide rule.
    """
    model.eval()
    device = next(model.parameters()).device
    seq_len = model.cfg.seq_len
    starts = window_starts(data, seq_len, batch_size, sample=sample, max_bytes=max_bytes)
    batches = window_batches(data, starts, seq_len, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="scoring", mininterval=5.0, file=sys.stderr)
    nats, correct, count = 0.0, 0, 0
    dropped = np.zeros(len(model.moe_layers()), dtype=np.int64)
    assignments = np.zeros_like(dropped)
    for batch in batches:
        tensor = torch.from_numpy(batch).to(device)
        inputs, targets = tensor[:, :-1], tensor[:, 1:]
        out = model(inputs, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor,
                    capacity_scope=capacity_scope)
        logits = out.logits.reshape(-1, model.cfg.vocab_size).float()
        nats += float(F_nn.cross_entropy(logits, targets.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(dim=-1) == targets.reshape(-1)).sum())
        count += targets.numel()
        for layer, routing in enumerate(out.routing):
            dropped[layer] += int((~routing.kept).sum())
            assignments[layer] += routing.kept.numel()
    result = {
        "bits_per_byte": nats / count / math.log(2),
        "loss": nats / count,
        "accuracy": correct / count,
        "n_bytes": count,
        "sample": sample,
    }
    if sample != "prefix":
        result["coverage"] = sample_summary(data, starts, seq_len)
    if model.cfg.is_moe:
        result.update({
            "top_k": model.cfg.top_k if top_k is None else top_k,
            "renormalize": model.cfg.renormalize if renormalize is None else renormalize,
            "capacity_factor": capacity_factor,
            "capacity_scope": capacity_scope,
            "drop_rate": float(dropped.sum() / assignments.sum()),
            "drop_rate_per_layer": (dropped / assignments).tolist(),
        })
    return result


def evaluate(checkpoint_path, split: str = "test", *, max_bytes: Optional[int] = None, sample: str = "prefix",
             batch_size: Optional[int] = None, top_k: Optional[int] = None, renormalize: Optional[bool] = None,
             capacity_factor: Optional[float] = None, corpus_root=None, progress: bool = False) -> dict:
    """Re-evaluate a saved checkpoint on a split of this machine's corpus.

    Returns a dict with at least ``bits_per_byte`` and ``accuracy``. Defaults
    (``sample="prefix"``, ``max_bytes``, ``batch_size``) are those the run was scored
    with at the end of training, so on the same corpus the numbers reproduce its
    eval record; ``sample="whole"`` scores the whole split.
    ``corpus_matches`` says whether this machine's corpus is the one it was trained on.
    """
    model, meta = load_checkpoint(checkpoint_path)
    data = corpus.load_corpus(corpus_root)
    if sample == "prefix" and max_bytes is None:
        max_bytes = meta["eval_bytes"]
    result = evaluate_model(model, data[split], batch_size=batch_size or meta["batch_size"], max_bytes=max_bytes,
                            sample=sample, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor,
                            progress=progress)
    result.update({"split": split, "checkpoint": str(checkpoint_path), "arm": meta["arm"], "seed": meta["seed"],
                   "corpus_matches": data.manifest["sha256"] == meta["corpus"]["sha256"]})
    return result


@torch.no_grad()
def collect_routing(model: ByteTransformer, data: np.ndarray, *, batch_size: int, max_bytes: Optional[int] = None,
                    sample: str = "spread") -> dict:
    """Every MoE layer's routing decisions (dropless) on the windows of `data` that
    `sample` chooses (default: spread over every file).

    Returns NumPy arrays over the N scored input positions: ``bytes`` (N,) the input
    byte, ``sequence`` (N,) its window, ``position`` (N,) its place in the window,
    ``batch`` (N,) its batch (the unit of the per-batch load), ``document`` (N,) its
    file in the split; per MoE layer (lists) ``experts`` (N, K), ``weights`` (N, K),
    ``probs`` (N, E); and ``coverage`` (sample_summary).
    """
    model.eval()
    seq_len = model.cfg.seq_len
    starts = window_starts(data, seq_len, batch_size, sample=sample, max_bytes=max_bytes)
    batches = window_batches(data, starts, seq_len, batch_size)
    n_layers = len(model.moe_layers())
    experts, weights, probs = ([[] for _ in range(n_layers)] for _ in range(3))
    batch_index = []
    for index, batch in enumerate(batches):
        out = model(torch.from_numpy(batch[:, :-1]))
        batch_index.append(np.full(batch.shape[0] * seq_len, index))
        for layer, routing in enumerate(out.routing):
            experts[layer].append(routing.experts.numpy().astype(np.int32))
            weights[layer].append(routing.weights.float().numpy())
            probs[layer].append(routing.probs.float().numpy())
    offsets = (starts[:, None] + np.arange(seq_len)[None, :]).reshape(-1)
    coverage = sample_summary(data, starts, seq_len)
    coverage["largest_file_share_of_inputs"] = float(np.bincount(document_of(data, offsets)).max() / offsets.size)
    return {
        "bytes": data[offsets].astype(np.uint8),
        "sequence": np.repeat(np.arange(len(starts)), seq_len),
        "position": np.tile(np.arange(seq_len), len(starts)),
        "batch": np.concatenate(batch_index),
        "document": document_of(data, offsets),
        "experts": [np.concatenate(e) for e in experts],
        "weights": [np.concatenate(w) for w in weights],
        "probs": [np.concatenate(p) for p in probs],
        "coverage": coverage,
    }


# ---------------------------------------------------------------- records


def all_records(kind: str, results_dir=None) -> list:
    """Every record of `kind` from every device folder under the results root."""
    root = records.results_root(results_dir)
    found = []
    for path in sorted(root.glob(f"*/{kind}.jsonl")):
        found.extend(records.read_records(kind, results_dir=root, device=path.parent.name))
    return found


def eval_records(results_dir=None, *, preset: Optional[str] = None) -> list:
    """The newest eval record of each (preset, arm, seed), from every device folder."""
    newest = {}
    for record in all_records(EVAL_KIND, results_dir):
        params = record["params"]
        if preset is not None and params["preset"] != preset:
            continue
        key = (params["preset"], params["arm"], int(params["seed"]))
        if key not in newest or record["utc"] > newest[key]["utc"]:
            newest[key] = record
    return [newest[key] for key in sorted(newest)]


def rescore_records(results_dir=None, *, preset: Optional[str] = None) -> list:
    """The newest whole-split rescore record of each (preset, arm, seed, run_id)."""
    newest = {}
    for record in all_records(RESCORE_KIND, results_dir):
        params = record["params"]
        if preset is not None and params["preset"] != preset:
            continue
        key = (params["preset"], params["arm"], int(params["seed"]), params["run_id"])
        if key not in newest or record["utc"] > newest[key]["utc"]:
            newest[key] = record
    return [newest[key] for key in sorted(newest)]


def rescore_record(eval_record: dict, results_dir=None, *, batch_size: Optional[int] = None,
                   progress: bool = False) -> dict:
    """A run's checkpoint scored on the whole test split, as an ``accuracy-rescore`` record.
    ``batch_size``: windows per batch (default: the run's); dropless, it changes nothing
    but float rounding and speed."""
    params = eval_record["params"]
    path = records.results_root(results_dir) / params["checkpoint"]
    batch_size = batch_size or params["batch_size"]
    result = evaluate(path, "test", sample="whole", batch_size=batch_size, progress=progress)
    manifest = corpus.manifest()
    return {"params": {"preset": params["preset"], "arm": params["arm"], "seed": int(params["seed"]),
                       "run_id": params["run_id"], "checkpoint": params["checkpoint"], "split": "test",
                       "sample": "whole", "batch_size": batch_size, "seq_len": params["seq_len"],
                       "capacity_factor": None, "corpus_sha256": manifest["sha256"],
                       "corpus_python": manifest["python"], "trained_corpus_sha256": params.get("corpus_sha256")},
            "bits_per_byte": result["bits_per_byte"], "loss": result["loss"], "accuracy": result["accuracy"],
            "n_bytes": result["n_bytes"], "coverage": result["coverage"]}


def rescore_all(preset: str, results_dir=None, *, force: bool = False, batch_size: Optional[int] = None,
                progress: bool = True, echo=print) -> list:
    """Score every run of `preset` whose whole-split record is missing (or all, with
    `force`) and append the records; return the records written."""
    done = set() if force else {(r["params"]["arm"], int(r["params"]["seed"]), r["params"]["run_id"])
                                for r in rescore_records(results_dir, preset=preset)}
    todo = [r for r in eval_records(results_dir, preset=preset)
            if (r["params"]["arm"], int(r["params"]["seed"]), r["params"]["run_id"]) not in done]
    written = []
    for index, eval_record in enumerate(todo, start=1):
        record = rescore_record(eval_record, results_dir, batch_size=batch_size, progress=progress)
        # One record at a time, so an interrupted rescore keeps what it finished.
        records.write_records(RESCORE_KIND, [record], device_kind="cpu", results_dir=results_dir)
        echo(f"[{index}/{len(todo)}] {record['params']['arm']} seed {record['params']['seed']}: "
             f"{record['bits_per_byte']:.4f} bits/byte on {record['n_bytes']:,} test bytes")
        written.append(record)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.study.evaluation",
                                     description="Score every checkpoint of a preset on the whole test split "
                                                 "and write accuracy-rescore records (resumable).")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: $MOE_RESULTS_DIR or results/")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--force", action="store_true", help="re-score runs that have a record already")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per batch (default: the run's)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    written = rescore_all(args.preset, args.results_dir, force=args.force, batch_size=args.batch_size,
                          progress=not args.no_progress)
    print(f"wrote {len(written)} {RESCORE_KIND} record(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
