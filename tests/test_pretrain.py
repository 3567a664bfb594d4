"""End-to-end: Megatron's real ``pretrain()`` through scripts/pretrain_gpt.py, 4 gloo ranks on CPU.

Each launch costs ~40 s (imports and start-up), so the runs are shared between tests: a stock and a
MicroEP run with the distributed optimizer that both save at iteration 5, then resumes across
layouts, and short pipeline-parallel runs.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import pretrain

ITERS = ["--train-iters", "10"]
SAVE = ["--use-distributed-optimizer", "--save-interval", "5", "--dist-ckpt-optim-fully-reshardable"]


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


@pytest.mark.parametrize("saved_by, resume_args", [
    ("micro", ["--micro-ep", "2"]),
    ("stock", ["--micro-ep", "2"]),
    ("micro", []),
], ids=["micro-ep-to-micro-ep", "vanilla-to-micro-ep", "micro-ep-to-vanilla"])
def test_resume_across_layouts_is_exact(runs, saved_by, resume_args):
    """Distributed optimizer, torch_dist, resume at 5: iterations 6..10 equal the uninterrupted run
    (iteration 7 is skipped: after a resume Megatron logs the mean of iterations 6 and 7)."""
    resumed = pretrain([*ITERS, "--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                        "--load", str(runs["root"] / saved_by), "--ckpt-step", "5", *resume_args]).check()
    assert sorted(resumed.losses) == list(range(6, 11))
    assert _relative(runs["stock"].losses, resumed.losses, [6, 8, 9, 10]) < 1e-5
    assert _relative(runs["stock"].grad_norms, resumed.grad_norms, range(6, 11)) < 1e-5


def test_pipeline_parallel_matches_stock():
    common = ["--train-iters", "2", "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "1",
              "--disable-bias-linear"]
    stock = pretrain(common).check()
    micro = pretrain([*common, "--micro-ep", "2"]).check()
    assert _relative(stock.losses, micro.losses, [1, 2]) < 1e-5
    assert "MicroEP [iteration 2] MoE layers: 2" in micro.log  # layers of both stages reported


def test_invalid_layout_is_a_clear_error():
    run = pretrain(["--train-iters", "1", "--expert-model-parallel-size", "2", "--micro-ep", "3"], nproc=2,
                   timeout_s=120)
    assert run.returncode != 0
    assert "--micro-ep 3 x --expert-model-parallel-size 2 = 6 must divide the 2 ranks" in run.log
