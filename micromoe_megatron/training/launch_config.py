"""Launch configs (configs/*.yaml) -> the command-line arguments of scripts/pretrain_gpt.py.

A config has ``megatron:`` (Megatron flags without the leading ``--``: ``true`` -> bare flag,
``false``/null -> omitted, anything else -> ``--flag value``), ``micro_ep:`` (the plugin's flags,
same rules) and the launch shape ``nproc_per_node`` / ``nnodes``.

    python -m micromoe_megatron.launch_config configs/tiny-cpu.yaml [--no-micro-ep] [--field nnodes]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A launch config is malformed; the message names the file and the field."""


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config (see configs/ for examples)")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config.get("megatron"), dict):
        raise ConfigError(f"{path}: needs a 'megatron:' mapping of Megatron flags")
    for field in ("nproc_per_node", "nnodes"):
        if not isinstance(config.get(field, 1), int) or config.get(field, 1) < 1:
            raise ConfigError(f"{path}: {field} must be a positive integer, got {config.get(field)!r}")
    if not isinstance(config.get("micro_ep", {}) or {}, dict):
        raise ConfigError(f"{path}: 'micro_ep:' must be a mapping of --micro-ep* flags")
    return config


def _flags(mapping: dict) -> list[str]:
    argv = []
    for name, value in mapping.items():
        if value is None or value is False:
            continue
        argv.append(f"--{name}")
        if value is not True:
            argv.extend(str(v) for v in value) if isinstance(value, list) else argv.append(str(value))
    return argv


def pretrain_argv(config: dict, micro_ep: bool = True) -> list[str]:
    """Megatron flags, then the MicroEP flags (left out with ``micro_ep=False``: a stock run)."""
    return _flags(config["megatron"]) + (_flags(config.get("micro_ep") or {}) if micro_ep else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m micromoe_megatron.launch_config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--no-micro-ep", action="store_true", help="leave the micro_ep flags out (stock run)")
    parser.add_argument("--field", choices=("nproc_per_node", "nnodes", "name"),
                        help="print one launch field instead of the arguments")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"launch_config: error: {error}", file=sys.stderr)
        return 2
    if args.field:
        print(config.get(args.field, 1 if args.field != "name" else Path(args.config).stem))
    else:
        print(shlex.join(pretrain_argv(config, micro_ep=not args.no_micro_ep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
