"""Launch configs, scripts and the Dockerfile: what can be checked without GPUs or Docker."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from micromoe_megatron.training.launch_config import ConfigError, load_config, main as launch_config_main, pretrain_argv
from micromoe_megatron.training.flags import add_micro_ep_args, apply_micro_ep_layout, micro_ep_config_from_args

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PAPER_MODELS = {"gpt-32x1.3b", "gpt-16x3.2b", "gpt-8x6.7b", "mixtral-16x2b", "mixtral-8x7b"}


def _megatron_parser() -> argparse.ArgumentParser:
    from megatron.training.arguments import add_megatron_arguments

    return add_micro_ep_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


def test_configs_cover_the_paper_models_and_a_cpu_one():
    assert PAPER_MODELS | {"tiny-cpu"} <= {c.stem for c in CONFIGS}


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_a_valid_megatron_command_line_and_micro_ep_layout(config_path):
    config = load_config(config_path)
    args = _megatron_parser().parse_args(pretrain_argv(config))
    world = config["nproc_per_node"] * config["nnodes"]
    apply_micro_ep_layout(args, micro_ep_config_from_args(args), world_size=world)
    assert args.expert_model_parallel_size == args.micro_ep * args.micro_ep_vanilla_ep
    stock = _megatron_parser().parse_args(pretrain_argv(config, micro_ep=False))
    assert stock.micro_ep is None


def test_paper_configs_match_table_2():
    config = load_config(REPO / "configs" / "mixtral-8x7b.yaml")["megatron"]
    assert (config["num-layers"], config["hidden-size"], config["ffn-hidden-size"], config["num-experts"],
            config["seq-length"], config["moe-aux-loss-coeff"]) == (32, 4096, 14336, 8, 4096, 5e-4)


def test_launch_config_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nproc_per_node: 0\nmegatron: {num-layers: 2}\n")
    with pytest.raises(ConfigError, match="nproc_per_node must be a positive integer"):
        load_config(bad)
    assert launch_config_main([str(tmp_path / "missing.yaml")]) == 2
    assert "no such config" in capsys.readouterr().err


def test_launch_scripts_parse():
    for script in ("train_single_node.sh", "train_multi_node.sh", "demo_cpu.sh", "gpu_check.sh", "test.sh",
                   "setup_env.sh"):
        subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)


def test_dockerfile_copies_existing_files_and_pins_the_tested_versions():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    requirements = (REPO / "requirements-cpu.txt").read_text()
    for package in ("megatron-core", "highspy"):
        pin = re.search(rf"^{package}==(\S+)", requirements, re.M).group(1)
        assert f'"{package}=={pin}"' in dockerfile, f"Dockerfile must pin {package}=={pin} like the CPU stack"
    assert "nvcr.io/nvidia/pytorch" in dockerfile


def test_readme_docker_commands_match_the_dockerfile():
    readme = (REPO / "README.md").read_text()
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    build = "docker build -f docker/Dockerfile -t micromoe-megatron ."
    assert build in readme and build in dockerfile
    run = re.search(r"docker run [^\n]*micromoe-megatron \\\n\s*(scripts/\S+ \S+)", readme)
    assert run, "README must show a docker run command that starts a script with a config"
    script, config = run.group(1).split()
    assert (REPO / script).is_file() and (REPO / config).is_file()
    assert f"{script} {config}" in dockerfile


def test_pretrain_launcher_help_lists_micro_ep_flags():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_gpt.py"), "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--micro-ep ", "--micro-ep-placement", "--micro-ep-check-replicas-interval",
                 "--micro-ep-metrics-file"):
        assert flag in result.stdout
