"""The paper's five model configurations (Table 2) under synthetic Zipf routing: projected gains."""

from __future__ import annotations

import platform

from .cost import CostModel, ModelShape
from .counts import synthetic_counts
from .simulate import format_results, simulate

# Paper Table 2 (16 or 32 H100s; PP = nodes, DP 8, EP 4, MicroEP d = 2).
PAPER_MODELS = (
    ModelShape("GPT 32x1.3B", 24, 2048, 8192, 2048, 32, 2, 4, 512, 16, 2, 4),
    ModelShape("GPT 16x3.2B", 16, 4096, 16384, 2048, 16, 2, 2, 512, 16, 2, 4),
    ModelShape("GPT 8x6.7B", 32, 4096, 16384, 2048, 8, 2, 2, 512, 32, 4, 4),
    ModelShape("Mixtral 16x2B", 32, 2048, 8192, 4096, 16, 2, 2, 256, 16, 2, 4, swiglu=True),
    ModelShape("Mixtral 8x7B", 32, 4096, 14336, 4096, 8, 2, 1, 256, 32, 4, 4, swiglu=True),
)
PAPER_SKEWS = (0.5, 1.0, 1.5)
PAPER_REPORTED = {"average_gain_pct": 36.9, "max_gain_pct": 47.6,
                  "baseline": "Megatron-LM, measured end to end on 4 nodes x 8 H100 (paper Fig. 7)"}


def bench_paper(micro_batches: int = 24, variability: float = 0.3, cost: CostModel | None = None,
                skews=PAPER_SKEWS, models=PAPER_MODELS, seed: int = 0, progress=None) -> dict:
    """Every (model, Zipf skew, strategy): MoE-layer and projected step time, gain over vanilla EP.

    One pipeline stage's data-parallel ranks (DP = 8 = one MicroEP group of 2 x EP 4) are simulated;
    each GPU routes ``micro_batch x seq_len x top_k`` token-expert pairs per micro-batch.
    ``cost``: one model for every shape, or a callable ``shape -> CostModel`` (e.g. measured GPU
    GEMMs read at each model's tokens per GPU); default ``CostModel()``.
    """
    cost_for = cost if callable(cost) else (lambda shape, fixed=cost or CostModel(): fixed)
    rows, described = [], []
    for shape in models:
        cost = cost_for(shape)
        described += [line for line in cost.describe() if line not in described]
        for skew in skews:
            counts = synthetic_counts("zipf", skew, shape.dp, shape.num_experts, shape.tokens_per_gpu * shape.top_k,
                                      micro_batches, variability=variability, seed=seed)
            for result in simulate(counts, shape, cost, seed=seed):
                rows.append({"model": shape.name, "zipf_s": skew, **result.to_json()})
            if progress:
                gains = {r["strategy"]: r["gain_vs_vanilla_pct"] for r in rows
                         if r["model"] == shape.name and r["zipf_s"] == skew}
                progress(f"  {shape.name:<14} s={skew}: MicroEP {gains['MicroEP (symmetric)']:+.1f}%, adaptive "
                         f"{gains['MicroEP (adaptive)']:+.1f}% vs vanilla EP")
    micro = [r["gain_vs_vanilla_pct"] for r in rows if r["strategy"] == "MicroEP (symmetric)"]
    adaptive = [r["gain_vs_vanilla_pct"] for r in rows if r["strategy"] == "MicroEP (adaptive)"]
    return {"benchmark": "paper", "micro_batches": micro_batches, "variability": variability,
            "cost_model": described, "machine": f"{platform.machine()} {platform.python_version()}",
            "paper": PAPER_REPORTED,
            "micro_ep_gain_pct": {"average": sum(micro) / len(micro), "max": max(micro)},
            "adaptive_gain_pct": {"average": sum(adaptive) / len(adaptive), "max": max(adaptive)}, "rows": rows}


def format_paper(result: dict) -> str:
    from .simulate import StrategyResult

    lines = [*result["cost_model"],
             f"  routing: Zipf(s) over a random expert order, {result['variability']:.0%} of each micro-batch's "
             f"popularity redrawn, {result['micro_batches']} micro-batches per point", ""]
    models = dict.fromkeys(r["model"] for r in result["rows"])
    for model in models:
        for skew in dict.fromkeys(r["zipf_s"] for r in result["rows"] if r["model"] == model):
            chosen = [r for r in result["rows"] if r["model"] == model and r["zipf_s"] == skew]
            lines.append(f"{model}, Zipf s = {skew}")
            fields = StrategyResult.__dataclass_fields__
            lines.append(format_results([StrategyResult(**{k: r[k] for k in fields}) for r in chosen]))
            lines.append("")
    gains = result["micro_ep_gain_pct"]
    lines.append(f"MicroEP (symmetric) projected step-time gain over vanilla EP: average {gains['average']:+.1f}%, "
                 f"max {gains['max']:+.1f}%")
    if "adaptive_gain_pct" in result:
        adaptive = result["adaptive_gain_pct"]
        lines.append(f"MicroEP (adaptive re-placement, migration charged) projected gain: average "
                     f"{adaptive['average']:+.1f}%, max {adaptive['max']:+.1f}%")
    paper = result["paper"]
    lines.append(f"paper reports: average +{paper['average_gain_pct']}%, max +{paper['max_gain_pct']}% over "
                 f"{paper['baseline']}")
    return "\n".join(lines)
