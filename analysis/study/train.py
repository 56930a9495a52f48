"""Train the accuracy study's models: dense vs MoE k = 1 vs MoE k = 2, several seeds.

    python -m analysis.study.train --preset cpu                      # every arm, the preset's seeds
    python -m analysis.study.train --preset cpu --arms moe-k1,dense --seeds 0
    python -m analysis.study.train --preset cpu --estimate           # time a few steps per arm, print the plan

Each (arm, seed) run writes a checkpoint, weights only in float16, to
``<results>/checkpoints/<preset>/<arm>-seed<N>.pt`` and appends tidy records
(analysis.records) to ``<results>/<device>/``: ``accuracy-train-log`` (loss
against tokens and seconds, per-layer expert load, every ``log_every``
steps) and ``accuracy-eval`` (held-out bits per byte and next-byte accuracy
on the test split, evaluated from the float16 weights that were saved).
A run whose checkpoint and eval record both exist is skipped, so an
interrupted training resumes where it stopped (``--force`` retrains). That eval
record scores the test split's first ``eval_bytes`` bytes only; the book reads
whole-split scores, written afterwards by ``python -m analysis.study.evaluation
--preset <preset>`` (also resumable).

Every arm of a preset trains with the same data order, steps, optimiser and
schedule: the batches of seed s are drawn by a generator seeded from s alone,
so for a given seed every arm sees the same bytes in the same order; seeds
differ in both initialisation and data order.

The arms (F_d = the preset's d_ff, E = 8 experts):

- ``dense``: dense SwiGLU FFN of width F_d, the baseline;
- ``moe-k1``: k = 1, experts of width F_d (equal active FLOPs to ``dense``);
- ``moe-k2-half``: k = 2, experts of width F_d / 2 (equal active FLOPs);
- ``moe-k2``: k = 2, experts of width F_d (equal expert size; twice the FFN FLOPs);
- ``dense-wide``: dense of width E * F_d (as many FFN parameters as ``moe-k1`` and ``moe-k2``);
- ``moe-k1-nobal``, ``moe-k2-half-nobal``: as ``moe-k1``/``moe-k2-half`` without
  the balancing loss (the ablation that shows what it does to the load).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from analysis.study import corpus, evaluation
from analysis import records
from analysis.study.moe_model import ByteTransformer, ModelConfig, default_renormalize, parameter_counts, round_to_checkpoint, save_checkpoint

TRAIN_LOG_KIND = evaluation.TRAIN_LOG_KIND
EVAL_KIND = evaluation.EVAL_KIND


@dataclass(frozen=True)
class Preset:
    """Everything about a training run except the arm and the seed."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    d_ff: int  # F_d, the dense baseline's width
    batch_size: int
    steps: int
    learning_rate: float
    warmup_steps: int
    n_experts: int = 8
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    log_every: int = 25
    eval_bytes: int = 1 << 18  # test bytes scored at the end of training
    val_every: int = 0  # validation every this many steps (0: only the train loss is logged)
    val_bytes: int = 1 << 15
    seeds: tuple = (0, 1, 2)
    threads: int = 2
    device: str = "cpu"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


PRESETS = {
    # Sized for the 2-core CPU: all seven arms x 3 seeds in about 55 minutes, on ONE
    # torch thread. Measured with 1 thread: 49-139 ms per step per arm (dense 49,
    # moe-k1 61, moe-k2-half 68, moe-k2 ~80, dense-wide 139), ~1.6 s for one step of
    # every arm and seed, so 2000 steps ~ 53 min plus evaluation. One thread, not
    # two: on a 2-core machine that runs anything else (a benchmark, the book), two
    # threads meet at a barrier after every small operation and wait for the
    # preempted one: measured 3-8x slower per step than one thread (e.g. moe-k1
    # 406 ms against 61 ms). Pass --threads 2 on an idle machine (~1.5x faster).
    # Checkpoints: ~17 MB for all 21 runs in float16.
    "cpu": Preset(name="cpu", d_model=64, n_layers=3, n_heads=4, seq_len=128, d_ff=96,
                  batch_size=16, steps=2000, learning_rate=3e-3, warmup_steps=100,
                  log_every=50, eval_bytes=1 << 18, val_every=400, val_bytes=1 << 15, threads=1),
    # One GPU: a larger model, longer sequences, ~100x the tokens.
    "gpu": Preset(name="gpu", d_model=256, n_layers=6, n_heads=8, seq_len=256, d_ff=512,
                  batch_size=64, steps=10000, learning_rate=1e-3, warmup_steps=300,
                  log_every=100, eval_bytes=1 << 20, val_every=1000, val_bytes=1 << 18, device="cuda"),
    # Seconds, for tests and the chapters' scratch mode.
    "tiny": Preset(name="tiny", d_model=16, n_layers=2, n_heads=2, seq_len=16, d_ff=16,
                   batch_size=4, steps=6, learning_rate=3e-3, warmup_steps=1,
                   log_every=2, eval_bytes=1 << 11, seeds=(0, 1), threads=1),
}


@dataclass(frozen=True)
class Arm:
    name: str
    ffn: str  # "dense" or "moe"
    top_k: int
    width_multiple: float  # d_ff = width_multiple * F_d (E for dense-wide)
    comparison: str
    balance: bool = True


ARMS = {
    arm.name: arm for arm in (
        Arm("dense", "dense", 1, 1.0, "baseline (width F_d)"),
        Arm("moe-k1", "moe", 1, 1.0, "equal active FLOPs"),
        Arm("moe-k2-half", "moe", 2, 0.5, "equal active FLOPs"),
        Arm("moe-k2", "moe", 2, 1.0, "equal expert size"),
        Arm("dense-wide", "dense", 1, -1.0, "equal total parameters"),  # -1: E * F_d
        Arm("moe-k1-nobal", "moe", 1, 1.0, "ablation: no balancing loss", balance=False),
        Arm("moe-k2-half-nobal", "moe", 2, 0.5, "ablation: no balancing loss", balance=False),
    )
}


def model_config(preset: Preset, arm: Arm) -> ModelConfig:
    multiple = preset.n_experts if arm.width_multiple < 0 else arm.width_multiple
    return ModelConfig(
        seq_len=preset.seq_len, d_model=preset.d_model, n_layers=preset.n_layers, n_heads=preset.n_heads,
        ffn=arm.ffn, d_ff=int(round(preset.d_ff * multiple)), n_experts=preset.n_experts, top_k=arm.top_k,
        renormalize=default_renormalize(arm.top_k) if arm.ffn == "moe" else False,
        balance_loss_weight=preset.balance_loss_weight if arm.balance else 0.0,
        z_loss_weight=preset.z_loss_weight,
    )


def preset_table(preset: Preset) -> "pd.DataFrame":
    """The preset's settings, one row each, for the book."""
    import pandas as pd

    rows = [(field.name, str(getattr(preset, field.name))) for field in dataclasses.fields(preset)]
    rows.append(("tokens per step", str(preset.tokens_per_step)))
    rows.append(("tokens per run", f"{preset.steps * preset.tokens_per_step:,}"))
    return pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting")


def arms_table(preset: Preset, arm_names: Optional[Sequence[str]] = None) -> "pd.DataFrame":
    """Each arm's FFN, k, width and parameter counts under `preset`."""
    import pandas as pd

    rows = []
    for name in arm_names or ARMS:
        arm, cfg = ARMS[name], model_config(preset, ARMS[name])
        counts = parameter_counts(cfg)
        rows.append({"arm": name, "comparison": arm.comparison, "FFN": cfg.ffn,
                     "k": cfg.top_k if cfg.is_moe else "", "F": cfg.d_ff,
                     "experts": cfg.n_experts if cfg.is_moe else "",
                     "renormalise": cfg.renormalize if cfg.is_moe else "",
                     "balancing loss weight": cfg.balance_loss_weight if cfg.is_moe else "",
                     "FFN parameters (total)": f"{counts['ffn_total']:,}",
                     "FFN parameters (active per token)": f"{counts['ffn_active']:,}",
                     "all parameters (total)": f"{counts['total']:,}"})
    return pd.DataFrame(rows).set_index("arm")


def checkpoint_path(preset: Preset, arm_name: str, seed: int, results_dir=None) -> Path:
    return records.results_root(results_dir) / "checkpoints" / preset.name / f"{arm_name}-seed{seed}.pt"


def batch_offsets(n_bytes: int, seq_len: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch_size) start offsets of the training windows: the data order of seed `seed`,
    the same for every arm. Each window is seq_len + 1 bytes (inputs and shifted targets)."""
    rng = np.random.default_rng([seed, 0xDA7A])
    return rng.integers(0, n_bytes - seq_len - 1, size=(steps, batch_size))


def make_batch(data: np.ndarray, offsets: np.ndarray, seq_len: int, device: str = "cpu"):
    windows = np.stack([data[o:o + seq_len + 1] for o in offsets]).astype(np.int64)
    tensor = torch.from_numpy(windows).to(device)
    return tensor[:, :-1], tensor[:, 1:]


def learning_rate(step: int, preset: Preset) -> float:
    """Linear warm-up, then cosine from the peak down to min_lr_ratio * peak."""
    peak = preset.learning_rate
    if step < preset.warmup_steps:
        return peak * (step + 1) / preset.warmup_steps
    progress = (step - preset.warmup_steps) / max(1, preset.steps - preset.warmup_steps)
    return peak * (preset.min_lr_ratio + (1 - preset.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: ByteTransformer, preset: Preset) -> torch.optim.Optimizer:
    """AdamW; matrices (and the embedding) decay, LayerNorm parameters don't."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": preset.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=preset.learning_rate, betas=(0.9, 0.95), eps=1e-8)


def _device_kind(device: str) -> str:
    return "gpu" if str(device).startswith("cuda") else "cpu"


def run_params(preset: Preset, arm: Arm, seed: int, cfg: ModelConfig, run_id: str, checkpoint: str,
               steps: int, manifest: dict) -> dict:
    """The `params` of every record a run writes."""
    return {
        "preset": preset.name, "arm": arm.name, "seed": seed, "run_id": run_id,
        "comparison": arm.comparison, "balance": arm.balance,
        "model": dataclasses.asdict(cfg), "parameters": parameter_counts(cfg),
        "steps": steps, "batch_size": preset.batch_size, "seq_len": preset.seq_len,
        "tokens_per_step": preset.tokens_per_step, "learning_rate": preset.learning_rate,
        "warmup_steps": preset.warmup_steps, "min_lr_ratio": preset.min_lr_ratio,
        "weight_decay": preset.weight_decay, "grad_clip": preset.grad_clip, "optimizer": "AdamW(0.9, 0.95)",
        "threads": torch.get_num_threads(), "torch_device": preset.device,
        "checkpoint": checkpoint, "corpus_sha256": manifest["sha256"], "corpus_python": manifest["python"],
    }


def train_one(preset: Preset, arm: Arm, seed: int, *, data: corpus.Corpus, results_dir=None,
              steps: Optional[int] = None, progress: bool = True) -> dict:
    """Train one (arm, seed), save its checkpoint, write its records; return the eval record."""
    from tqdm import tqdm  # plain text bar: also right in a log file and inside a notebook

    steps = preset.steps if steps is None else steps
    preset = dataclasses.replace(preset, steps=steps)
    device = preset.device
    cfg = model_config(preset, arm)
    torch.manual_seed(seed)
    model = ByteTransformer(cfg).to(device)
    optimizer = make_optimizer(model, preset)
    train_bytes = data["train"]
    offsets = batch_offsets(train_bytes.size, preset.seq_len, preset.batch_size, steps, seed)
    run_id = uuid.uuid4().hex[:12]
    path = checkpoint_path(preset, arm.name, seed, results_dir)
    relative = path.relative_to(records.results_root(results_dir)).as_posix()
    params = run_params(preset, arm, seed, cfg, run_id, relative, steps, data.manifest)

    log, interval = [], _Interval(cfg)
    seconds = 0.0
    model.train()
    bar = tqdm(range(steps), desc=f"{preset.name} {arm.name} seed{seed}", disable=not progress,
               mininterval=5.0, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, preset)
        inputs, targets = make_batch(train_bytes, offsets[step], preset.seq_len, device)
        out = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), preset.grad_clip)
        optimizer.step()
        interval.add(out)
        seconds += time.perf_counter() - started
        if (step + 1) % preset.log_every == 0 or step + 1 == steps:
            entry = {"params": params, "step": step + 1, "tokens": (step + 1) * preset.tokens_per_step,
                     "seconds": seconds, "learning_rate": learning_rate(step, preset), **interval.summary()}
            if preset.val_every and ((step + 1) % preset.val_every == 0 or step + 1 == steps):
                validation = evaluation.evaluate_model(model, data["validation"], batch_size=preset.batch_size,
                                                     max_bytes=preset.val_bytes)
                entry["validation_bits_per_byte"] = validation["bits_per_byte"]
                model.train()
            log.append(entry)
            bar.set_postfix(loss=f"{entry['train_loss']:.3f}", refresh=False)
            interval = _Interval(cfg)
    bar.close()

    round_to_checkpoint(model)  # evaluate exactly the weights the checkpoint holds
    test = evaluation.evaluate_model(model, data["test"], batch_size=preset.batch_size, max_bytes=preset.eval_bytes)
    meta = {"preset": preset.name, "arm": arm.name, "seed": seed, "run_id": run_id, "steps": steps,
            "tokens": steps * preset.tokens_per_step, "train_seconds": seconds,
            "batch_size": preset.batch_size, "eval_bytes": preset.eval_bytes,
            "corpus": data.manifest, "test": test}
    save_checkpoint(path, model.cpu(), meta)
    eval_record = {"params": {**params, "split": "test", "eval_bytes": preset.eval_bytes},
                  "tokens": steps * preset.tokens_per_step, "train_seconds": seconds,
                  "seconds_per_step": seconds / steps, "checkpoint_bytes": path.stat().st_size,
                  "final_train_loss": log[-1]["train_loss"], **test}
    try:
        records.write_records(TRAIN_LOG_KIND, log, device_kind=_device_kind(device), results_dir=results_dir)
        records.write_records(EVAL_KIND, [eval_record], device_kind=_device_kind(device), results_dir=results_dir)
    except Exception:
        # A checkpoint without its records would be retrained on every retry
        # (completed runs need both): leave neither behind.
        path.unlink(missing_ok=True)
        raise
    return eval_record


class _Interval:
    """Running sums between two log lines: losses and per-layer expert counts."""

    def __init__(self, cfg: ModelConfig):
        self.cfg, self.n, self.loss, self.balance, self.z = cfg, 0, 0.0, 0.0, 0.0
        self.counts = None

    def add(self, out) -> None:
        self.n += 1
        self.loss += float(out.loss.detach())
        self.balance += float(out.balance_loss)
        self.z += float(out.z_loss)
        if out.routing:
            counts = np.stack([np.bincount(r.experts.reshape(-1).cpu().numpy(), minlength=self.cfg.n_experts)
                               for r in out.routing])
            self.counts = counts if self.counts is None else self.counts + counts

    def summary(self) -> dict:
        loss = self.loss / max(1, self.n)
        summary = {"train_loss": loss, "train_bits_per_byte": loss / math.log(2)}
        if self.cfg.is_moe:
            summary["balance_loss"] = self.balance / max(1, self.n)
            summary["z_loss"] = self.z / max(1, self.n)
            summary["load_fraction"] = (self.counts / self.counts.sum(axis=1, keepdims=True)).tolist()
        return summary


# ---------------------------------------------------------------- many runs


def completed_runs(preset_name: str, results_dir=None) -> set:
    """(arm, seed) pairs of ``preset_name`` whose checkpoint exists and whose eval record matches it."""
    done = set()
    for record in evaluation.eval_records(results_dir, preset=preset_name):
        params = record["params"]
        path = records.results_root(results_dir) / params["checkpoint"]
        if path.is_file():
            meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
            if meta.get("run_id") == params["run_id"]:
                done.add((params["arm"], int(params["seed"])))
    return done


def use_threads(preset: Preset) -> int:
    """Set torch's CPU threads to the preset's (CPU presets only); return the count in use.
    Small models run many tiny operations: on a shared 2-core machine a second thread
    waiting at every operation's barrier costs more than it gives, hence 1 for `tiny`."""
    if preset.device == "cpu":
        torch.set_num_threads(preset.threads)
    return torch.get_num_threads()


def train_all(preset: Preset, arm_names: Sequence[str], seeds: Sequence[int], *, results_dir=None,
              steps: Optional[int] = None, force: bool = False, progress: bool = True,
              echo=print) -> list:
    """Train every (arm, seed) not already done; return their eval records."""
    use_threads(preset)
    data = corpus.load_corpus()
    done = set() if force else completed_runs(preset.name, results_dir)
    results = []
    plan = [(arm, seed) for seed in seeds for arm in arm_names]
    for index, (arm_name, seed) in enumerate(plan, start=1):
        if (arm_name, seed) in done:
            echo(f"[{index}/{len(plan)}] {arm_name} seed {seed}: done already, skipped")
            continue
        started = time.perf_counter()
        eval_record = train_one(preset, ARMS[arm_name], seed, data=data, results_dir=results_dir,
                                steps=steps, progress=progress)
        echo(f"[{index}/{len(plan)}] {arm_name} seed {seed}: test {eval_record['bits_per_byte']:.4f} bits/byte, "
             f"accuracy {eval_record['accuracy']:.4f}, {time.perf_counter() - started:.0f} s")
        results.append(eval_record)
    return results


def estimate(preset: Preset, arm_names: Sequence[str], *, measure_steps: int = 8, warmup_steps: int = 2) -> dict:
    """Seconds per training step of each arm (median of `measure_steps` after warm-up)."""
    use_threads(preset)
    data = corpus.load_corpus()["train"]
    offsets = batch_offsets(data.size, preset.seq_len, preset.batch_size, measure_steps + warmup_steps, 0)
    per_step = {}
    for name in arm_names:
        torch.manual_seed(0)
        model = ByteTransformer(model_config(preset, ARMS[name])).to(preset.device)
        optimizer = make_optimizer(model, preset)
        times = []
        for step in range(measure_steps + warmup_steps):
            started = time.perf_counter()
            inputs, targets = make_batch(data, offsets[step], preset.seq_len, preset.device)
            out = model(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            (out.loss + out.aux_loss).backward()
            optimizer.step()
            if step >= warmup_steps:
                times.append(time.perf_counter() - started)
        per_step[name] = float(np.median(times))
    return per_step


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.study.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--arms", default="all", help=f"comma-separated, or 'all' ({', '.join(ARMS)})")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: $MOE_RESULTS_DIR or results/")
    parser.add_argument("--device", default=None, help="torch device (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    parser.add_argument("--force", action="store_true", help="retrain runs that are done already")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--estimate", action="store_true", help="time a few steps per arm and print the plan")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    overrides = {key: value for key, value in (("device", args.device), ("threads", args.threads)) if value is not None}
    if args.steps is not None:
        overrides["steps"] = args.steps
    preset = dataclasses.replace(preset, **overrides)
    arm_names = list(ARMS) if args.arms == "all" else [name.strip() for name in args.arms.split(",") if name.strip()]
    unknown = [name for name in arm_names if name not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; the arms are {list(ARMS)}")
    seeds = list(preset.seeds) if args.seeds is None else [int(s) for s in args.seeds.split(",")]

    if args.estimate:
        per_step = estimate(preset, arm_names)
        total = 0.0
        for name, seconds in per_step.items():
            run = seconds * preset.steps
            total += run * len(seeds)
            print(f"{name:>18}: {seconds * 1e3:7.1f} ms/step -> {run / 60:6.1f} min per seed")
        print(f"{len(arm_names)} arms x {len(seeds)} seeds x {preset.steps} steps "
              f"({preset.steps * preset.tokens_per_step:,} tokens each): about {total / 60:.0f} min of training")
        return 0

    started = time.perf_counter()
    results = train_all(preset, arm_names, seeds, results_dir=args.results_dir,
                        force=args.force, progress=not args.no_progress)
    print(f"trained {len(results)} run(s) in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def train_scratch(preset_name: str = "tiny", *, arms: Optional[Sequence[str]] = None) -> Path:
    """Train a preset from scratch into a fresh temporary results folder and return it:
    the chapters' scratch mode (their tiny-parameter runs), which never touches results/."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"moe-accuracy-{preset_name}-"))
    preset = PRESETS[preset_name]
    train_all(preset, list(arms or ARMS), list(preset.seeds), results_dir=folder, progress=False,
              echo=lambda message: None)
    return folder
