"""Routing counts: tokens per (layer, micro-batch, source GPU, expert), read or generated.

Two input formats:

* Megatron routing traces (``--moe-routing-trace-path DIR``): ``router_trace_rank{r}.jsonl``, one
  record per rank, step, layer (and micro-batch, in order) with ``top_indices`` ``[tokens, k]``.
* A counts file (JSON or NPZ), this project's format::

      {"format": "micromoe-counts-v1", "num_experts": E,
       "layers": {"1": [[[count per expert] per GPU] per micro-batch], ...}}

  NPZ: one int array ``layer_<n>`` of shape ``[micro-batches, GPUs, E]`` per layer, plus
  ``num_experts``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core import loads

FORMAT = "micromoe-counts-v1"
SYNTHETIC_KINDS = ("zipf", "lognormal", "forced-bias", "gaussian")


class TraceError(ValueError):
    """Malformed routing input; the message names the file, line or field."""


@dataclass
class RoutingCounts:
    """``layers[n]``: int64 ``[M, G, E]`` tokens per micro-batch, source GPU and expert.

    A token that picks ``k`` experts counts once for each.
    """

    layers: dict[int, np.ndarray]
    num_experts: int

    def __post_init__(self) -> None:
        if not self.layers:
            raise TraceError("no MoE layer records found")
        shapes = {a.shape[1:] for a in self.layers.values()}
        if len(shapes) != 1:
            raise TraceError(f"layers disagree on [GPUs, experts]: {sorted(shapes)}")
        for layer, array in self.layers.items():
            if array.ndim != 3 or array.shape[2] != self.num_experts or array.shape[0] == 0:
                raise TraceError(f"layer {layer}: counts must be [micro-batches, GPUs, {self.num_experts}], "
                                 f"got {list(array.shape)}")
            if (array < 0).any():
                raise TraceError(f"layer {layer}: negative counts")

    @property
    def num_gpus(self) -> int:
        return next(iter(self.layers.values())).shape[1]

    def to_json(self) -> dict:
        return {"format": FORMAT, "num_experts": self.num_experts,
                "layers": {str(n): a.tolist() for n, a in sorted(self.layers.items())}}


def write_counts(counts: RoutingCounts, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix == ".npz":
        np.savez_compressed(path, num_experts=counts.num_experts,
                            **{f"layer_{n}": a for n, a in counts.layers.items()})
    else:
        path.write_text(json.dumps(counts.to_json()))
    return path


def _validated_layer(value, where: str) -> np.ndarray:
    """One layer's counts ``[M, G, E]`` as int64, each micro-batch checked by ``loads.validate_counts``
    (whole numbers, >= 0, total within int64). Raises TraceError naming ``where`` (file and layer)."""
    try:
        array = np.asarray(value)
        if array.ndim != 3:
            raise ValueError(f"counts must be [micro-batches, GPUs, experts], got {array.ndim} dimensions")
        return np.stack([loads.validate_counts(batch, *array.shape[1:]) for batch in array]) if array.size \
            else array.astype(np.int64)
    except (ValueError, TypeError) as exc:
        raise TraceError(f"{where}: {exc}") from None


def _counts_from_json(data, where: str) -> RoutingCounts:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TraceError(f"{where}: not a counts file (expected \"format\": \"{FORMAT}\")")
    experts = data.get("num_experts")
    if not isinstance(experts, int) or experts < 1:
        raise TraceError(f"{where}: num_experts must be a positive integer, got {experts!r}")
    layers = {}
    for key, value in (data.get("layers") or {}).items():
        try:
            number = int(key)
        except ValueError:
            raise TraceError(f"{where}: layer key {key!r} is not a layer number") from None
        layers[number] = _validated_layer(value, f"{where}: layer {key!r}")
    return RoutingCounts(layers, experts)


def read_counts_file(path: str | Path) -> RoutingCounts:
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "num_experts" not in data:
                raise TraceError(f"{path}: NPZ needs a num_experts entry")
            layers = {int(k.split("_", 1)[1]): _validated_layer(data[k], f"{path}: {k}") for k in data.files
                      if re.fullmatch(r"layer_\d+", k)}
            return RoutingCounts(layers, int(data["num_experts"]))
    try:
        return _counts_from_json(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def read_router_traces(directory: str | Path, num_experts: int) -> RoutingCounts:
    """Megatron ``--moe-routing-trace-path`` output -> counts (decoder layers; MTP records skipped).

    Records of one (step, layer) on one rank are that rank's micro-batches, in file order. Megatron
    writes a decoder layer as its index in ``decoder.layers`` (0-based); the counts number it from 1,
    as Megatron's ``layer_number`` and the MicroEP metrics do (trace layer 0 is layer 1).
    """
    directory = Path(directory)
    files = sorted(directory.glob("router_trace_rank*.jsonl"),
                   key=lambda p: int(re.search(r"rank(\d+)", p.name).group(1)))
    if not files:
        raise TraceError(f"{directory}: no router_trace_rank*.jsonl files (Megatron --moe-routing-trace-path)")
    per_rank: dict[int, dict[tuple[int, int], list[np.ndarray]]] = {}
    for path in files:
        rank = int(re.search(r"rank(\d+)", path.name).group(1))
        records: dict[tuple[int, int], list[np.ndarray]] = defaultdict(list)
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{where}: not valid JSON ({exc.msg})") from exc
            if "mtp_idx" in record or record.get("block", "decoder") != "decoder":
                continue
            missing = [k for k in ("step", "layer", "top_indices") if k not in record]
            if missing:
                raise TraceError(f"{where}: record lacks {', '.join(missing)}")
            indices = np.asarray(record["top_indices"], dtype=np.int64).reshape(-1)
            indices = indices[indices >= 0]  # padded / dropped slots carry -1
            if indices.size and indices.max() >= num_experts:
                raise TraceError(f"{where}: expert index {int(indices.max())} >= --experts {num_experts}")
            records[(int(record["step"]), int(record["layer"]) + 1)].append(
                np.bincount(indices, minlength=num_experts))
        per_rank[rank] = records
    ranks = sorted(per_rank)
    if ranks != list(range(len(ranks))):
        raise TraceError(f"{directory}: rank files {ranks} are not 0..{len(ranks) - 1}")
    keys = set(per_rank[0])
    for rank in ranks:
        if set(per_rank[rank]) != keys:
            raise TraceError(f"{directory}: rank {rank} traced other (step, layer) pairs than rank 0")
    layers: dict[int, list[np.ndarray]] = defaultdict(list)
    for step, layer in sorted(keys):
        micro_batches = {len(per_rank[r][(step, layer)]) for r in ranks}
        if len(micro_batches) != 1:
            raise TraceError(f"{directory}: step {step}, layer {layer}: ranks traced different numbers of "
                             f"micro-batches {sorted(micro_batches)}")
        for micro in range(micro_batches.pop()):
            layers[layer].append(np.stack([per_rank[r][(step, layer)][micro] for r in ranks]))
    return RoutingCounts({n: np.stack(m) for n, m in layers.items()}, num_experts)


def read_routing(path: str | Path, num_experts: int | None = None) -> RoutingCounts:
    """A trace directory or a counts file; ``num_experts`` is required for traces."""
    path = Path(path)
    if path.is_dir():
        if num_experts is None:
            raise TraceError("--experts is required to read Megatron routing traces")
        return read_router_traces(path, num_experts)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace directory or counts file")
    counts = read_counts_file(path)
    if num_experts is not None and num_experts != counts.num_experts:
        raise TraceError(f"--experts {num_experts} disagrees with the file's num_experts {counts.num_experts}")
    return counts


def expert_probabilities(kind: str, num_experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """``[E]`` routing probabilities of one synthetic load model (expert order random).

    zipf: p_i ~ i^-s (the paper's model). lognormal: exp(N(0, s)). gaussian: |N(1, s)| clipped
    away from 0. forced-bias: Megatron-style forced imbalance, a fraction s/(1+s) of the traffic
    on one hot expert and the rest uniform.
    """
    if kind == "zipf":
        return loads.zipf_probabilities(num_experts, skew, rng)
    if kind == "lognormal":
        weights = rng.lognormal(0.0, max(skew, 1e-9), num_experts)
    elif kind == "gaussian":
        weights = np.clip(rng.normal(1.0, skew, num_experts), 1e-3, None)
    elif kind == "forced-bias":
        hot = skew / (1.0 + skew)
        weights = np.full(num_experts, (1.0 - hot) / num_experts)
        weights[rng.integers(num_experts)] += hot
    else:
        raise TraceError(f"--synthetic {kind!r}: choose one of {', '.join(SYNTHETIC_KINDS)}")
    return weights / weights.sum()


def synthetic_counts(kind: str, skew: float, num_gpus: int, num_experts: int, assignments_per_gpu: int,
                     micro_batches: int, num_layers: int = 1, variability: float = 0.5,
                     seed: int = 0) -> RoutingCounts:
    """Synthetic counts: per layer a base popularity, per micro-batch a fresh one mixed in.

    ``variability`` is the weight of the per-micro-batch draw (0: the same popularity every
    micro-batch; 1: independent micro-batches), so history-based strategies see realistic drift.
    Each GPU's ``assignments_per_gpu`` token-expert pairs are drawn multinomially.
    """
    rng = np.random.default_rng(seed)
    layers = {}
    for layer in range(1, num_layers + 1):
        base = expert_probabilities(kind, num_experts, skew, rng)
        batches = []
        for _ in range(micro_batches):
            fresh = expert_probabilities(kind, num_experts, skew, rng)
            p = (1.0 - variability) * base + variability * fresh
            batches.append(loads.multinomial_counts(p / p.sum(), assignments_per_gpu, num_gpus, rng))
        layers[layer] = np.stack(batches)
    return RoutingCounts(layers, num_experts)
