"""Simulator, analysis and trace reading: invariants, round trips, plots, clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from micromoe_megatron.cli import main as micromoe
from micromoe_megatron.sim import analyze as analysis
from micromoe_megatron.sim.cost import CostModel
from micromoe_megatron.sim.counts import (
    RoutingCounts, TraceError, read_router_traces, read_routing, synthetic_counts, write_counts,
)
from micromoe_megatron.sim.paper import PAPER_MODELS, bench_paper
from micromoe_megatron.sim.simulate import simulate
from micromoe_megatron.sim.strategies import ReplicaLP, StaticReplication, VanillaEP, eplb_holders
from micromoe_megatron.core import placement

SHAPE = PAPER_MODELS[0]                      # GPT 32x1.3B: EP 4, d = 2 -> groups of 8 GPUs
FIXED_COST = CostModel(schedule_ms=0.5)      # deterministic: no wall-clock solve times


def small_counts(kind="zipf", skew=1.0, gpus=8, experts=32, micro_batches=8, layers=1, seed=0):
    return synthetic_counts(kind, skew, gpus, experts, 4096, micro_batches, num_layers=layers, seed=seed)


@pytest.mark.parametrize("kind", ["zipf", "lognormal", "forced-bias", "gaussian"])
@pytest.mark.parametrize("skew", [0.5, 1.5])
def test_ideal_bounds_every_strategy_and_micro_ep_never_loses_balance(kind, skew):
    results = {r.strategy: r for r in simulate(small_counts(kind, skew), SHAPE, FIXED_COST)}
    ideal = results.pop("force-balanced ideal")
    for r in results.values():
        assert ideal.layer_ms <= r.layer_ms + 1e-9 and ideal.step_ms <= r.step_ms + 1e-9, r.strategy
        assert ideal.compute_ms <= r.compute_ms + 1e-9 and ideal.imbalance_p50 <= r.imbalance_p50 + 1e-9
    vanilla = results["vanilla EP"]
    assert results["MicroEP (symmetric)"].imbalance_p99 <= vanilla.imbalance_p99 + 1e-9


def test_micro_ep_max_load_at_most_vanilla_on_every_zipf_micro_batch():
    """Not a theorem for every placement (vanilla's homes need not be holders under the symmetric
    placement), but on skewed routing the LP never loses to vanilla EP: checked per micro-batch."""
    counts = small_counts(skew=1.2, micro_batches=20).layers[1]
    vanilla = VanillaEP(8, 32, 4)
    micro = ReplicaLP("MicroEP", placement.symmetric(8, 32, 2).holders, 8)
    for tokens in counts:
        assert micro.outcome(tokens).load.max() <= vanilla.outcome(tokens).load.max()
        assert micro.outcome(tokens).load.sum() == tokens.sum()  # every token processed once


def test_identical_inputs_give_identical_outputs():
    first = [r.to_json() for r in simulate(small_counts(seed=3), SHAPE, FIXED_COST)]
    second = [r.to_json() for r in simulate(small_counts(seed=3), SHAPE, FIXED_COST)]
    assert first == second


def test_eplb_replicates_hot_experts_within_the_same_memory():
    load = np.array([100.0, 1, 1, 1, 1, 1, 1, 1])
    holders = eplb_holders(load, num_gpus=4, slots_per_gpu=4)
    assert len(holders[0]) == 4 and sum(len(h) for h in holders) <= 16
    history = np.zeros((1, 4, 8), dtype=np.int64)
    history[0, :, 0] = 100
    strategy = StaticReplication(history, slots_per_gpu=4)
    outcome = strategy.outcome(history[0])
    assert np.allclose(outcome.load, 100.0)


def test_paper_bench_rows_have_the_documented_fields():
    result = bench_paper(micro_batches=3, cost=FIXED_COST, models=PAPER_MODELS[:1], skews=(1.0,))
    rows = result["rows"]
    assert {r["strategy"] for r in rows} >= {"vanilla EP", "MicroEP (symmetric)", "force-balanced ideal"}
    for row in rows:
        assert {"model", "zipf_s", "strategy", "step_ms", "gain_vs_vanilla_pct"} <= set(row)
    assert next(r for r in rows if r["strategy"] == "vanilla EP")["gain_vs_vanilla_pct"] == 0.0
    assert result["paper"]["average_gain_pct"] == 36.9 and result["cost_model"]
    assert "MicroEP (adaptive)" in {r["strategy"] for r in rows} and set(result["adaptive_gain_pct"]) == {"average", "max"}


# ------------------------------------------------------------------ traces and counts files


def write_megatron_trace(directory, counts_per_rank_step_layer, top_k=2, experts=8, seed=0):
    """Megatron router_trace_rank{r}.jsonl files whose top-k picks give known counts."""
    rng = np.random.default_rng(seed)
    for rank, records in counts_per_rank_step_layer.items():
        lines = []
        for step, layer, tokens in records:
            top = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
            lines.append(json.dumps({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer,
                                     "rank": rank, "num_tokens": tokens, "topk": top_k,
                                     "top_indices": top.tolist()}))
        lines.append(json.dumps({"step": 0, "block": "decoder", "layer": 1, "rank": rank, "mtp_idx": 0,
                                 "top_indices": [[0, 1]]}))  # MTP records are skipped
        (directory / f"router_trace_rank{rank}.jsonl").write_text("\n".join(lines) + "\n")


def test_megatron_trace_parsing(tmp_path):
    # Megatron writes decoder.layers indices (0-based); counts number layers from 1 like layer_number.
    records = [(0, 0, 5), (0, 0, 7), (0, 1, 5), (1, 0, 6), (1, 1, 6)]  # two micro-batches at step 0, layer 1
    write_megatron_trace(tmp_path, {0: records, 1: records})
    counts = read_router_traces(tmp_path, num_experts=8)
    assert sorted(counts.layers) == [1, 2]
    assert counts.layers[1].shape == (3, 2, 8) and counts.layers[2].shape == (2, 2, 8)
    assert counts.layers[1][1].sum(axis=1).tolist() == [14, 14]  # 7 tokens x top-2 on each rank


def test_counts_file_round_trips(tmp_path):
    counts = small_counts(layers=2, micro_batches=3)
    for name in ("counts.json", "counts.npz"):
        again = read_routing(write_counts(counts, tmp_path / name))
        assert again.num_experts == counts.num_experts
        assert all(np.array_equal(again.layers[n], counts.layers[n]) for n in counts.layers)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"step": 0, "layer": 1}', "lacks top_indices"),
    ('{"step": 0, "layer": 1, "top_indices": [[0, 9]]}', "expert index 9 >= --experts 8"),
])
def test_malformed_traces_name_file_and_line(tmp_path, content, message):
    (tmp_path / "router_trace_rank0.jsonl").write_text(content + "\n")
    with pytest.raises(TraceError, match=message) as error:
        read_router_traces(tmp_path, num_experts=8)
    assert "router_trace_rank0.jsonl:1" in str(error.value)


def test_inconsistent_traces_and_layouts_are_rejected(tmp_path):
    with pytest.raises(TraceError, match="no router_trace_rank"):
        read_router_traces(tmp_path, 8)
    write_megatron_trace(tmp_path, {0: [(0, 1, 4)], 1: [(0, 1, 4), (0, 1, 4)]})
    with pytest.raises(TraceError, match="different numbers of micro-batches"):
        read_router_traces(tmp_path, 8)
    with pytest.raises(TraceError, match="must divide the 8 traced GPUs"):
        analysis.analyze(small_counts(gpus=8), ep=3, micro_ep=2)
    with pytest.raises(TraceError, match="--experts is required"):
        read_routing(tmp_path)
    with pytest.raises(TraceError, match="counts must be"):
        RoutingCounts({1: np.zeros((2, 4, 5), dtype=np.int64)}, num_experts=8)


# ------------------------------------------------------------------ the analyze command


def test_analyze_json_and_plots(tmp_path, capsys):
    counts_path = write_counts(small_counts(gpus=16, layers=2, micro_batches=5, skew=1.0), tmp_path / "c.json")
    plots = tmp_path / "plots"
    assert micromoe(["analyze", str(counts_path), "--ep", "4", "--micro-ep", "2", "--json",
                     "--plot-dir", str(plots), "--plot-layer", "2", "--plot-step", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in result["layers"]] == [1, 2]
    for row in result["layers"]:
        assert {"vanilla_p50", "vanilla_p99", "micro_ep_p50", "micro_ep_p99"} <= set(row)
        assert row["micro_ep_p50"] <= row["vanilla_p50"] and row["micro_ep_p99"] <= row["vanilla_p99"]
    for name in ("load_per_gpu_layer2_step1.png", "imbalance_per_layer.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_reads_megatron_traces_and_reports_errors(tmp_path, capsys):
    write_megatron_trace(tmp_path, {r: [(0, 0, 32), (1, 0, 32)] for r in range(4)})
    assert micromoe(["analyze", str(tmp_path), "--experts", "8", "--ep", "2", "--micro-ep", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in result["layers"]] == [1]  # trace layer 0 is Megatron's layer_number 1
    assert micromoe(["analyze", str(tmp_path), "--experts", "8", "--ep", "2", "--micro-ep", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 GPUs, 8 experts, EP 2, MicroEP d = 2" in out and "GPU max/mean" in out
    assert micromoe(["analyze", str(tmp_path), "--experts", "4", "--ep", "2", "--micro-ep", "2"]) == 2
    assert "expert index" in capsys.readouterr().err


def test_simulate_command_json(capsys):
    assert micromoe(["simulate", "--model", "GPT-8x6.7B", "--skew", "1.0", "--micro-batches", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "GPT 8x6.7B" and len(result["results"]) == 7
    assert micromoe(["simulate", "--model", "GPT-1T"]) == 2


def test_shapes_are_the_paper_table():
    mixtral = next(m for m in PAPER_MODELS if m.name == "Mixtral 8x7B")
    assert dataclasses.astuple(mixtral)[1:12] == (32, 4096, 14336, 4096, 8, 2, 1, 256, 32, 4, 4)
    assert mixtral.micro_batches_per_step == 32 and mixtral.swiglu


def test_report_command_summarises_a_metrics_file(tmp_path, capsys):
    record = {"iteration": 5, "summary": {"max_mean_vanilla_ep": 1.2, "max_mean_micro_ep": 1.0, "schedule_ms": 0.5,
                                          "remote_fraction": 0.6, "fallbacks": 0.0},
              "layers": {"1": {}}, "loads": {"1": {"vanilla_ep": [3, 1], "micro_ep": [2, 2]}}}
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(json.dumps(record) + "\n")
    assert micromoe(["report", str(metrics), "--plot", str(tmp_path / "p.png")]) == 0
    assert "vanilla EP 1.200 -> MicroEP 1.000" in capsys.readouterr().out
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    metrics.write_text('{"iteration": 1}\n')
    assert micromoe(["report", str(metrics)]) == 2
    assert "m.jsonl:1: not a MicroEP metrics record (lacks layers, summary)" in capsys.readouterr().err


# ------------------------------------------------------------------ adaptive re-placement


def drifting_counts(skew=1.5, gpus=8, experts=32, micro_batches=12, seed=0):
    from micromoe_megatron.sim.bench import drifting_popularity
    from micromoe_megatron.core.loads import multinomial_counts

    rng = np.random.default_rng(seed)
    popularity = drifting_popularity(experts, skew, micro_batches, 0.005, rng)
    return RoutingCounts({1: np.stack([multinomial_counts(p, 4096, gpus, rng) for p in popularity])}, experts)


def test_analyze_adaptive_replay_is_causal_and_counts_re_placements():
    """Micro-batch t's plan may only depend on micro-batches before it: two traces that agree up to
    t give the same max/mean series up to t, whatever follows."""
    counts = drifting_counts(micro_batches=10)
    altered = counts.layers[1].copy()
    altered[6:] = altered[6:, :, ::-1]                      # a different future
    full = analysis.analyze(counts, ep=4, micro_ep=2, placement="adaptive")
    other = analysis.analyze(RoutingCounts({1: altered}, 32), ep=4, micro_ep=2, placement="adaptive")
    prefix = analysis.analyze(RoutingCounts({1: counts.layers[1][:6]}, 32), ep=4, micro_ep=2, placement="adaptive")
    series = [r["layers"][0]["series"]["micro_ep"] for r in (full, other, prefix)]
    assert series[0][:6] == series[1][:6] == series[2]
    assert series[0][6:] != series[1][6:]
    row = full["layers"][0]
    assert row["replacements"] >= 1 and row["slots_moved"] >= row["replacements"]
    # The first micro-batch is planned on the symmetric placement: nothing has been seen yet.
    symmetric = analysis.analyze(RoutingCounts({1: counts.layers[1][:1]}, 32), ep=4, micro_ep=2)
    assert series[0][0] == symmetric["layers"][0]["series"]["micro_ep"][0]
    static = analysis.analyze(counts, ep=4, micro_ep=2)["layers"][0]
    assert row["micro_ep_p50"] < static["micro_ep_p50"]     # skew 1.5: symmetric cannot balance


def test_analyze_adaptive_reports_the_steady_state_apart():
    """Micro-batches planned after the first re-placement get their own percentiles; the ones before
    (the symmetric start) are only in the all-micro-batch columns."""
    counts = drifting_counts(micro_batches=8)
    result = analysis.analyze(counts, ep=4, micro_ep=2, placement="adaptive", replacement_interval=3)
    row = result["layers"][0]
    series, steady = row["series"]["micro_ep"], row["series"]["steady"]
    # The first check follows micro-batch 3 (index 2); skew 1.5 makes it re-place there.
    assert row["replacements"] >= 1 and row["steady_micro_batches"] == len(steady) == 5
    assert steady == series[3:]
    assert row["micro_ep_steady_p99"] == float(np.percentile(series[3:], 99))
    assert max(series[:3]) > row["micro_ep_steady_p99"]        # the warm-up is what the steady state leaves out
    assert result["overall"]["micro_ep_steady_p50"] == float(np.percentile(series[3:], 50))
    never = analysis.analyze(counts, ep=4, micro_ep=2, placement="adaptive", replacement_interval=20)["layers"][0]
    assert never["steady_micro_batches"] == 0 and never["micro_ep_steady_p99"] is None
    assert "steady" in analysis.format_analysis(result) and " - " not in analysis.format_analysis(result)
    assert "micro_ep_steady_p99" not in analysis.analyze(counts, ep=4, micro_ep=2)["layers"][0]


def jump_counts():
    """4 GPUs, 8 experts: expert 5 hot throughout; idle expert 6 jumps to 31% at micro-batch 8."""
    calm = [17, 17, 17, 17, 17, 154, 0, 17]     # tokens per expert on each GPU
    jump = [4, 4, 4, 4, 3, 154, 80, 3]
    steps = [calm] * 8 + [jump] * 8
    return RoutingCounts({1: np.array([[row] * 4 for row in steps], dtype=np.int64)}, 8)


def check_bound_order(row):
    """What holds whatever the (heuristic) searches find, micro-batch by micro-batch."""
    adaptive = np.array(row["series"]["steady"])
    bounds = {name: np.array(values) for name, values in row["series_bounds"].items()}
    assert all(len(values) == len(adaptive) for values in bounds.values())
    tol = 1e-12
    # The count floor (best replica counts per micro-batch) is below every placement's value.
    assert np.all(bounds["count_floor"] >= 1.0) and np.all(bounds["count_floor"] <= bounds["micro_batch_oracle"] + tol)
    assert np.all(bounds["replica_floor"] <= adaptive + tol)   # the replay's own counts
    # The micro-batch oracle takes the best of its search, the window oracle's and the replay's placement.
    assert np.all(bounds["micro_batch_oracle"] <= np.minimum(adaptive, bounds["window_oracle"]) + tol)
    # Per check interval the window oracle keeps the replay's placement unless it finds a better max.
    assert bounds["window_oracle"].max() <= adaptive.max() + tol


def test_hindsight_bounds_show_the_causal_gap():
    """A sudden jump: the causal replay cannot know it, the window oracle balances it."""
    result = analysis.analyze(jump_counts(), ep=2, micro_ep=2, placement="adaptive", replacement_interval=4,
                              bounds=True)
    row = result["layers"][0]
    check_bound_order(row)
    steady = row["series"]["steady"]
    assert row["steady_micro_batches"] == 12 and max(steady[4:8]) >= 1.2   # planned before the jump was seen
    assert row["micro_ep_steady_p99"] >= 1.2 and row["window_oracle_p99"] <= 1.001
    assert row["micro_batch_oracle_p99"] <= 1.001 and row["count_floor_p99"] == 1.0
    assert row["replica_floor_p99"] >= 1.2          # the replay gave expert 6 one replica: counts, not table
    text = analysis.format_analysis(result)
    assert "HINDSIGHT bounds (non-causal" in text and "window oracle" in text
    # Without --bounds the replay is unchanged and carries no bound fields.
    plain = analysis.analyze(jump_counts(), ep=2, micro_ep=2, placement="adaptive", replacement_interval=4)
    assert plain["layers"][0]["series"]["steady"] == steady and "window_oracle_p99" not in plain["layers"][0]
    assert "HINDSIGHT" not in analysis.format_analysis(plain)


def test_hindsight_bound_order_on_drifting_routing(tmp_path, capsys):
    """Two MicroEP groups, skewed drifting routing: the guaranteed inequalities, and the CLI/JSON."""
    counts = drifting_counts(skew=1.2, gpus=8, experts=16, micro_batches=8)
    result = analysis.analyze(counts, ep=2, micro_ep=2, placement="adaptive", replacement_interval=2, bounds=True)
    row = result["layers"][0]
    assert row["steady_micro_batches"] == 6
    check_bound_order(row)
    path = write_counts(counts, tmp_path / "c.npz")
    args = ["analyze", str(path), "--ep", "2", "--micro-ep", "2", "--replacement-interval", "2"]
    assert micromoe([*args, "--placement", "adaptive", "--bounds", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bounds"] is True and "series_bounds" not in out["layers"][0]
    assert {k: out["layers"][0][k] for k in ("window_oracle_p99", "count_floor_p50")} == \
        {k: row[k] for k in ("window_oracle_p99", "count_floor_p50")}
    assert micromoe([*args, "--bounds"]) == 2
    err = capsys.readouterr().err
    assert "--bounds" in err and "--placement adaptive" in err and len(err.strip().splitlines()) == 1


def test_analyze_adaptive_command(tmp_path, capsys):
    path = write_counts(drifting_counts(micro_batches=4, gpus=8), tmp_path / "c.npz")
    assert micromoe(["analyze", str(path), "--ep", "4", "--micro-ep", "2", "--placement", "adaptive",
                     "--replacement-interval", "2"]) == 0
    out = capsys.readouterr().out
    assert "re-placement check every 2 micro-batches" in out and "re-placements (slots moved)" in out
    assert "steady n" in out
    assert micromoe(["analyze", str(path), "--ep", "4", "--micro-ep", "2", "--placement", "adaptive",
                     "--replacement-interval", "0"]) == 2
    assert "--replacement-interval must be >= 1" in capsys.readouterr().err
    assert micromoe(["analyze", str(path), "--ep", "4", "--micro-ep", "2", "--placement", "sorted"]) == 2
    assert "--placement" in capsys.readouterr().err


def test_simulate_charges_migration_and_adaptive_beats_symmetric_on_skew():
    counts = drifting_counts(micro_batches=8)
    results = {r.strategy: r for r in simulate(counts, SHAPE, FIXED_COST, replacement_interval=2)}
    adaptive, symmetric = results["MicroEP (adaptive)"], results["MicroEP (symmetric)"]
    assert adaptive.imbalance_p50 < symmetric.imbalance_p50 and adaptive.compute_ms < symmetric.compute_ms
    assert results["force-balanced ideal"].layer_ms <= adaptive.layer_ms
    assert adaptive.replacements >= 1
    # The hot experts change after the history, so a re-placement (and its migration) must follow.
    counts.layers[1][4:] = counts.layers[1][4:, :, ::-1].copy()
    results = {r.strategy: r for r in simulate(counts, SHAPE, FIXED_COST, replacement_interval=2)}
    adaptive, symmetric = results["MicroEP (adaptive)"], results["MicroEP (symmetric)"]
    assert adaptive.replacements >= 2 and adaptive.migration_ms > 0
    # A migration that costs seconds shows up in the adaptive layer time (and only there).
    slow = dataclasses.replace(FIXED_COST, migration_gbps=1e-3)
    slow_results = {r.strategy: r for r in simulate(counts, SHAPE, slow, replacement_interval=2)}
    assert slow_results["MicroEP (adaptive)"].migration_ms > adaptive.migration_ms + 100
    assert slow_results["MicroEP (adaptive)"].layer_ms > adaptive.layer_ms + 100
    assert slow_results["MicroEP (symmetric)"].layer_ms == symmetric.layer_ms and symmetric.migration_ms == 0


def test_migration_cost_model_bytes():
    migration = CostModel().migration(SHAPE)               # GPT 32x1.3B: 2 x 2048 x 8192 params per expert
    assert migration.bytes_per_slot == 2 * 2048 * 8192 * 12  # fp32 main weight + 2 Adam moments


def test_bench_balance_adaptive_column():
    from micromoe_megatron.sim.bench import bench_balance, format_balance

    result = bench_balance(steps=6, skews=(1.5,), num_gpus=8, num_experts=16, tokens_per_gpu=1024, warm_up=2)
    row = result["rows"][0]
    assert row["adaptive_p50"] < row["symmetric_p50"] and row["replacements"] >= 1 and row["fallbacks"] == 0
    assert "MicroEP adaptive" in format_balance(result) and "its replica bound" in format_balance(result)
    # The replica counts' floor is a lower bound of what the LP achieves on the same placement.
    assert 0 < row["replica_bound_p50"] <= row["adaptive_p50"] and row["replica_bound_p99"] <= row["adaptive_p99"]
    assert 0 <= row["outliers_after_replacement"] <= row["adaptive_outliers"] <= 6
