"""``micromoe analyze``: GPU max/mean per layer and micro-batch under vanilla EP and under MicroEP."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core import placement as placements
from ..core.loads import max_over_mean
from .counts import RoutingCounts, TraceError
from .hindsight import hindsight_bounds
from .strategies import AdaptiveReplicaLP, ReplicaLP, VanillaEP

PERCENTILES = (50, 90, 99)


def analyze(counts: RoutingCounts, ep: int, micro_ep: int, placement: str = "symmetric", seed: int = 0,
            gpus_per_node: int | None = None, progress=None, replacement_interval: int = 1,
            replacement_threshold: float = 0.0, bounds: bool = False) -> dict:
    """Per layer: the distribution over micro-batches of GPU max/mean tokens, both ways.

    The traced GPUs are taken in groups of ``F = micro_ep x EP`` consecutive ranks (Megatron's rank
    order with TP = 1: EP groups are consecutive); a micro-batch's max/mean is over all GPUs.

    ``placement="adaptive"`` replays the trace causally: every group starts symmetric, each
    micro-batch is planned on the current placement before its counts are recorded, and every
    ``replacement_interval`` micro-batches the group may re-place from what it has seen
    (``ReplacementPolicy`` with ``replacement_threshold``). Rows then count the re-placements and
    the slots moved, and give the steady state apart: ``steady_micro_batches`` and
    ``micro_ep_steady_p50/p90/p99`` are over the micro-batches planned after every group's first
    re-placement (the rest ran on the symmetric start while the forecast warmed up); None when no
    micro-batch came after it.

    ``bounds=True`` (adaptive only) adds hindsight, non-causal bounds over the same steady
    micro-batches (``hindsight.py``): ``window_oracle_p50/p99`` (a placement per check interval
    searched from that interval's own counts), ``micro_batch_oracle_p50/p99`` (the best placement
    found per micro-batch), ``replica_floor_p50/p99`` (the floor of the replay's replica counts)
    and ``count_floor_p50/p99`` (the floor of the best replica counts per micro-batch: no placement
    does better). Slow: a placement search per check interval and per micro-batch.
    """
    num_gpus, num_experts = counts.num_gpus, counts.num_experts
    group = ep * micro_ep
    if ep < 1 or micro_ep < 1:
        raise TraceError(f"--ep and --micro-ep must be >= 1, got {ep} and {micro_ep}")
    if num_gpus % group:
        raise TraceError(f"--micro-ep {micro_ep} x --ep {ep} = {group} must divide the {num_gpus} traced GPUs")
    if num_experts % ep:
        raise TraceError(f"--ep {ep} must divide --experts {num_experts}")
    adaptive = placement == "adaptive"
    if adaptive and replacement_interval < 1:
        raise TraceError(f"--replacement-interval must be >= 1 micro-batch, got {replacement_interval}")
    if adaptive and replacement_threshold < 0:
        raise TraceError(f"--replacement-threshold must be >= 0, got {replacement_threshold}")
    if bounds and not adaptive:
        raise TraceError("--bounds: the hindsight bounds compare with the adaptive replay; add --placement adaptive")
    try:
        layout = placements.make_placement("symmetric" if adaptive else placement, group, num_experts, micro_ep,
                                           seed=seed)
    except placements.PlacementError as exc:
        choices = ", ".join([*placements.PLACEMENT_KINDS[:2], "adaptive"])
        raise TraceError(f"--placement: {exc} (analyze takes {choices})") from exc
    groups = [slice(s, s + group) for s in range(0, num_gpus, group)]
    layers, loads = [], {}
    for layer, array in sorted(counts.layers.items()):
        vanilla = VanillaEP(group, num_experts, ep)
        if adaptive:
            planners = [AdaptiveReplicaLP(layout, replacement_interval, replacement_threshold,
                                          gpus_per_node=gpus_per_node) for _ in groups]
        else:
            planners = [ReplicaLP("MicroEP", layout.holders, group, gpus_per_node) for _ in groups]
        before, after, steady, fallbacks = [], [], [], 0
        steady_steps, used = [], [[] for _ in groups]   # used[i][step]: group i's placement
        for step, tokens in enumerate(array):
            load_before = np.concatenate([vanilla.outcome(tokens[g]).load for g in groups])
            # Planned on a re-placed table in every group (re-placement comes after a micro-batch's plan).
            settled = adaptive and all(p.replacements for p in planners)
            if adaptive:
                for i, p in enumerate(planners):
                    used[i].append(p.policy.placement)
            outcomes = [p.outcome(tokens[g]) for p, g in zip(planners, groups)]
            load_after = np.concatenate([o.load for o in outcomes])
            fallbacks += sum(o.fallback for o in outcomes)
            before.append(max_over_mean(load_before))
            after.append(max_over_mean(load_after))
            if settled:
                steady.append(after[-1])
                steady_steps.append(step)
            loads[(layer, step)] = (load_before, load_after)
        row = {"layer": layer, "micro_batches": len(array), "fallbacks": fallbacks}
        if adaptive:
            row["replacements"] = sum(p.policy.replacements for p in planners)
            row["slots_moved"] = sum(p.policy.slots_moved for p in planners)
            row["steady_micro_batches"] = len(steady)
            for q in PERCENTILES:
                row[f"micro_ep_steady_p{q}"] = float(np.percentile(steady, q)) if steady else None
        if bounds:
            if progress:
                progress(f"  layer {layer}: hindsight bounds over {len(steady_steps)} steady micro-batches")
            hindsight = hindsight_bounds(array, groups, used, steady_steps, replacement_interval, progress=progress)
            for name, values in hindsight.items():
                for q in (50, 99):
                    row[f"{name}_p{q}"] = float(np.percentile(values, q)) if values else None
            row["series_bounds"] = hindsight
        for name, values in (("vanilla", before), ("micro_ep", after)):
            for q in PERCENTILES:
                row[f"{name}_p{q}"] = float(np.percentile(values, q))
            row[f"{name}_mean"] = float(np.mean(values))
        row["series"] = {"vanilla": before, "micro_ep": after, **({"steady": steady} if adaptive else {})}
        layers.append(row)
        if progress:
            progress(f"  layer {layer}: {len(array)} micro-batches, max/mean p50 {row['vanilla_p50']:.3f} -> "
                     f"{row['micro_ep_p50']:.3f}")
    overall = {f"{name}_p{q}": float(np.percentile([v for r in layers for v in r["series"][name]], q))
               for name in ("vanilla", "micro_ep") for q in PERCENTILES}
    if adaptive:
        steady = [v for r in layers for v in r["series"]["steady"]]
        overall.update({f"micro_ep_steady_p{q}": float(np.percentile(steady, q)) if steady else None
                        for q in PERCENTILES})
    return {"gpus": num_gpus, "experts": num_experts, "ep": ep, "micro_ep": micro_ep, "placement": placement,
            "group_size": group, "layers": layers, "overall": overall, "_loads": loads,
            **({"replacement_interval": replacement_interval, "replacement_threshold": replacement_threshold}
               if adaptive else {}), **({"bounds": True} if bounds else {})}


def public_json(result: dict) -> dict:
    """The JSON shape ``micromoe analyze --json`` prints (no per-step series or loads)."""
    out = {k: v for k, v in result.items() if not k.startswith("_")}
    out["layers"] = [{k: v for k, v in row.items() if not k.startswith("series")} for row in result["layers"]]
    return out


def format_analysis(result: dict) -> str:
    adaptive = "replacement_interval" in result
    lines = [f"{result['gpus']} GPUs, {result['experts']} experts, EP {result['ep']}, MicroEP d = {result['micro_ep']} "
             f"({result['placement']} placement, groups of {result['group_size']} GPUs"
             + (f", re-placement check every {result['replacement_interval']} micro-batches, threshold "
                f"{result['replacement_threshold']}" if adaptive else "") + ")",
             "GPU max/mean tokens per micro-batch:",
             f"{'layer':>5} {'micro-batches':>13} | {'vanilla EP p50':>14} {'p90':>6} {'p99':>6} | "
             f"{'MicroEP p50':>11} {'p90':>6} {'p99':>6} | fallbacks"
             + (f" | {'re-placements (slots moved)':<27} | {'steady n':>8} {'p50':>6} {'p99':>6}" if adaptive else "")]
    for row in result["layers"]:
        lines.append(f"{row['layer']:>5} {row['micro_batches']:>13} | {row['vanilla_p50']:>14.3f} "
                     f"{row['vanilla_p90']:>6.3f} {row['vanilla_p99']:>6.3f} | {row['micro_ep_p50']:>11.3f} "
                     f"{row['micro_ep_p90']:>6.3f} {row['micro_ep_p99']:>6.3f} | {row['fallbacks']:>9}"
                     + (f" | {str(row['replacements']) + ' (' + str(row['slots_moved']) + ')':<27} | "
                        f"{row['steady_micro_batches']:>8} {_ratio(row['micro_ep_steady_p50'])} "
                        f"{_ratio(row['micro_ep_steady_p99'])}" if adaptive else ""))
    o = result["overall"]
    lines.append(f"{'all':>5} {'':>13} | {o['vanilla_p50']:>14.3f} {o['vanilla_p90']:>6.3f} {o['vanilla_p99']:>6.3f} | "
                 f"{o['micro_ep_p50']:>11.3f} {o['micro_ep_p90']:>6.3f} {o['micro_ep_p99']:>6.3f} |"
                 + (f"{'':>10} | {'':<27} | {'':>8} {_ratio(o['micro_ep_steady_p50'])} "
                    f"{_ratio(o['micro_ep_steady_p99'])}" if adaptive else ""))
    if adaptive:
        lines.append("MicroEP p50/p90/p99: every micro-batch, the warm-up on the symmetric start included. Steady: "
                     "only the n micro-batches planned after every group's first re-placement.")
    if result.get("bounds"):
        lines += _format_bounds(result)
    return "\n".join(lines)


BOUND_COLUMNS = (("micro_ep_steady", "adaptive (causal)"), ("window_oracle", "window oracle"),
                 ("micro_batch_oracle", "micro-batch oracle"), ("replica_floor", "replica floor"),
                 ("count_floor", "count floor"))


def _format_bounds(result: dict) -> list[str]:
    lines = ["HINDSIGHT bounds (non-causal: they use counts the replay could not have seen), GPU max/mean p50 p99 "
             "over the steady micro-batches:",
             f"{'layer':>5} {'steady n':>8} | " + " | ".join(f"{title:>18}" for _, title in BOUND_COLUMNS)]
    for row in result["layers"]:
        cells = [f"{_ratio(row[f'{name}_p50'])} {_ratio(row[f'{name}_p99'])}    " for name, _ in BOUND_COLUMNS]
        lines.append(f"{row['layer']:>5} {row['steady_micro_batches']:>8} | " + " | ".join(f"{c:>18}" for c in cells))
    lines.append("window oracle: per check interval, the placement searched from the counts it will serve (best of "
                 "that search and the replay's placement); micro-batch oracle: the best placement found for each "
                 "micro-batch alone (a search, not a proof); replica floor: the busiest expert's tokens per replica "
                 "with the replay's replica counts; count floor: the same with the best counts per micro-batch, "
                 "which no placement with these slots beats.")
    return lines


def _ratio(value) -> str:
    return f"{value:>6.3f}" if value is not None else f"{'-':>6}"


def write_plots(result: dict, directory: str | Path, layer: int | None = None, step: int = 0) -> list[Path]:
    """Per-GPU load before/after for one (layer, micro-batch), and the imbalance distribution per layer."""
    from .plots import plot_imbalance_distribution, plot_load_per_gpu

    directory = Path(directory)
    layer = result["layers"][0]["layer"] if layer is None else layer
    if (layer, step) not in result["_loads"]:
        raise TraceError(f"--plot-layer {layer} --plot-step {step}: no such layer and micro-batch in the input")
    before, after = result["_loads"][(layer, step)]
    paths = [plot_load_per_gpu(before, after, directory / f"load_per_gpu_layer{layer}_step{step}.png",
                               f"layer {layer}, micro-batch {step}: tokens per GPU")]
    series = {r["layer"]: (np.array(r["series"]["vanilla"]), np.array(r["series"]["micro_ep"]))
              for r in result["layers"]}
    paths.append(plot_imbalance_distribution(series, directory / "imbalance_per_layer.png",
                                             "GPU max/mean per micro-batch"))
    return paths
