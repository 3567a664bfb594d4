"""Run scripts/pretrain_gpt.py under torchrun on CPU and read Megatron's iteration log."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A tiny GPT-MoE: 2 layers, 8 experts top-2, mock data; dropout 0 so resumes are exact.
TINY_GPT_MOE = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
    "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
    "--num-experts", "8", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--hidden-dropout", "0", "--attention-dropout", "0",
]

_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+) \|")
_GRAD_NORM = re.compile(r"iteration\s+(\d+)/.*?grad norm: ([0-9.]+) \|")


@dataclass
class Run:
    returncode: int
    log: str
    losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)

    def check(self) -> "Run":
        assert self.returncode == 0, f"pretrain_gpt.py failed (exit {self.returncode}):\n{self.log[-6000:]}"
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(args: list[str], nproc: int = 4, timeout_s: float = 600.0) -> Run:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               str(REPO / "scripts" / "pretrain_gpt.py"), *TINY_GPT_MOE, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    log = proc.stdout + proc.stderr
    return Run(proc.returncode, log,
               {int(i): float(v) for i, v in _ITERATION.findall(log)},
               {int(i): float(v) for i, v in _GRAD_NORM.findall(log)})
