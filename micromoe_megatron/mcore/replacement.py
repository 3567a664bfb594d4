"""Re-placement controller: every N iterations, ask a placement policy per MoE layer and migrate.

The policy is a plain callable (``Policy``)::

    policy(layer_number: int, history: np.ndarray [K, F, E], current: Placement) -> Placement | None

``history`` holds the last ``K`` micro-batches' all-gathered ``[F, E]`` counts of that layer (tokens
per source GPU and logical expert), summed over the expert-data-parallel replicas of the MicroEP
group, so every rank of a pipeline stage passes the policy identical data; None keeps the current
placement. The policy must be a pure function of its arguments (and of how often it was called):
no wall-clock, no per-rank state. The controller checks that every rank got the same answer and,
if not, keeps the current placement on every rank (counted in ``disagreements``).

A policy may also offer ``predicted_max_mean(layer_number) -> float`` (its forecast GPU max/mean for
the placement it chose or kept); it is logged next to the achieved max/mean.

Use from your own training loop::

    controller = ReplacementController(policy, interval=micro_ep.replacement_interval, replica_sync=sync)
    for iteration in range(1, iterations + 1):
        ... forward_backward(...); optimizer.step()
        controller.step(model_chunks, optimizer, iteration)   # after the step, before the next forward
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..core.placement import Placement
from .migration import MigrationResult, migrate_layer

Policy = Callable[[int, np.ndarray, Placement], Optional[Placement]]


def _micro_layers(model_chunks) -> list:
    from .layer import MicroMoELayer

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MicroMoELayer)]


def _digest(placement: Placement | None) -> int:
    data = b"keep" if placement is None else placement.phy2log.tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class ReplacementController:
    """Calls ``policy`` for every MicroMoELayer every ``interval`` iterations and migrates.

    Args:
        policy: see the module docstring.
        interval: re-place after iterations ``interval, 2 * interval, ...`` (0 = never).
        replica_sync: the model's ReplicaSync, whose cached slot holders are dropped after a move.
    """

    def __init__(self, policy: Policy, interval: int, replica_sync=None):
        if interval < 0:
            raise ValueError(f"--micro-ep-replacement-interval must be >= 0, got {interval}")
        self.policy = policy
        self.interval = interval
        self.replica_sync = replica_sync
        self.results: list[tuple[int, MigrationResult]] = []  # (layer number, result), all so far
        self.disagreements = 0  # checks where ranks disagreed and the placement was kept

    def history(self, layer) -> np.ndarray:
        """int64 ``[K, F, E]`` counts of the layer's last micro-batches, summed over its EDP group."""
        local = np.stack(layer.token_dispatcher.counts_history)
        group = layer.expert_dp_group
        if group is None or dist.get_world_size(group) == 1:
            return local
        device = next(layer.experts.parameters()).device
        total = torch.as_tensor(local, device=device)
        dist.all_reduce(total, group=group)
        return total.cpu().numpy()

    def _agreed(self, layer, new: Placement | None) -> bool:
        """True when every rank of the pipeline stage got the same answer from the policy.

        The min and max of the answers' digests are reduced over the MicroEP group, then over the
        expert-data-parallel group (together they span the stage), so every rank sees the same
        global result and takes the same decision.
        """
        device = next(layer.experts.parameters()).device
        mine = _digest(new)
        bounds = torch.tensor([mine, -mine], dtype=torch.int64, device=device)
        for group in (layer.token_dispatcher.ep_group, layer.expert_dp_group):
            if group is not None:
                dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
        return int(bounds[0]) == -int(bounds[1])

    def step(self, model_chunks, optimizer, iteration: int) -> list[MigrationResult]:
        """After ``optimizer.step()`` of iteration ``iteration`` (1-based): re-place if it is due.

        Collective over the model's ranks; returns this call's migrations (empty when not due).
        """
        if not self.interval or iteration % self.interval:
            return []
        done = []
        for layer in _micro_layers(model_chunks):
            if not layer.token_dispatcher.counts_history:
                continue
            new = self.policy(layer.layer_number, self.history(layer), layer.placement)
            if new is not None and np.array_equal(new.phy2log, layer.placement.phy2log):
                new = None
            if not self._agreed(layer, new):
                # A policy that is not a pure function of its inputs: keep the placement everywhere
                # (every rank sees the same reduced result), count it, and say so once.
                self.disagreements += 1
                if self.disagreements == 1:
                    warnings.warn(f"MicroEP re-placement: ranks disagreed on layer {layer.layer_number}'s new "
                                  "placement; keeping the current one (the policy must be a pure function of "
                                  "(layer number, history, current))", RuntimeWarning, stacklevel=2)
                new = None
            predicted = getattr(self.policy, "predicted_max_mean", None)
            if predicted is not None:
                layer.replacement_stats.predicted_max_mean = float(predicted(layer.layer_number))
            if new is None:
                continue
            result = migrate_layer(layer, new, optimizer)
            stats = layer.replacement_stats
            stats.count += 1
            stats.ms += result.ms
            stats.bytes_moved += result.bytes_moved
            done.append(result)
            self.results.append((layer.layer_number, result))
        if done and self.replica_sync is not None:
            self.replica_sync.placement_changed()
        return done


class AdaptivePolicy:
    """``--micro-ep-placement adaptive``: the planning core's forecaster and asymmetric placement.

    Per call, a ``core.forecast.ReplacementPolicy`` is built from the layer's current placement and
    fed the history window (EMA forecast of per-expert loads), so the answer is a pure function of
    (history, current): no state carried between calls, nothing a restarted rank could lack. The best
    placement it finds (the current one improved in place, or a fresh asymmetric one aligned to the
    current slots; paper Sec. 6.3-6.4) is taken when the current placement's predicted GPU max/mean
    exceeds ``threshold`` and the new one predicts better (``threshold`` 0: whenever it differs).

    The time gate of the issue (predicted gain vs. measured migration time) is not applied: it
    needs the expert compute time per token, which the launcher does not measure yet.
    """

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"--micro-ep-replacement-threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.predicted: dict[int, float] = {}

    def __call__(self, layer_number: int, history: np.ndarray, current: Placement) -> Placement | None:
        from ..core.forecast import ReplacementPolicy

        policy = ReplacementPolicy(current, interval=1, threshold=0.0, window=max(len(history), 1))
        for counts in history:
            policy.observe(counts)
        decision = policy.check()
        if decision is None or not decision.replace:
            self.predicted[layer_number] = float(decision.predicted_current) if decision else float("nan")
            return None
        if self.threshold and not (decision.predicted_current > self.threshold
                                   and decision.predicted_new < decision.predicted_current):
            self.predicted[layer_number] = float(decision.predicted_current)
            return None
        self.predicted[layer_number] = float(decision.predicted_new)
        return decision.placement

    def predicted_max_mean(self, layer_number: int) -> float:
        return self.predicted.get(layer_number, float("nan"))
