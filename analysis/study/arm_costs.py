"""What each accuracy arm costs on this CPU, at the accuracy models' own shape.

    python -m analysis.study.arm_costs                 # preset cpu, 10 rounds, writes arm-cost records
    python -m analysis.study.arm_costs --rounds 3 --dry-run

The speed chapters time a layer of D = 512; the accuracy models have d_model = 64.
This joins the two: for every main arm of the accuracy study it times, at the
preset's own shape and batch (batch_size x seq_len tokens),

- one **training step** of the whole model (forward, backward, AdamW), as
  ``train.train_one`` runs it, on the preset's torch threads;
- the arm's **FFN layer through the kernels**: ``topk_moe.moe_forward`` (or
  ``topk_moe.dense_mlp``) on the ``cpu`` backend, float32, on the batch's tokens;
- the same FFN layer's **torch forward**, the module the training step runs.

The machine may be shared while this runs, so the arms are measured *paired*:
every round times each arm once, one after the other in one process, in an order
that rotates from round to round. Load that comes and goes then hits every arm of a
round alike, and a ratio of two arms within a round cancels it; the chapters give
each arm's median over rounds and its ratio to ``moe-k1`` with a 95% interval over
rounds. The load average before each round goes into its records.

Weights are freshly initialised (the time of a layer does not depend on the trained
values, except through the balance of the routing: a fresh router spreads tokens
almost evenly, as the balanced trained arms do).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch

import topk_moe
from analysis import records
from analysis.measure.timing import time_function
from analysis.study import corpus, train
from analysis.study.moe_model import ByteTransformer, MoELayer, parameter_counts

KIND = "arm-cost"
#: The accuracy study's main arms (the -nobal ablations cost what their balanced arms cost).
ARMS = ("dense", "moe-k1", "moe-k2-half", "moe-k2", "dense-wide")
#: Timed calls of each measurement within a round (after one untimed call); the round's value is their median.
CALLS_PER_ROUND = 3


def forward_flops_per_token(counts: dict, n_layers: int, d_model: int, seq_len: int) -> float:
    """Forward multiply-adds x 2 per token: 2 x the active weights a token meets (the
    embedding as the tied output projection, attention and FFN projections, router),
    plus causal attention's scores and weighted sum (2 x 2 x d_model x seq_len / 2 per
    layer, on average over positions)."""
    weights = counts["active"]
    attention_mixing = n_layers * 2 * d_model * seq_len  # QK^T and AV, each d_model x seq_len/2 on average
    return 2.0 * (weights + attention_mixing)


class _ArmBench:
    """One arm's model, optimiser, batches and FFN-layer inputs, ready to time."""

    def __init__(self, preset: train.Preset, arm_name: str, data: np.ndarray, seed: int = 0):
        self.arm = train.ARMS[arm_name]
        self.cfg = train.model_config(preset, self.arm)
        torch.manual_seed(seed)
        self.model = ByteTransformer(self.cfg)
        self.optimizer = train.make_optimizer(self.model, preset)
        self.offsets = train.batch_offsets(data.size, preset.seq_len, preset.batch_size, 64, seed)
        self.data, self.preset, self.step_index = data, preset, 0
        tokens = preset.batch_size * preset.seq_len
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((tokens, preset.d_model)).astype(np.float32)
        self.x_torch = torch.from_numpy(self.x)
        ffn = self.model.blocks[0].ffn
        self.torch_ffn = ffn
        if isinstance(ffn, MoELayer):
            self.moe_cfg = topk_moe.MoEConfig(d_model=self.cfg.d_model, d_ff=self.cfg.d_ff,
                                              n_experts=self.cfg.n_experts, top_k=self.cfg.top_k,
                                              activation=self.cfg.activation, renormalize=self.cfg.renormalize)
            self.moe_weights = topk_moe.init_weights(self.moe_cfg, seed=seed)
        else:
            self.moe_cfg = None
            self.dense_weights = [w.detach().numpy().copy() for w in (ffn.w1, ffn.w2, ffn.w3)]

    def train_step(self) -> None:
        offsets = self.offsets[self.step_index % len(self.offsets)]
        self.step_index += 1
        inputs, targets = train.make_batch(self.data, offsets, self.preset.seq_len, self.preset.device)
        out = self.model(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        (out.loss + out.aux_loss).backward()
        self.optimizer.step()

    def kernels_layer(self) -> None:
        if self.moe_cfg is not None:
            topk_moe.moe_forward(self.x, self.moe_weights, self.moe_cfg, backend="cpu")
        else:
            w1, w2, w3 = self.dense_weights
            topk_moe.dense_mlp(self.x, w1, w2, w3, activation=self.cfg.activation, backend="cpu")

    def torch_layer(self) -> None:
        with torch.no_grad():
            self.torch_ffn(self.x_torch)


def measure(preset_name: str = "cpu", *, rounds: int = 10, arms: Sequence[str] = ARMS) -> list:
    """The records: one per (round, arm), each with its three timings (``Timing.as_dict``)."""
    if rounds < 2:
        raise ValueError(f"rounds: expected at least 2 (the ratio's interval needs two), got {rounds}")
    unknown = [a for a in arms if a not in train.ARMS]
    if unknown:
        raise ValueError(f"arms: unknown {unknown}; the arms are {list(train.ARMS)}")
    preset = train.PRESETS[preset_name]
    threads = train.use_threads(preset)
    data = corpus.load_corpus()["train"]
    benches = {name: _ArmBench(preset, name, data) for name in arms}
    for bench in benches.values():  # first touch, allocator and BLAS start-up, outside the rounds
        bench.train_step(), bench.kernels_layer(), bench.torch_layer()
    out = []
    for round_index in range(rounds):
        load = os.getloadavg()[0]
        shift = round_index % len(arms)
        order = list(arms[shift:]) + list(arms[:shift])
        for position, name in enumerate(order):
            bench = benches[name]
            timings = {what: time_function(fn, warmup=1, repeats=CALLS_PER_ROUND).as_dict()
                       for what, fn in (("train_step", bench.train_step), ("kernels_layer", bench.kernels_layer),
                                        ("torch_layer", bench.torch_layer))}
            counts = parameter_counts(bench.cfg)
            out.append({
                "params": {"preset": preset_name, "arm": name, "round": round_index, "position_in_round": position,
                           "tokens": preset.batch_size * preset.seq_len, "d_model": bench.cfg.d_model,
                           "d_ff": bench.cfg.d_ff, "n_experts": bench.cfg.n_experts, "top_k": bench.cfg.top_k,
                           "ffn": bench.cfg.ffn, "activation": bench.cfg.activation, "n_layers": bench.cfg.n_layers,
                           "seq_len": bench.cfg.seq_len, "torch_threads": threads, "dtype": "float32",
                           "calls_per_round": CALLS_PER_ROUND, "load_average_1min": load},
                "parameters": counts,
                "forward_flops_per_token": forward_flops_per_token(counts, bench.cfg.n_layers, bench.cfg.d_model,
                                                                   bench.cfg.seq_len),
                "ffn_layer_flops_per_token": 2.0 * counts["ffn_active"] / bench.cfg.n_layers,
                **timings,
            })
        print(f"round {round_index + 1}/{rounds} (load {load:.1f}): " + ", ".join(
            f"{r['params']['arm']} {1e3 * r['train_step']['median_s']:.0f} ms" for r in out[-len(arms):]),
            file=sys.stderr)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(train.PRESETS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    out = measure(args.preset, rounds=args.rounds, arms=arms)
    if not args.dry_run:
        path = records.write_records(KIND, out, device_kind="cpu", results_dir=args.results_dir)
        print(f"wrote {len(out)} records to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
