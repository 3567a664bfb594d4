"""Summarise a training run's MicroEP metrics file (``--micro-ep-metrics-file``) and plot it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..sim.plots import plot_load_per_gpu


class ReportError(ValueError):
    """The metrics file is missing or malformed; the message says which and where."""


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: no metrics file (train with --micro-ep-metrics-file {path})")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        missing = {"iteration", "summary", "layers"} - set(record if isinstance(record, dict) else ())
        if missing:
            raise ReportError(f"{path}:{number}: not a MicroEP metrics record (lacks {', '.join(sorted(missing))})")
        records.append(record)
    if not records:
        raise ReportError(f"{path}: empty")
    return records


def summarise(records: list[dict]) -> dict:
    """Means over all reports: GPU max/mean before and after, schedule time, remote share, fallbacks."""
    def mean(key):
        return float(np.mean([r["summary"][key] for r in records]))

    return {"reports": len(records), "last_iteration": records[-1]["iteration"],
            "max_mean_vanilla_ep": mean("max_mean_vanilla_ep"), "max_mean_micro_ep": mean("max_mean_micro_ep"),
            "schedule_ms": mean("schedule_ms"), "remote_fraction": mean("remote_fraction"),
            "fallbacks": int(sum(r["summary"]["fallbacks"] for r in records))}


def format_report(summary: dict) -> str:
    return "\n".join([
        f"MicroEP balance over {summary['reports']} reports (to iteration {summary['last_iteration']}):",
        f"  GPU max/mean tokens: vanilla EP {summary['max_mean_vanilla_ep']:.3f} -> MicroEP "
        f"{summary['max_mean_micro_ep']:.3f}",
        f"  schedule time {summary['schedule_ms']:.2f} ms per layer and micro-batch, remote tokens "
        f"{100 * summary['remote_fraction']:.1f}%, solver fallbacks {summary['fallbacks']}",
    ])


def plot_last_loads(records: list[dict], path: str | Path, layer: int | None = None) -> Path:
    """Per-GPU load before/after of the last reported micro-batch of ``layer`` (default: the first)."""
    loads = records[-1].get("loads") or {}
    if not loads:
        raise ReportError("the last record has no per-GPU loads (only the last pipeline stage records them)")
    key = str(layer) if layer is not None else sorted(loads, key=int)[0]
    if key not in loads:
        raise ReportError(f"--layer {layer}: not in the metrics (have layers {sorted(loads, key=int)})")
    title = f"layer {key}, iteration {records[-1]['iteration']}: tokens per GPU"
    return plot_load_per_gpu(loads[key]["vanilla_ep"], loads[key]["micro_ep"], path, title)
