"""The --micro-ep flags: parsing, defaults, translation to Megatron's layout, and every error."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from micromoe_megatron.mcore.config import LayoutError, MicroEPConfig
from micromoe_megatron.training.flags import add_micro_ep_args, apply_micro_ep_layout, micro_ep_config_from_args

# The Megatron flags the translation reads, at the values of a valid 8-rank EP = 2 launch.
MEGATRON_DEFAULTS = dict(num_experts=8, expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall",
                         expert_tensor_parallel_size=1, pipeline_model_parallel_size=1, log_params_norm=False,
                         use_torch_fsdp2=False, use_megatron_fsdp=False, overlap_moe_expert_parallel_comm=False,
                         moe_single_grouped_weight=False, save=None, load=None, ckpt_format="torch_dist",
                         use_distributed_optimizer=False, dist_ckpt_optim_fully_reshardable=False,
                         moe_expert_capacity_factor=None, moe_pad_expert_input_to_capacity=False,
                         non_persistent_ckpt_type=None, moe_router_num_groups=None, moe_router_group_topk=None)


def parse(argv: list[str], **megatron) -> argparse.Namespace:
    args = add_micro_ep_args(argparse.ArgumentParser()).parse_args(argv)
    for name, value in {**MEGATRON_DEFAULTS, **megatron}.items():
        setattr(args, name, value)
    return args


def test_defaults_leave_megatron_alone(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    args = parse([])
    assert args.micro_ep is None and micro_ep_config_from_args(args) is None
    assert args.micro_ep_placement == "symmetric" and args.micro_ep_check_replicas_interval == 100
    assert args.micro_ep_metrics_file is None and not args.micro_ep_check_plans


def test_every_flag_reaches_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    placement = tmp_path / "p.json"
    placement.write_text(json.dumps({"phy2log": [[0, 1], [1, 0]]}))
    args = parse(["--micro-ep", "2", "--micro-ep-placement", "custom", "--micro-ep-placement-file", str(placement),
                  "--micro-ep-placement-seed", "5", "--micro-ep-gpus-per-node", "4",
                  "--micro-ep-solver-work-limit", "75", "--micro-ep-check-plans",
                  "--micro-ep-check-replicas-interval", "10", "--micro-ep-metrics-file", "m.jsonl"])
    assert micro_ep_config_from_args(args) == MicroEPConfig(
        replicas=2, placement="custom", placement_seed=5, placement_file=str(placement), gpus_per_node=4,
        solver_work_limit=75, check_plans=True, check_replicas_interval=10, metrics_file="m.jsonl")


def test_gpus_per_node_defaults_to_torchrun_local_world_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert micro_ep_config_from_args(parse(["--micro-ep", "2"])).gpus_per_node == 8


def test_layout_widens_megatron_expert_parallel_group():
    args = parse(["--micro-ep", "2"])
    assert apply_micro_ep_layout(args, micro_ep_config_from_args(args), world_size=8) == []
    assert args.expert_model_parallel_size == 4 and args.micro_ep_vanilla_ep == 2


def test_layout_is_recorded_for_the_checkpoint():
    args = parse(["--micro-ep", "2", "--micro-ep-placement", "random", "--micro-ep-placement-seed", "3"])
    apply_micro_ep_layout(args, micro_ep_config_from_args(args), world_size=8)
    record = args.micro_ep_layout
    assert {k: record[k] for k in ("version", "d", "ep", "num_experts", "placement", "placement_seed")} == dict(
        version=1, d=2, ep=2, num_experts=8, placement="random", placement_seed=3)
    phy2log = np.array(record["phy2log"])
    assert phy2log.shape == (4, 4) and np.array_equal(np.bincount(phy2log.ravel()), [2] * 8)
    json.dumps(record)  # plain data: pickles into Megatron's saved args and reads back anywhere


def test_distributed_optimizer_saves_fully_reshardable():
    args = parse(["--micro-ep", "2"], use_distributed_optimizer=True, save="/ckpt")
    notes = apply_micro_ep_layout(args, micro_ep_config_from_args(args), world_size=8)
    assert args.dist_ckpt_optim_fully_reshardable
    assert len(notes) == 1 and "--dist-ckpt-optim-fully-reshardable" in notes[0]


def test_group_limited_routing_warns():
    args = parse(["--micro-ep", "2"], moe_router_num_groups=2, moe_router_group_topk=1)
    notes = apply_micro_ep_layout(args, micro_ep_config_from_args(args), world_size=8)
    assert len(notes) == 1 and notes[0].startswith("--moe-router-num-groups 2 with --micro-ep")


@pytest.mark.parametrize("argv, megatron, world, message", [
    (["--micro-ep", "0"], {}, 8, "--micro-ep must be >= 1"),
    (["--micro-ep", "2", "--micro-ep-placement", "custom"], {}, 8, "--micro-ep-placement-file"),
    (["--micro-ep-placement", "random"], {}, 8, "needs --micro-ep D"),
    (["--micro-ep", "2", "--micro-ep-solver-work-limit", "0"], {}, 8, "--micro-ep-solver-work-limit"),
    (["--micro-ep", "2", "--micro-ep-check-replicas-interval", "-1"], {}, 8, "--micro-ep-check-replicas-interval"),
    (["--micro-ep", "2", "--micro-ep-gpus-per-node", "0"], {}, 8, "--micro-ep-gpus-per-node"),
    (["--micro-ep", "2"], dict(num_experts=None), 8, "set --num-experts"),
    (["--micro-ep", "2"], dict(moe_token_dispatcher_type="allgather"), 8, "--moe-token-dispatcher-type alltoall"),
    (["--micro-ep", "2"], dict(expert_tensor_parallel_size=2), 8, "--expert-tensor-parallel-size 1"),
    (["--micro-ep", "2"], dict(num_experts=6, expert_model_parallel_size=4), 8, "--num-experts 6"),
    (["--micro-ep", "2"], dict(log_params_norm=True), 8, "--log-params-norm"),
    (["--micro-ep", "2"], dict(use_torch_fsdp2=True), 8, "--use-torch-fsdp2"),
    (["--micro-ep", "2"], dict(use_megatron_fsdp=True), 8, "--use-megatron-fsdp"),
    (["--micro-ep", "2"], dict(overlap_moe_expert_parallel_comm=True), 8, "--overlap-moe-expert-parallel-comm"),
    (["--micro-ep", "2"], dict(moe_single_grouped_weight=True), 8, "--moe-single-grouped-weight"),
    (["--micro-ep", "4"], {}, 4, "--micro-ep 4 x --expert-model-parallel-size 2 = 8 must divide the 4 ranks"),
    (["--micro-ep", "2"], dict(pipeline_model_parallel_size=2), 4, "= 4 must divide the 2 ranks"),
    (["--micro-ep", "2", "--micro-ep-replacement-interval", "5"], {}, 8, "needs --micro-ep-placement adaptive"),
    (["--micro-ep", "2", "--micro-ep-placement", "adaptive", "--micro-ep-replacement-interval", "5"],
     dict(use_precision_aware_optimizer=True), 8,
     "--use-precision-aware-optimizer is not supported with --micro-ep-replacement-interval"),
    (["--micro-ep", "2", "--micro-ep-gpus-per-node", "3"], {}, 8, "--micro-ep-gpus-per-node 3 must divide"),
    (["--micro-ep", "2"], dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True), 8,
     "--moe-pad-expert-input-to-capacity is not supported with --micro-ep"),
    (["--micro-ep", "2"], dict(save="/ckpt", ckpt_format="torch"), 8, "--ckpt-format torch is not supported"),
    (["--micro-ep", "2"], dict(load="/ckpt", ckpt_format="torch_dcp"), 8, "--ckpt-format torch_dcp is not"),
    (["--micro-ep", "2"], dict(non_persistent_ckpt_type="local"), 8, "--non-persistent-ckpt-type local"),
])
def test_invalid_combinations_name_the_flag(argv, megatron, world, message):
    with pytest.raises(LayoutError) as error:
        args = parse(argv, **megatron)
        micro_ep = micro_ep_config_from_args(args)
        apply_micro_ep_layout(args, micro_ep, world_size=world)
    assert message in str(error.value)


@pytest.mark.parametrize("content", ["{bad", '{"x": 1}', '{"phy2log": [[0, 1], [1]]}', '{"phy2log": "ab"}',
                                     '{"phy2log": [[0.5, 1], [1, 0]]}'])
def test_malformed_placement_file_is_one_line(tmp_path, content):
    path = tmp_path / "placement.json"
    path.write_text(content)
    args = parse(["--micro-ep", "2", "--micro-ep-placement", "custom", "--micro-ep-placement-file", str(path)],
                 num_experts=2, expert_model_parallel_size=1)
    with pytest.raises(LayoutError) as error:
        apply_micro_ep_layout(args, micro_ep_config_from_args(args), world_size=2)
    message = str(error.value)
    assert message.startswith(f"--micro-ep-placement custom (--micro-ep-placement-file {path}): ")
    assert "\n" not in message


def test_unknown_placement_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        parse(["--micro-ep", "2", "--micro-ep-placement", "ring"])


def test_launch_script_refuses_a_flag_in_one_line_before_torchrun():
    """scripts/train_single_node.sh checks the arguments once before torchrun starts any rank: a
    refused flag gives its one line and a non-zero exit, no per-rank copies, no torchrun traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        ["bash", str(repo / "scripts" / "train_single_node.sh"), str(repo / "configs" / "tiny-cpu.yaml"),
         "--mock-data", "--moe-expert-capacity-factor", "1.0", "--moe-pad-expert-input-to-capacity"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and "--moe-pad-expert-input-to-capacity" in errors[0], errors
    assert "ChildFailedError" not in result.stderr and "torch.distributed.run" not in result.stderr
