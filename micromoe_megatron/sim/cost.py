"""Cost model: tokens and traffic -> milliseconds, and a step-time projection.

Every number is an assumption printed with the results (``CostModel.describe``). Defaults are for
H100 SXM in BF16; ``calibrate_gemm`` replaces the GEMM throughput with one measured on this
machine's device, ``calibrate_from_gpu_bench`` with the grouped GEMM that ``scripts/gpu_bench.sh``
measured (on a GPU box, read back anywhere).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from ..core.forecast import MigrationCost

H100_BF16_PEAK_TFLOPS = 989.0
# Bytes per expert parameter a migration moves with mixed-precision Adam: the FP32 main parameter
# (4) and the two FP32 Adam moments (8). The BF16 weight is not sent: the destination writes it as
# the cast of the main parameter (mcore/migration.py). Gradients are not moved: a migration runs
# after the optimizer step, when they are zeroed.
MIGRATION_BYTES_PER_PARAM = 12


@dataclass(frozen=True)
class ModelShape:
    """A GPT-MoE training configuration (paper Table 2 style)."""

    name: str
    num_layers: int
    hidden: int
    ffn_hidden: int
    seq_len: int
    num_experts: int
    top_k: int
    micro_batch: int
    global_batch: int
    gpus: int
    pp: int
    ep: int
    micro_ep: int = 2
    swiglu: bool = False

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    @property
    def micro_batches_per_step(self) -> int:
        return max(1, self.global_batch // (self.micro_batch * self.dp))

    @property
    def tokens_per_gpu(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def expert_flops_per_assignment(self) -> float:
        """Forward + backward FLOPs of one token through one expert MLP (3x the forward)."""
        matrices = 3 if self.swiglu else 2
        return 3.0 * 2.0 * matrices * self.hidden * self.ffn_hidden

    @property
    def expert_params(self) -> int:
        """Parameters of one expert MLP (no biases)."""
        return (3 if self.swiglu else 2) * self.hidden * self.ffn_hidden

    @property
    def dense_flops_per_token(self) -> float:
        """Forward + backward FLOPs per token of one layer outside the experts: QKV, projection,
        attention scores and values (full multi-head size, an upper bound for GQA), router."""
        forward = 8 * self.hidden ** 2 + 4 * self.seq_len * self.hidden + 2 * self.hidden * self.num_experts
        return 3.0 * forward


@dataclass(frozen=True)
class CostModel:
    """Milliseconds for expert compute, dense compute and all-to-all.

    Attributes:
        expert_tflops: achieved TFLOPS of the expert GEMMs.
        dense_tflops: achieved TFLOPS of the rest of a layer.
        intra_node_gbps / inter_node_gbps: all-to-all bandwidth per GPU and direction, GB/s.
        gpus_per_node: nodes are contiguous blocks of this many GPUs.
        a2a_latency_ms: fixed cost of one all-to-all.
        allgather_ms: MicroEP's counts all-gather per layer and micro-batch.
        bytes_per_element: activation element size (BF16: 2).
        migration_gbps: per-GPU bandwidth for moving expert slots in a re-placement, GB/s (a
            conservative share of NVLink; the moves are point-to-point inside the MicroEP group).
        migration_latency_ms: fixed cost of one re-placement (the exchange round, scheduler rebuild).
        schedule_ms: LP planning time per layer and micro-batch; None = measure it here.
        source: where the numbers come from.
    """

    expert_tflops: float = 0.45 * H100_BF16_PEAK_TFLOPS
    dense_tflops: float = 0.55 * H100_BF16_PEAK_TFLOPS
    intra_node_gbps: float = 200.0
    inter_node_gbps: float = 12.5
    gpus_per_node: int = 8
    a2a_latency_ms: float = 0.03
    allgather_ms: float = 0.03
    bytes_per_element: int = 2
    schedule_ms: float | None = None
    migration_gbps: float = 100.0
    migration_latency_ms: float = 0.5
    source: str = "defaults for H100 SXM BF16"

    def describe(self) -> list[str]:
        return [
            f"cost model: {self.source}",
            f"  expert GEMMs {self.expert_tflops:.0f} TFLOPS achieved, dense parts {self.dense_tflops:.0f} TFLOPS "
            f"(H100 BF16 peak {H100_BF16_PEAK_TFLOPS:.0f})",
            f"  all-to-all {self.intra_node_gbps:.0f} GB/s per GPU inside a node of {self.gpus_per_node}, "
            f"{self.inter_node_gbps:.1f} GB/s across nodes, {self.a2a_latency_ms} ms latency each; "
            "4 per MoE layer (dispatch + combine, forward + backward)",
            "  MicroEP/LP overhead: " + ("the HiGHS schedule time measured on this host" if self.schedule_ms is None
                                         else f"{self.schedule_ms} ms schedule time")
            + f" + {self.allgather_ms} ms counts all-gather, on the critical path (no overlap assumed)",
            f"  adaptive re-placement: each moved slot carries {MIGRATION_BYTES_PER_PARAM} bytes per expert "
            f"parameter (FP32 main param, Adam moments) at {self.migration_gbps:.0f} GB/s per GPU "
            f"+ {self.migration_latency_ms} ms, charged to the micro-batches until the next check",
            "  force-balanced ideal: every GPU at the mean load, and the least all-to-all time of any strategy "
            "spread evenly over the GPUs",
            "  step = (micro-batches + PP - 1) x layers per stage x (dense + MoE layer time) (1F1B); MoE layer "
            "time = the slowest GPU's expert compute + the slowest GPU's all-to-all + overhead",
        ]

    def expert_ms(self, assignments: np.ndarray, shape: ModelShape) -> np.ndarray:
        return assignments * shape.expert_flops_per_assignment / (self.expert_tflops * 1e12) * 1e3

    def ms_per_assignment(self, shape: ModelShape) -> float:
        """Expert compute (forward + backward) of one token-expert assignment, ms."""
        return shape.expert_flops_per_assignment / (self.expert_tflops * 1e12) * 1e3

    def migration(self, shape: ModelShape) -> MigrationCost:
        """The time model of moving one layer's expert slots (see ``MIGRATION_BYTES_PER_PARAM``)."""
        return MigrationCost(bytes_per_slot=float(shape.expert_params * MIGRATION_BYTES_PER_PARAM),
                             bandwidth_gbps=self.migration_gbps, latency_ms=self.migration_latency_ms)

    def dense_ms(self, shape: ModelShape) -> float:
        return shape.tokens_per_gpu * shape.dense_flops_per_token / (self.dense_tflops * 1e12) * 1e3

    def all_to_all_ms(self, traffic: np.ndarray, shape: ModelShape) -> float:
        """One all-to-all of token activations: the slowest GPU's send or receive time.

        traffic: [F, F] tokens from GPU s to GPU g; GPU indices are positions inside the node layout.
        """
        return float(self.per_gpu_all_to_all_ms(traffic, shape).max() + self.a2a_latency_ms)

    def per_gpu_all_to_all_ms(self, traffic: np.ndarray, shape: ModelShape) -> np.ndarray:
        """[F] each GPU's time to send and receive its share of one all-to-all (no latency)."""
        num_gpus = traffic.shape[0]
        node = np.arange(num_gpus) // self.gpus_per_node
        same_node = node[:, None] == node[None, :]
        off_diagonal = ~np.eye(num_gpus, dtype=bool)
        token_bytes = shape.hidden * self.bytes_per_element
        intra = np.where(same_node & off_diagonal, traffic, 0.0)
        inter = np.where(~same_node, traffic, 0.0)
        seconds = np.maximum(intra.sum(1), intra.sum(0)) * token_bytes / (self.intra_node_gbps * 1e9) + \
            np.maximum(inter.sum(1), inter.sum(0)) * token_bytes / (self.inter_node_gbps * 1e9)
        return seconds * 1e3


def calibrate_gemm(shape: ModelShape, base: CostModel | None = None, device: str | None = None,
                   repeats: int = 10) -> CostModel:
    """Measure the expert GEMM throughput on this machine (torch) and use it for the experts.

    The dense-part throughput is scaled by the same factor relative to the defaults.
    """
    import torch

    base = base or CostModel()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens = min(shape.tokens_per_gpu * shape.top_k // max(shape.num_experts // shape.ep, 1), 8192)
    x = torch.randn(tokens, shape.hidden, device=device, dtype=dtype)
    w = torch.randn(shape.hidden, shape.ffn_hidden, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x @ w
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        x @ w
    sync()
    seconds = (time.perf_counter() - start) / repeats
    tflops = 2.0 * tokens * shape.hidden * shape.ffn_hidden / seconds / 1e12
    scale = tflops / base.expert_tflops
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return replace(base, expert_tflops=tflops, dense_tflops=base.dense_tflops * scale,
                   source=f"GEMM measured on {name} ({dtype}, {tokens}x{shape.hidden}x{shape.ffn_hidden}): "
                          f"{tflops:.2f} TFLOPS")


def calibrate_from_gpu_bench(bench: str | dict, shape: ModelShape, base: CostModel | None = None) -> CostModel:
    """Use the grouped expert GEMM throughput measured by ``scripts/gpu_bench.sh`` for the experts.

    ``bench`` is its JSON (path or loaded dict): ``gemm.rows`` hold ``tokens`` (on one GPU) and
    ``tflops``. The throughput at this shape's balanced tokens per GPU (``tokens_per_gpu * top_k``)
    is interpolated on log(tokens), clamped to the measured range; the dense-part throughput is
    scaled by the same factor relative to the defaults, as in ``calibrate_gemm``.

    Raises:
        ValueError: the file is not such a result: no ``gemm.rows``, or a row without positive
            finite ``tokens`` and ``tflops`` (names the file, the row and how to make one).
    """
    import json

    label = bench if isinstance(bench, str) else "the gpu_bench results"
    if isinstance(bench, str):
        with open(bench) as f:
            bench = json.load(f)
    how = "write one with scripts/gpu_bench.sh OUT.json"
    gemm = bench.get("gemm") if isinstance(bench, dict) else None
    rows = gemm.get("rows") if isinstance(gemm, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{label}: no gemm.rows; {how}")
    for i, row in enumerate(rows):
        values = [row.get(key) if isinstance(row, dict) else None for key in ("tokens", "tflops")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                   for v in values):
            raise ValueError(f"{label}: gemm.rows[{i}] needs positive finite 'tokens' and 'tflops', got {row!r}; {how}")
    rows = sorted(rows, key=lambda row: row["tokens"])
    base = base or CostModel()
    tokens = shape.tokens_per_gpu * shape.top_k
    tflops = float(np.interp(np.log(tokens), np.log([r["tokens"] for r in rows]), [r["tflops"] for r in rows]))
    return replace(base, expert_tflops=tflops, dense_tflops=base.dense_tflops * tflops / base.expert_tflops,
                   source=f"grouped GEMM measured by gpu_bench on {bench.get('device', '?')} "
                          f"({gemm.get('backend', '?')}, H {gemm.get('hidden')}, FFN {gemm.get('ffn_hidden')}): "
                          f"{tflops:.2f} TFLOPS at {tokens} tokens per GPU")
