"""Hindsight (non-causal) bounds for the adaptive replay of ``micromoe analyze``.

The adaptive replay (``analyze.py``) re-places from the micro-batches already seen. These bounds
look at the future instead, to tell a forecast's miss (causal gap) from one that no placement fixed
for a check interval could avoid. None of them is a policy a run could follow.

* window oracle: at every check, the placement the same search (current table improved in place,
  and a fresh ``asymmetric_placement``) finds from the counts of the micro-batches that placement
  will serve until the next check. Among those and the placement the causal replay actually used,
  it keeps the one with the lowest max over the interval, so per interval its max is never above
  the causal replay's. The search is a heuristic: a miss here means "not found", not "impossible".
* micro-batch oracle: per micro-batch, the best of a search on that micro-batch alone, the window
  oracle's placement and the causal one (so it is never above either, micro-batch by micro-batch).
* replica floor: with the replica counts ``c`` a placement has, no slot table gets the busiest
  GPU below the busiest expert's tokens per replica, ``max_e load[e] / c[e]`` (``loads.replica_floor``).
  ``replica_floor`` uses the counts the causal replay used; ``count_floor`` the best counts for the
  micro-batch alone (greedy by load per replica, ``asymmetric.replica_counts``, which minimises that
  max), a floor for every placement with ``L`` slots per GPU, fixed or not.

Values are GPU max/mean of the integer plans (``ReplicaScheduler``), over all GPUs of all groups, as
in ``analyze``.
"""

from __future__ import annotations

import numpy as np

from ..core.asymmetric import ScenarioScore, asymmetric_placement, improve_table, replica_counts
from ..core.loads import replica_floor
from ..core.placement import Placement
from ..core.schedule import ReplicaScheduler


class _MaxLoads:
    """Integer-plan GPU max load of a placement on a group's micro-batches (schedulers cached)."""

    def __init__(self) -> None:
        self._schedulers: dict[bytes, ReplicaScheduler] = {}

    def __call__(self, placement: Placement, tokens: np.ndarray) -> int:
        """``tokens`` int ``[F, E]`` -> the plan's max tokens on one GPU."""
        key = placement.phy2log.tobytes()
        if key not in self._schedulers:
            self._schedulers[key] = ReplicaScheduler(placement.holders, placement.num_gpus)
        return int(self._schedulers[key].plan(tokens).max_load)


def _search(rows: np.ndarray, start: Placement, max_evaluations: int) -> list[Placement]:
    """Candidates for the ``[K, E]`` loads ``rows``: ``start`` improved in place, and a fresh search."""
    num_gpus, slots = start.phy2log.shape
    if rows.sum() <= 0:
        return []
    forecast = rows.mean(axis=0)
    score = ScenarioScore(np.vstack([forecast, rows]), num_gpus)
    warm, _, _ = improve_table(start.phy2log, None, max_evaluations // 10, score=score)
    fresh = asymmetric_placement(forecast, num_gpus, slots, rows, max_evaluations)
    return [Placement(warm, start.num_experts), fresh]


def hindsight_bounds(tokens: np.ndarray, groups: list[slice], used: list[list[Placement]], steps: list[int],
                     interval: int, max_evaluations: int = 2000, progress=None) -> dict[str, list[float]]:
    """The bounds of the module docstring, on the micro-batches ``steps`` of one layer.

    Args:
        tokens: int ``[M, G, E]`` one layer's counts (micro-batch, traced GPU, expert).
        groups: the MicroEP groups, slices of the ``G`` GPUs (``F`` each).
        used: ``used[i][step]`` the placement group ``i`` planned micro-batch ``step`` on (causal replay).
        steps: the micro-batches to bound (ascending; whole check intervals of ``interval``).
        interval: micro-batches between checks; checks fall after micro-batches ``k * interval - 1``.
        max_evaluations: table scorings per search (the replay's policy uses 2000).

    Returns:
        ``{"window_oracle", "micro_batch_oracle", "replica_floor", "count_floor"}``: one GPU max/mean
        per step of ``steps``, in order.
    """
    max_load = _MaxLoads()
    out = {name: [] for name in ("window_oracle", "micro_batch_oracle", "replica_floor", "count_floor")}
    means = tokens.sum(axis=(1, 2)) / tokens.shape[1]          # [M] mean tokens per GPU, all groups
    num_gpus = groups[0].stop - groups[0].start
    intervals: dict[int, list[int]] = {}
    for step in steps:
        intervals.setdefault(step // interval, []).append(step)
    for done, members in enumerate(intervals.values()):
        window_max = np.zeros((len(members), len(groups)))      # tokens on the busiest GPU
        best_max = np.zeros_like(window_max)
        floors = np.zeros((2, len(members), len(groups)))
        for i, gpus in enumerate(groups):
            causal = used[i][members[0]]
            expert_loads = tokens[members][:, gpus].sum(axis=1).astype(np.float64)    # [K, E]
            # Window oracle: the candidate with the lowest max/mean over the interval it serves.
            candidates = [causal, *_search(expert_loads, causal, max_evaluations)]
            maxima = np.array([[max_load(p, tokens[s][gpus]) for s in members] for p in candidates])
            worst = (maxima / means[members][None, :]).max(axis=1)
            window = int(np.lexsort((maxima.sum(axis=1), worst))[0])
            window_max[:, i] = maxima[window]
            for k, step in enumerate(members):
                load = expert_loads[k]
                alone = _search(load[None, :], candidates[window], max_evaluations) if load.sum() else []
                best_max[k, i] = min([maxima[0, k], maxima[window, k],
                                      *(max_load(p, tokens[step][gpus]) for p in alone)])
                best_counts = replica_counts(load, num_gpus, causal.slots_per_gpu)
                floors[:, k, i] = [replica_floor(load, causal.logcnt, num_gpus) * load.sum() / num_gpus,
                                   replica_floor(load, best_counts, num_gpus) * load.sum() / num_gpus]
        for k, step in enumerate(members):
            mean = means[step]
            out["window_oracle"].append(float(window_max[k].max() / mean) if mean else 1.0)
            out["micro_batch_oracle"].append(float(best_max[k].max() / mean) if mean else 1.0)
            out["replica_floor"].append(float(floors[0, k].max() / mean) if mean else 1.0)
            out["count_floor"].append(float(floors[1, k].max() / mean) if mean else 1.0)
        if progress and (done + 1) % 5 == 0:
            progress(f"    hindsight bounds: {done + 1}/{len(intervals)} check intervals")
    return out
