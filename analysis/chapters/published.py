"""Published figures the book places beside its own numbers: one table, with citations.

These are other people's measurements, of models hundreds to thousands of
times larger than this study's, trained on far more data. The book shows them
labelled as published, never as ours, to say whether our small models point
the same way; their magnitudes are not comparable with ours.

Each entry: ``chapter`` (accuracy or routing), ``source`` (short name),
``n_experts`` (E of the published model, where our comparison needs it),
``citation``, ``where`` (table), ``quantity``, ``setting``, ``value``
(a number, or None where the paper states a range or a qualitative result,
then ``value_text`` holds it), ``baseline`` (the value it is to be read
against, where there is one) and ``compare_with`` (which of our measurements
it sits beside).
"""

from __future__ import annotations

import pandas as pd

SWITCH = ("Fedus, Zoph, Shazeer. Switch Transformers: Scaling to Trillion Parameter Models with "
          "Simple and Efficient Sparsity. JMLR 2022 (arXiv:2101.03961)")
DEEPSEEKMOE = ("Dai et al. DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts "
               "Language Models. 2024 (arXiv:2401.06066)")
ST_MOE = ("Zoph et al. ST-MoE: Designing Stable and Transferable Sparse Expert Models. 2022 "
          "(arXiv:2202.08906)")
SHAZEER = ("Shazeer et al. Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts "
           "Layer. ICLR 2017 (arXiv:1701.06538)")
MIXTRAL = "Jiang et al. Mixtral of Experts. 2024 (arXiv:2401.04088)"
VLLM = "vLLM project, fused MoE Triton kernel (vllm/model_executor/layers/fused_moe), tuned configurations for H100"
PYTORCH = "PyTorch, torch._grouped_mm (grouped GEMM for MoE experts)"

ANCHORS = [
    # ---- accuracy
    dict(chapter="accuracy", source="Switch Transformer", citation=SWITCH, where="Table 1",
         quantity="top-1 MoE vs dense at matched compute per token",
         setting="Switch-Base vs T5-Base, C4 span corruption",
         value=None, value_text="top-1 reaches a better quality than dense", baseline=None,
         compare_with="moe-k1 vs dense (equal active FLOPs)"),
    dict(chapter="accuracy", source="Switch Transformer", citation=SWITCH, where="Table 1",
         quantity="throughput of the top-1 MoE relative to dense",
         setting="Switch-Base vs T5-Base, examples per second on TPU",
         value=0.62, value_text="~0.62x", baseline=1.0,
         compare_with="speed chapters (not this one)"),
    dict(chapter="accuracy", source="DeepSeekMoE", citation=DEEPSEEKMOE, where="Table 1",
         quantity="Pile validation loss, dense", setting="2B-total-parameter validation models, 100B tokens",
         value=2.060, value_text="2.060", baseline=None, compare_with="dense"),
    dict(chapter="accuracy", source="DeepSeekMoE", citation=DEEPSEEKMOE, where="Table 1",
         quantity="Pile validation loss, top-1 (Switch)", setting="2B-total-parameter validation models, 100B tokens",
         value=1.881, value_text="1.881", baseline=2.060, compare_with="moe-k1"),
    dict(chapter="accuracy", source="DeepSeekMoE", citation=DEEPSEEKMOE, where="Table 1",
         quantity="Pile validation loss, top-2 (GShard)", setting="2B-total-parameter validation models, 100B tokens",
         value=1.867, value_text="1.867", baseline=1.881, compare_with="moe-k2 (equal expert size)"),
    dict(chapter="accuracy", source="ST-MoE", citation=ST_MOE, where="Table 8",
         quantity="top-2 over top-1 routing, gain in negative log perplexity",
         setting="T5-style sparse models, same capacity factor",
         value=None, value_text="about +0.004 to +0.006", baseline=None, compare_with="moe-k2 vs moe-k1"),
    # ---- routing
    dict(chapter="routing", source="Shazeer et al. 2017", citation=SHAZEER, where="Table 6",
         quantity="CV of expert load, no balancing loss", setting="MoE-256 LSTM language model (1B Word)",
         n_experts=256,
         value=3.01, value_text="3.01", baseline=None, compare_with="load CV of the -nobal arms"),
    dict(chapter="routing", source="Shazeer et al. 2017", citation=SHAZEER, where="Table 6",
         quantity="max/mean expert load, no balancing loss", setting="MoE-256 LSTM language model (1B Word)",
         n_experts=256,
         value=17.80, value_text="17.80", baseline=1.0, compare_with="load max/mean of the -nobal arms"),
    dict(chapter="routing", source="Shazeer et al. 2017", citation=SHAZEER, where="Table 6",
         quantity="CV of expert load, w_importance = w_load = 0.1", setting="MoE-256 LSTM language model (1B Word)",
         n_experts=256,
         value=0.05, value_text="0.05", baseline=None, compare_with="load CV of the balanced arms"),
    dict(chapter="routing", source="Shazeer et al. 2017", citation=SHAZEER, where="Table 6",
         quantity="max/mean expert load, w_importance = w_load = 0.1", setting="MoE-256 LSTM language model (1B Word)",
         n_experts=256,
         value=1.14, value_text="1.14", baseline=1.0, compare_with="load max/mean of the balanced arms"),
    dict(chapter="routing", source="Mixtral", citation=MIXTRAL, where="Table 5",
         quantity="consecutive tokens with the same first-choice expert",
         setting="Mixtral 8x7B (E = 8, k = 2) on The Pile, by layer and domain",
         value=None, value_text="23.6% to 28.4%", baseline=0.125,
         compare_with="same-expert rate of consecutive bytes (random: 1/E)"),
    # ---- GPU performance (figures as the study design quotes them; no GPU of ours has run yet)
    dict(chapter="performance", source="vLLM", citation=VLLM, where="tuned fused MoE, as quoted in the study design",
         quantity="fused MoE, fraction of HBM bandwidth", setting="H100, Mixtral shape, batch 1 (decode)",
         value=0.73, value_text="about 73%", baseline=None,
         compare_with="decode against the copy bandwidth on the expert weights"),
    dict(chapter="performance", source="PyTorch", citation=PYTORCH, where="as quoted in the study design",
         quantity="torch._grouped_mm rate", setting="H100, E = 128, k = 8",
         value=242.0, value_text="about 242 TFLOP/s", baseline=None,
         compare_with="expert GEMMs against cuBLAS on the same FLOPs"),
]


def anchors(chapter: str | None = None) -> pd.DataFrame:
    """The published figures, optionally those of one chapter, as a table to print."""
    table = pd.DataFrame(ANCHORS)
    if chapter is not None:
        table = table[table["chapter"] == chapter]
    table = table.assign(published=table["value_text"])
    return table[["source", "where", "quantity", "published", "setting", "compare_with", "citation"]].reset_index(drop=True)


def entry(source: str, quantity: str) -> dict:
    """One published figure's whole entry (a copy), by source and quantity."""
    for anchor in ANCHORS:
        if anchor["source"] == source and anchor["quantity"] == quantity:
            return dict(anchor)
    raise KeyError(f"no published figure for {source!r}: {quantity!r}")


def value(source: str, quantity: str) -> float:
    """One published number, by source and quantity (for computing ratios beside ours)."""
    number = entry(source, quantity)["value"]
    if number is None:
        raise KeyError(f"no published number for {source!r}: {quantity!r} (a range or a statement: use text())")
    return float(number)


def text(source: str, quantity: str) -> str:
    """One published figure as the paper states it (a range or a qualitative result included)."""
    return entry(source, quantity)["value_text"]
