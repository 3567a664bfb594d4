"""MicroEP metrics in Megatron's own logs.

Two paths, both Megatron's:

* ``iteration_line_entries``: extra entries of the forward step's loss dict. Megatron averages them
  over micro-batches and data-parallel ranks, prints them in the iteration log line and writes them
  to TensorBoard / W&B like the loss. They cover the MoE layers of the last pipeline stage, where
  the loss is computed.
* ``MetricsReporter``: every log interval, per-layer averages over all pipeline stages (one small
  all-reduce), written to TensorBoard / W&B as ``micro-ep/layer-N/...``, plus a summary line and,
  optionally, a JSON-lines file that tools (the CPU demo's plot) read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..core.loads import max_over_mean
from ..mcore.replicas import collective_device

# Per-layer columns of the reporter's table (means over the steps since the last report; the
# re-placement columns are totals since the last report, predicted_max_mean the policy's forecast
# for the placement in use, NaN without one).
COLUMNS = ("max_mean_vanilla_ep", "max_mean_micro_ep", "schedule_ms", "remote_fraction", "fallbacks",
           "replacements", "replacement_ms", "replacement_mb", "predicted_max_mean")


def micro_ep_layers(model_chunks) -> list:
    from ..mcore.layer import MicroMoELayer

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MicroMoELayer)]


def iteration_line_entries(layers, device) -> dict[str, torch.Tensor]:
    """Loss-dict entries for this micro-batch: GPU max/mean under vanilla EP and under MicroEP,
    averaged over the given layers. Values are ``[sum, count]`` pairs, Megatron's averaging format."""
    plans = [(layer.micro_ep_stats.load_before, layer.token_dispatcher.last_plan) for layer in layers]
    plans = [(before, plan) for before, plan in plans if plan is not None]
    if not plans:
        return {}
    count = float(len(plans))
    before = sum(max_over_mean(b) for b, _ in plans)
    after = sum(plan.imbalance for _, plan in plans)
    return {"micro-ep max/mean vanilla": torch.tensor([before, count], device=device),
            "micro-ep max/mean": torch.tensor([after, count], device=device)}


def layer_means(stats, replacement=None) -> list[float]:
    """One row of COLUMNS from a layer's MicroEPStats and ReplacementStats (since their last reset)."""
    steps = max(stats.steps, 1)
    moved = [float(replacement.count), replacement.ms, replacement.bytes_moved / 2 ** 20,
             replacement.predicted_max_mean] if replacement is not None else [0.0, 0.0, 0.0, float("nan")]
    return [stats.imbalance_before_total / steps, stats.imbalance_after_total / steps,
            stats.schedule_ms_total / steps, stats.remote_tokens / max(stats.tokens, 1), float(stats.fallbacks),
            *moved]


class MetricsReporter:
    """Per-layer MicroEP metrics at each log interval (call on every rank, once per step).

    Args:
        num_layers: total transformer layers of the model (rows of the table).
        log_interval: report every this many iterations.
        jsonl_path: if set, the last rank appends one JSON record per report here.
        mtp_layers: multi-token-prediction layers; MTP layer k is row ``num_layers + k`` (Megatron
            numbers it k, like decoder layer k) and is listed in the record's ``mtp_layers``.
    """

    def __init__(self, num_layers: int, log_interval: int, jsonl_path: str | None = None, mtp_layers: int = 0):
        self.decoder_layers = num_layers
        self.num_layers = num_layers + mtp_layers
        self.log_interval = log_interval
        self.jsonl_path = Path(jsonl_path) if jsonl_path else None

    def gather(self, layers, device) -> tuple[np.ndarray, dict[int, dict]]:
        """Per-layer rows summed over the world and divided by their holder count: [num_layers, C]."""
        table = torch.zeros(self.num_layers, len(COLUMNS) + 1, dtype=torch.float64, device=device)
        loads = {}
        for layer in layers:
            row = self.row(layer)
            row_values = layer_means(layer.micro_ep_stats, getattr(layer, "replacement_stats", None))
            table[row, :-1] += torch.tensor(row_values, dtype=torch.float64, device=device)
            table[row, -1] += 1
            stats = layer.micro_ep_stats
            loads[row + 1] = {"vanilla_ep": stats.load_before.tolist(), "micro_ep": stats.load_after.tolist()}
        dist.all_reduce(table)
        table = table.cpu().numpy()
        counts = table[:, -1:]
        return np.where(counts > 0, table[:, :-1] / np.maximum(counts, 1), np.nan), loads

    def row(self, layer) -> int:
        """Table row of a MicroMoELayer: decoder layer n is row n - 1, MTP layer k row num_layers + k - 1."""
        offset = self.decoder_layers if getattr(layer, "is_mtp_layer", False) else 0
        return offset + layer.layer_number - 1

    def __call__(self, model_chunks, iteration: int, writer=None, wandb_writer=None, is_last_rank=False,
                 print_fn=print):
        if iteration % self.log_interval:
            return None
        layers = micro_ep_layers(model_chunks)
        device = collective_device(layers[0].parameters() if layers else ())
        table, loads = self.gather(layers, device)
        for layer in layers:
            layer.micro_ep_stats.reset()
            if getattr(layer, "replacement_stats", None) is not None:
                layer.replacement_stats.reset()
        rows = {n + 1: dict(zip(COLUMNS, map(float, table[n]))) for n in range(self.num_layers)
                if not np.isnan(table[n, 0])}
        if not rows:
            return None
        summary = {c: float(np.mean([r[c] for r in rows.values()])) for c in COLUMNS}
        for total in ("fallbacks", "replacements", "replacement_ms", "replacement_mb"):
            summary[total] = float(sum(r[total] for r in rows.values()))
        record = {"iteration": iteration, "summary": summary, "layers": rows, "loads": loads,
                  "mtp_layers": [n for n in rows if n > self.decoder_layers]}
        if is_last_rank:
            self._write(record, writer, wandb_writer)
            print_fn(format_summary(record), flush=True)
        return record

    def _write(self, record, writer, wandb_writer) -> None:
        iteration = record["iteration"]
        scalars = {f"micro-ep/{name}": value for name, value in record["summary"].items()}
        for layer, row in record["layers"].items():
            scalars.update({f"micro-ep/layer-{layer}/{name}": value for name, value in row.items()})
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, iteration)
        if wandb_writer is not None:
            wandb_writer.log(scalars, iteration)
        if self.jsonl_path is not None:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            with self.jsonl_path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def format_summary(record: dict) -> str:
    s = record["summary"]
    return (f" MicroEP [iteration {record['iteration']}] MoE layers: {len(record['layers'])} | GPU max/mean: "
            f"vanilla EP {s['max_mean_vanilla_ep']:.3f} -> MicroEP {s['max_mean_micro_ep']:.3f} | "
            f"schedule {s['schedule_ms']:.2f} ms/layer | remote tokens {100 * s['remote_fraction']:.1f}% | "
            f"fallbacks {int(s['fallbacks'])} | re-placements {int(s.get('replacements', 0))} "
            f"({s.get('replacement_ms', 0.0):.0f} ms, {s.get('replacement_mb', 0.0):.1f} MB moved)")
