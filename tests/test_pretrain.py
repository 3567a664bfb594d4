"""End-to-end: Megatron's real ``pretrain()`` through scripts/pretrain_gpt.py, 4 gloo ranks on CPU.

Each launch costs ~30-40 s (imports and start-up), so the runs are shared between tests: a stock and a
MicroEP run with the distributed optimizer in Megatron's default checkpoint format that both save at
iteration 5, then resumes across layouts; short pairs (stock, MicroEP) that each carry several
Megatron options whose equivalence they prove together; one start-up refusal.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.launch import pretrain

ITERS = ["--train-iters", "10"]
# Megatron's defaults as a new user has them: no --dist-ckpt-optim-fully-reshardable.
SAVE = ["--use-distributed-optimizer", "--save-interval", "5"]

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    stock = pretrain([*ITERS, "--expert-model-parallel-size", "2", *SAVE, "--save", str(root / "stock")]).check()
    metrics = root / "micro_ep_metrics.jsonl"
    micro = pretrain([*ITERS, "--expert-model-parallel-size", "2", "--micro-ep", "2", *SAVE,
                      "--save", str(root / "micro"), "--micro-ep-metrics-file", str(metrics),
                      "--micro-ep-check-replicas-interval", "5"]).check()
    return {"root": root, "stock": stock, "micro": micro, "metrics": metrics}


def _relative(a: dict, b: dict, iterations) -> float:
    return max(abs(a[i] - b[i]) / abs(a[i]) for i in iterations)


def test_stock_launcher_trains(runs):
    stock = runs["stock"]
    assert sorted(stock.losses) == list(range(1, 11))
    assert stock.losses[10] < stock.losses[1]
    assert "MicroEP" not in stock.log and "micro-ep" not in stock.log


def test_micro_ep_reproduces_stock_training(runs):
    """Same initial weights (replicas start from vanilla EP's) and the same data: the same run."""
    micro, stock = runs["micro"], runs["stock"]
    assert micro.losses[10] < micro.losses[1]
    assert _relative(stock.losses, micro.losses, range(1, 11)) < 1e-5
    assert _relative(stock.grad_norms, micro.grad_norms, range(1, 11)) < 1e-5


def test_micro_ep_metrics_in_megatron_logs(runs):
    log = runs["micro"].log
    assert "MicroEP on: d=2, EP=2, MicroEP group of 4 ranks" in log
    iteration_lines = [line for line in log.splitlines() if "iteration       10/" in line]
    assert iteration_lines and "micro-ep max/mean:" in iteration_lines[0]
    assert "micro-ep max/mean vanilla:" in iteration_lines[0]
    assert "MicroEP [iteration 10] MoE layers: 2 | GPU max/mean: vanilla EP" in log
    records = [json.loads(line) for line in runs["metrics"].read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 11))
    for record in records:
        assert set(record["layers"]) == {"1", "2"}
        for row in record["layers"].values():
            assert row["max_mean_micro_ep"] <= row["max_mean_vanilla_ep"] + 1e-9
            assert row["fallbacks"] == 0
        for loads in record["loads"].values():
            assert sum(loads["micro_ep"]) == sum(loads["vanilla_ep"])  # no token dropped


def _resume(runs, saved_by: str, *args: str):
    return pretrain([*ITERS, "--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                     "--load", str(runs["root"] / saved_by), "--ckpt-step", "5", *args])


def test_micro_ep_saves_fully_reshardable_optimizer(runs):
    assert "MicroEP saves the distributed optimizer in Megatron's fully reshardable format" in runs["micro"].log


@pytest.mark.parametrize("saved_by, resume_args", [
    ("micro", ["--micro-ep", "2", "--micro-ep-placement", "random", "--micro-ep-placement-seed", "3"]),
    ("micro", []),
    ("stock", []),
], ids=["micro-ep-to-other-placement", "micro-ep-to-stock", "stock-to-stock"])
def test_resume_is_exact(runs, saved_by, resume_args):
    """Distributed optimizer, torch_dist, Megatron's default flags, resume at 5: iterations 6..10
    equal the uninterrupted run (iteration 7 is skipped: after a resume Megatron logs the mean of
    iterations 6 and 7). stock-to-stock is Megatron's dp_reshardable format (megatron_fixes F5)."""
    resumed = _resume(runs, saved_by, *resume_args).check()
    assert sorted(resumed.losses) == list(range(6, 11))
    assert _relative(runs["stock"].losses, resumed.losses, [6, 8, 9, 10]) < 1e-5
    assert _relative(runs["stock"].grad_norms, resumed.grad_norms, range(6, 11)) < 1e-5


def test_layout_bound_optimizer_checkpoint_is_refused_at_start_up(runs):
    """A stock dp_reshardable optimizer state cannot move into the MicroEP layout: one line, no
    traceback, before the model is built (vanilla-to-MicroEP in the fully reshardable format is
    exact: tests/test_replicas.py)."""
    run = _resume(runs, "stock", "--micro-ep", "2")
    assert run.returncode != 0
    errors = [line for line in run.log.splitlines() if "pretrain_gpt.py: error:" in line]
    assert errors and all(line == errors[0] for line in errors)
    assert "its distributed-optimizer state is in Megatron's dp_reshardable format" in errors[0]
    assert "stock expert parallelism, --expert-model-parallel-size 2" in errors[0]
    assert "[rank0]: Traceback" not in run.log and not run.losses


def _pair(options: list[str], iters: int = 3, tolerance: float = 1e-5, micro_options: tuple[str, ...] = ()):
    """Stock and MicroEP runs with the same options (MicroEP adds ``micro_options``); loss and grad norm
    of every iteration agree."""
    common = ["--train-iters", str(iters), *options]
    stock = pretrain(common).check()
    micro = pretrain([*common, "--micro-ep", "2", *micro_options]).check()
    assert sorted(stock.losses) == sorted(micro.losses) == list(range(1, iters + 1))
    assert _relative(stock.losses, micro.losses, range(1, iters + 1)) < tolerance
    assert _relative(stock.grad_norms, micro.grad_norms, range(1, iters + 1)) < tolerance
    return stock, micro


# MoE options of one pair: a dense first layer (--moe-layer-freq), sigmoid router with expert bias, shared
# experts, capacity without padding, MoE-layer recompute, and a multi-token-prediction layer (its MoE
# layer is a MicroMoELayer too).
MOE_OPTIONS = ["--expert-model-parallel-size", "2", "--disable-bias-linear", "--moe-layer-freq", "[0,1]",
               "--moe-router-score-function", "sigmoid",
               "--moe-router-enable-expert-bias", "--moe-shared-expert-intermediate-size", "64",
               "--moe-expert-capacity-factor", "1.0", "--recompute-granularity", "selective",
               "--recompute-modules", "moe", "--mtp-num-layers", "1", "--position-embedding-type", "rope"]


def test_moe_options_and_mtp_match_stock():
    stock, micro = _pair(MOE_OPTIONS)
    mtp_losses = [re.findall(r"mtp_1 loss: ([0-9.E+-]+)", run.log) for run in (stock, micro)]
    assert len(mtp_losses[0]) == 3 and mtp_losses[0] == mtp_losses[1]
    assert "MicroEP [iteration 3] MoE layers: 2" in micro.log  # decoder layer 2 and the MTP layer


def test_pipeline_parallel_and_recompute_match_stock():
    """Pipeline parallel, full-layer recompute, shared experts with overlap, group-limited routing."""
    options = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "1", "--disable-bias-linear",
               "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
               "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-overlap",
               "--moe-router-num-groups", "2", "--moe-router-group-topk", "1"]
    stock, micro = _pair(options, iters=2)
    assert "MicroEP [iteration 2] MoE layers: 2" in micro.log  # layers of both stages reported
    assert "--moe-router-num-groups 2 with --micro-ep" in micro.log  # the routing bound warning


def test_bf16_with_adaptive_placement_matches_stock_within_round_off():
    """bf16 is equal to within bf16 round-off, not bit-identical (sums run in another order). The MicroEP
    run has adaptive re-placement checked after every iteration with the distributed optimizer: the
    launcher accepts it in bf16 and times the experts. (This mock data routes evenly, so the checks keep
    the placement; tests/test_replicas.py re-places every iteration in bf16.)"""
    _, micro = _pair(["--expert-model-parallel-size", "2", "--bf16", "--use-distributed-optimizer"], iters=3,
                     tolerance=2e-2, micro_options=("--micro-ep-placement", "adaptive", "--micro-ep-replacement-"
                                                    "interval", "1", "--micro-ep-replacement-threshold", "0"))
    checks = re.findall(r"MicroEP re-placement check \[iteration (\d+)\]: .*experts ([\d.e+-]+) us per token",
                        micro.log)
    assert [int(i) for i, _ in checks] == [1, 2, 3] and all(float(t) > 0 for _, t in checks), micro.log[-3000:]
