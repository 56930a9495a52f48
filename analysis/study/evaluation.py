"""Scoring a trained model: held-out bits per byte and next-byte accuracy, and its routing.

Needs only torch and NumPy (no pandas or plotting), so the training CLI can use it.
The scoring rule, the same at the end of training and when the book re-scores a
checkpoint: the split's first ``max_bytes`` bytes are cut into non-overlapping
windows of ``seq_len + 1`` bytes, stride ``seq_len``, taken in whole batches of
``batch_size`` windows; every window predicts its last ``seq_len`` bytes from the
ones before them (so early positions of a window see little context, identically
for every arm). Bits per byte is the mean cross-entropy in nats over ln 2;
accuracy is how often the most likely byte is the next byte.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F_nn

from analysis import records
from analysis.study import corpus
from analysis.study.moe_model import ByteTransformer, load_checkpoint

EVAL_KIND = "accuracy-eval"
TRAIN_LOG_KIND = "accuracy-train-log"


def eval_windows(data: np.ndarray, seq_len: int, batch_size: int, max_bytes: Optional[int] = None) -> np.ndarray:
    """(n_batches, batch_size, seq_len + 1) int64 windows of `data` (see the module docstring)."""
    available = data.size - 1 if max_bytes is None else min(int(max_bytes), data.size - 1)
    n_windows = available // seq_len
    n_batches = n_windows // batch_size
    if n_batches == 0:
        raise ValueError(f"max_bytes: expected at least batch_size * seq_len = {batch_size * seq_len} bytes "
                         f"of data, got {available}")
    starts = np.arange(n_batches * batch_size) * seq_len
    windows = data[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int64)
    return windows.reshape(n_batches, batch_size, seq_len + 1)


@torch.no_grad()
def evaluate_model(model: ByteTransformer, data: np.ndarray, *, batch_size: int, max_bytes: Optional[int] = None,
                   top_k: Optional[int] = None, renormalize: Optional[bool] = None,
                   capacity_factor: Optional[float] = None) -> dict:
    """Bits per byte and accuracy of `model` on `data` (uint8), plus the MoE drop rate.

    ``top_k``, ``renormalize`` and ``capacity_factor`` override the MoE layers'
    settings; a capacity applies per batch of batch_size * seq_len tokens.
    """
    model.eval()
    device = next(model.parameters()).device
    windows = eval_windows(data, model.cfg.seq_len, batch_size, max_bytes)
    nats, correct, count = 0.0, 0, 0
    dropped = np.zeros(len(model.moe_layers()), dtype=np.int64)
    assignments = np.zeros_like(dropped)
    for batch in windows:
        tensor = torch.from_numpy(batch).to(device)
        inputs, targets = tensor[:, :-1], tensor[:, 1:]
        out = model(inputs, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor)
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
    }
    if model.cfg.is_moe:
        result.update({
            "top_k": model.cfg.top_k if top_k is None else top_k,
            "renormalize": model.cfg.renormalize if renormalize is None else renormalize,
            "capacity_factor": capacity_factor,
            "drop_rate": float(dropped.sum() / assignments.sum()),
            "drop_rate_per_layer": (dropped / assignments).tolist(),
        })
    return result


def evaluate(checkpoint_path, split: str = "test", *, max_bytes: Optional[int] = None,
             batch_size: Optional[int] = None, top_k: Optional[int] = None, renormalize: Optional[bool] = None,
             capacity_factor: Optional[float] = None, corpus_root=None) -> dict:
    """Re-evaluate a saved checkpoint on a split of this machine's corpus.

    Returns a dict with at least ``bits_per_byte`` and ``accuracy``. Defaults
    (``max_bytes``, ``batch_size``) are those the run was scored with at the end
    of training, so on the same corpus the numbers reproduce its eval record.
    ``corpus_matches`` says whether this machine's corpus is the one it was trained on.
    """
    model, meta = load_checkpoint(checkpoint_path)
    data = corpus.load_corpus(corpus_root)
    result = evaluate_model(model, data[split],
                            batch_size=batch_size or meta["batch_size"],
                            max_bytes=max_bytes if max_bytes is not None else meta["eval_bytes"],
                            top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor)
    result.update({"split": split, "checkpoint": str(checkpoint_path), "arm": meta["arm"], "seed": meta["seed"],
                   "corpus_matches": data.manifest["sha256"] == meta["corpus"]["sha256"]})
    return result


@torch.no_grad()
def collect_routing(model: ByteTransformer, data: np.ndarray, *, batch_size: int,
                    max_bytes: Optional[int] = None) -> dict:
    """Every MoE layer's routing decisions on the evaluation windows of `data`.

    Returns NumPy arrays over the N = n_batches * batch_size * seq_len positions:
    ``bytes`` (N,) the input byte at each position, ``sequence`` (N,) its window
    and ``position`` (N,) its place in the window, and per MoE layer (lists)
    ``experts`` (N, K), ``weights`` (N, K), ``probs`` (N, E).
    """
    model.eval()
    windows = eval_windows(data, model.cfg.seq_len, batch_size, max_bytes)
    inputs = windows[:, :, :-1]
    n_layers = len(model.moe_layers())
    experts, weights, probs = ([[] for _ in range(n_layers)] for _ in range(3))
    for batch in inputs:
        out = model(torch.from_numpy(batch))
        for layer, routing in enumerate(out.routing):
            experts[layer].append(routing.experts.numpy().astype(np.int32))
            weights[layer].append(routing.weights.float().numpy())
            probs[layer].append(routing.probs.float().numpy())
    n_windows, seq_len = inputs.shape[0] * inputs.shape[1], inputs.shape[2]
    return {
        "bytes": inputs.reshape(-1).astype(np.uint8),
        "sequence": np.repeat(np.arange(n_windows), seq_len),
        "position": np.tile(np.arange(seq_len), n_windows),
        "experts": [np.concatenate(e) for e in experts],
        "weights": [np.concatenate(w) for w in weights],
        "probs": [np.concatenate(p) for p in probs],
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
