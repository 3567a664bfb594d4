"""Re-placement controller: every N iterations, ask a placement policy per MoE layer and migrate.

The policy is a plain callable (``Policy``)::

    policy(layer_number: int, history: np.ndarray [K, F, E], current: Placement
           [, measured: LayerMeasurements]) -> Placement | None

``history`` holds the last ``K`` micro-batches' all-gathered ``[F, E]`` counts of that layer (tokens
per source GPU and logical expert), summed over the expert-data-parallel replicas of the MicroEP
group, so every rank of a pipeline stage passes the policy identical data; None keeps the current
placement. A policy that takes a fourth positional argument also gets the layer's
``LayerMeasurements``: the expert compute time per token and the migration cost model, both made
identical on every rank by all-reduces (integer sums, a max), so they may enter the decision. The
policy must be a pure function of its arguments (and of how often it was called): no wall-clock,
no per-rank state. The controller checks that every rank got the same answer and, if not, keeps the
current placement on every rank (counted in ``disagreements``).

A policy may also offer ``predicted_max_mean(layer_number) -> float`` (its forecast GPU max/mean for
the placement it chose or kept), logged next to the achieved max/mean, and ``verdict(layer_number)
-> Verdict`` (why it decided so), which the per-check log line prints.

Use from your own training loop::

    controller = ReplacementController(policy, interval=micro_ep.replacement_interval, replica_sync=sync,
                                       micro_batches_per_iteration=num_microbatches)
    for iteration in range(1, iterations + 1):
        ... forward_backward(...); optimizer.step()
        controller.step(model_chunks, optimizer, iteration)   # after the step, before the next forward
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from ..core.migration_cost import MAX_SAMPLES, MigrationCost, MigrationSample
from ..core.migration_plan import MigrationPlan, plan_migration
from ..core.placement import Placement
from .expert_timer import ExpertTimer
from .migration import MigrationResult, SlotState, migrate_layer
from .replicas import slot_parameters

Policy = Callable[..., Optional[Placement]]

# Copy bandwidth of the migration model's prior, GB/s per rank (PCIe Gen4 x16 / a 200 Gb/s NIC;
# NVLink is faster). Measured migrations refit the model (``MigrationCost.fitted``).
DEFAULT_BANDWIDTH_GBPS = 25.0

# The gain is measured on the experts' forward; a training step also runs their backward, whose
# input- and weight-gradient GEMMs cost twice the forward's FLOPs: forward + backward = 3 x forward.
FORWARD_AND_BACKWARD = 3.0


@dataclass(frozen=True)
class LayerMeasurements:
    """One layer's measured inputs to the re-placement decision, identical on every rank.

    Attributes:
        ms_per_token: expert forward time per token-expert assignment (ms), summed time over summed
            tokens of every rank of the stage since the last check; 0 when nothing was timed.
        tokens_timed: the token-expert assignments that sum covers.
        micro_batches_per_check: micro-batches one MicroEP group runs until the next check
            (``interval`` x micro-batches per iteration): the horizon of the predicted gain.
        groups: MicroEP groups whose counts the history sums (the expert-data-parallel size), so a
            forecast load divided by it is one group's.
        migration: the migration time model (``core/migration_cost.py``): bytes per slot from the
            layer's parameters and optimizer state; the prior (0.1 ms fixed, no per-round cost,
            ``DEFAULT_BANDWIDTH_GBPS``) until a migration of a layer with the same slot size was
            measured, then fitted (fixed + per-round + bandwidth terms) to every such measurement
            (the group's slowest rank's time; the newest ``MAX_SAMPLES``).
        migration_measured: whether ``migration`` has been fitted to a measurement.
    """

    ms_per_token: float
    tokens_timed: int
    micro_batches_per_check: int
    groups: int
    migration: MigrationCost
    migration_measured: bool = False


@dataclass(frozen=True)
class Verdict:
    """Why a policy kept or replaced a layer's placement at a check (for the log line).

    ``gain_ms``: predicted expert compute time saved over the next ``micro_batches_per_check``
    micro-batches on the busiest GPU; ``migration_ms``: predicted migration time (both NaN when the
    policy had no measurements)."""

    replace: bool
    predicted_current: float
    predicted_new: float
    gain_ms: float
    migration_ms: float
    reason: str


@dataclass(frozen=True)
class LayerCheck:
    """What one check did for one layer: the policy's verdict (None if it gives none), the migration
    (None when kept) with ``ms`` the group's slowest rank's time, the controller's reason, and the
    agreed expert forward time per token-expert assignment the check measured (ms; None when the
    policy takes no measurements)."""

    layer_number: int
    verdict: Verdict | None
    result: MigrationResult | None
    reason: str
    ms_per_token: float | None = None


def _micro_layers(model_chunks) -> list:
    from .layer import MicroMoELayer

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MicroMoELayer)]


def _digest(placement: Placement | None) -> int:
    data = b"keep" if placement is None else placement.phy2log.tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _takes_measurements(policy) -> bool:
    """True when ``policy`` accepts a fourth positional argument (``LayerMeasurements``)."""
    try:
        inspect.signature(policy).bind(0, None, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): call it the old way
        return False
    return True


def _stage_all_reduce(layer, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` over the layer's MicroEP group, then its expert-data-parallel group
    (together they span the pipeline stage: expert TP is 1 under MicroEP), in place."""
    for group in (layer.token_dispatcher.ep_group, layer.expert_dp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _device(layer) -> torch.device:
    return next(layer.experts.parameters()).device


def agreed_ms_per_token(layer) -> tuple[float, int]:
    """``(ms per token-expert assignment, tokens timed)`` of ``layer``'s experts since the last call,
    identical on every rank of the stage. A layer without a timer gets one here (0 tokens this time).

    Every rank's ``ExpertTimer`` totals (integer nanoseconds and tokens) are summed over the stage and
    divided once: integer sums are exact in any reduction order, so every rank gets the same bits.
    Sums (a token-weighted mean) rather than the max of per-rank ratios: a rank that processed few
    tokens has a per-token time dominated by fixed launch costs (infinite with none), and a max
    would let that noise drive every decision; the mean errs, if at all, towards a smaller gain, so
    towards not migrating, which is the cheap mistake. Collective over the stage.
    """
    if layer.expert_timer is None:  # a layer built without re-placement: time from now on
        layer.expert_timer = ExpertTimer(layer.experts)
    nanoseconds, tokens = layer.expert_timer.collect()
    totals = _stage_all_reduce(layer, torch.tensor([nanoseconds, tokens], dtype=torch.int64, device=_device(layer)))
    nanoseconds, tokens = (int(v) for v in totals.cpu())
    return (nanoseconds / 1e6 / tokens if tokens > 0 else 0.0), tokens


def agreed_max_ms(layer, ms: float) -> float:
    """The largest of every rank's ``ms`` over the stage (a max is exact, so identical everywhere)."""
    value = torch.tensor([ms], dtype=torch.float64, device=_device(layer))
    return float(_stage_all_reduce(layer, value, op=dist.ReduceOp.MAX).cpu()[0])


class ReplacementController:
    """Calls ``policy`` for every MicroMoELayer every ``interval`` iterations and migrates.

    Args:
        policy: see the module docstring.
        interval: re-place after iterations ``interval, 2 * interval, ...`` (0 = never).
        replica_sync: the model's ReplicaSync, whose cached slot holders are dropped after a move.
        micro_batches_per_iteration: micro-batches per iteration (an int, or a callable returning the
            current number, e.g. Megatron's ``get_num_microbatches`` under batch-size ramp-up).
        bandwidth_gbps: the migration model's prior bandwidth (before any measured migration).
        background: run the policy in a background thread: at a check the controller gathers the
            policy's inputs (the collectives, on the calling thread), starts the search and returns;
            at the next iteration's ``step`` it waits for the search to finish (every rank at the same
            iteration, whenever its own thread finished) and migrates. The decision is the same as
            without ``background`` (a pure function of the same inputs), one iteration later.

    A policy that raises keeps the layer's placement (counted in ``failures``, warned once); the
    agreement check makes that decision the same on every rank.
    """

    def __init__(self, policy: Policy, interval: int, replica_sync=None,
                 micro_batches_per_iteration: Union[int, Callable[[], int]] = 1,
                 bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS, background: bool = False):
        if interval < 0:
            raise ValueError(f"--micro-ep-replacement-interval must be >= 0, got {interval}")
        self.policy = policy
        self.interval = interval
        self.replica_sync = replica_sync
        self.micro_batches_per_iteration = micro_batches_per_iteration
        self.bandwidth_gbps = bandwidth_gbps
        self.background = background
        self.takes_measurements = _takes_measurements(policy)
        self.results: list[tuple[int, MigrationResult]] = []  # (layer number, result), all so far
        self.disagreements = 0  # checks where ranks disagreed and the placement was kept
        self.failures = 0       # policy calls that raised (placement kept)
        self.last_check: list[LayerCheck] = []
        self.checked_at = 0     # iteration of the check whose decisions were applied last
        self.applied_at = 0     # iteration at which they were applied
        self._priors: dict[int, MigrationCost] = {}  # id(layer) -> its migration model's prior
        # Measured migrations, shared by the layers whose slots have the same size in a group of the
        # same size (same payload over the same links): more points for the fit, and a layer's first
        # migration is priced from the others'. Every layer of a controller is in one pipeline stage,
        # where the measurements are agreed, so the shared fit is the same on every rank.
        self._samples: dict[tuple[int, float], list[MigrationSample]] = {}
        self._fits: dict[tuple[int, float], tuple[tuple[MigrationSample, ...], MigrationCost]] = {}
        self._pending: tuple[int, int, Future] | None = None     # (checked at, apply at, search)
        self._executor: ThreadPoolExecutor | None = None

    def history(self, layer) -> np.ndarray:
        """int64 ``[K, F, E]`` counts of the layer's last micro-batches, summed over its EDP group."""
        local = np.stack(layer.token_dispatcher.counts_history)
        group = layer.expert_dp_group
        if group is None or dist.get_world_size(group) == 1:
            return local
        total = torch.as_tensor(local, device=_device(layer))
        dist.all_reduce(total, group=group)
        return total.cpu().numpy()

    def _prior(self, layer, optimizer) -> MigrationCost:
        """The layer's migration model before any measurement (collective on first use: the
        distributed optimizer agrees its state rows over the EDP group)."""
        key = id(layer)
        if key not in self._priors:
            slots = slot_parameters(layer.experts, layer.num_local_experts)
            payload = SlotState(slots, optimizer).payload_bytes()
            self._priors[key] = MigrationCost(bytes_per_slot=float(payload), bandwidth_gbps=self.bandwidth_gbps)
        return self._priors[key]

    @staticmethod
    def _sample_key(layer, prior: MigrationCost) -> tuple[int, float]:
        return layer.placement.num_gpus, prior.bytes_per_slot

    def migration_cost(self, layer, optimizer) -> tuple[MigrationCost, bool]:
        """The layer's migration model, fitted to the measured migrations of its slot size, and
        whether there were any (collective on first use, see ``_prior``)."""
        prior = self._prior(layer, optimizer)
        key = self._sample_key(layer, prior)
        samples = tuple(self._samples.get(key, ()))
        if not samples:
            return prior, False
        if key not in self._fits or self._fits[key][0] != samples:
            self._fits[key] = (samples, prior.fitted(samples))
        return self._fits[key][1], True

    def _record(self, layer, optimizer, plan, measured_ms: float) -> None:
        """Add one measured migration (``plan`` as executed, agreed ``measured_ms``) to the fit."""
        prior = self._prior(layer, optimizer)
        sample = prior.sample(plan, layer.placement.num_gpus, measured_ms)
        if sample.usable:  # a degenerate measurement (e.g. a clock gone backwards) keeps the model
            key = self._sample_key(layer, prior)
            self._samples[key] = (self._samples.get(key, []) + [sample])[-MAX_SAMPLES:]

    def measurements(self, layer, optimizer) -> LayerMeasurements:
        """The layer's agreed measurements for this check (collective over the stage)."""
        ms_per_token, tokens = agreed_ms_per_token(layer)
        per_iteration = self.micro_batches_per_iteration
        per_iteration = int(per_iteration() if callable(per_iteration) else per_iteration)
        group = layer.expert_dp_group
        groups = dist.get_world_size(group) if group is not None else 1
        cost, measured = self.migration_cost(layer, optimizer)
        return LayerMeasurements(ms_per_token, tokens, self.interval * per_iteration, groups, cost, measured)

    def _agreed(self, layer, new: Placement | None) -> bool:
        """True when every rank of the pipeline stage got the same answer from the policy.

        The min and max of the answers' digests are reduced over the MicroEP group, then over the
        expert-data-parallel group (together they span the stage), so every rank sees the same
        global result and takes the same decision.
        """
        mine = _digest(new)
        bounds = torch.tensor([mine, -mine], dtype=torch.int64, device=_device(layer))
        _stage_all_reduce(layer, bounds, op=dist.ReduceOp.MAX)
        return int(bounds[0]) == -int(bounds[1])

    def step(self, model_chunks, optimizer, iteration: int) -> list[MigrationResult]:
        """After ``optimizer.step()`` of iteration ``iteration`` (1-based): re-place if it is due.

        Call it after every iteration (with ``background`` the decision of a check is applied at the
        next call). Collective over the model's ranks; returns this call's migrations, whose ``ms`` is
        the slowest rank's. ``last_check`` says per layer what the last applied check did and why.
        """
        if not self.interval:
            return []
        done = []
        if self._pending is not None and iteration >= self._pending[1]:
            checked_at, _, search = self._pending
            self._pending = None
            done = self._apply(search.result(), optimizer, checked_at, iteration)  # waits for the search
        if iteration % self.interval == 0:
            jobs = [(layer, self._inputs(layer, optimizer)) for layer in _micro_layers(model_chunks)
                    if layer.token_dispatcher.counts_history]
            if self.background:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="micro-ep-replacement")
                self._pending = (iteration, iteration + 1, self._executor.submit(self._decide, jobs))
            else:
                done += self._apply(self._decide(jobs), optimizer, iteration, iteration)
        return done

    def close(self) -> None:
        """Drop a decision not applied yet and stop the background thread (waits for a running search)."""
        self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _inputs(self, layer, optimizer) -> tuple:
        """The policy's arguments for ``layer``, identical on every rank (collectives: call on every rank)."""
        history = self.history(layer)
        if self.takes_measurements:
            return layer.layer_number, history, layer.placement, self.measurements(layer, optimizer)
        if layer.expert_timer is not None:
            layer.expert_timer.collect()  # keep the timer's window "since the last check"
        return layer.layer_number, history, layer.placement

    def _decide(self, jobs) -> list[tuple]:
        """``[(layer, current, new or None, verdict or None, predicted max/mean, migration plan or None,
        measured ms per token or None)]``: the policy on the
        gathered inputs. No collectives and no model access, so it may run in a background thread."""
        decided = []
        for layer, args in jobs:
            number, current = args[0], args[2]
            try:
                new = self.policy(*args)
                verdict_of = getattr(self.policy, "verdict", None)
                verdict = verdict_of(number) if verdict_of is not None else None
            except Exception as exc:  # keep the placement; the agreement check makes it the same everywhere
                self.failures += 1
                if self.failures == 1:
                    warnings.warn(f"MicroEP re-placement: the policy failed on layer {number} ({exc}); keeping "
                                  "its placement", RuntimeWarning, stacklevel=2)
                nan = float("nan")
                new, verdict = None, Verdict(False, nan, nan, nan, nan, f"policy failed: {exc}")
            predicted_of = getattr(self.policy, "predicted_max_mean", None)
            predicted = float(predicted_of(number)) if predicted_of is not None else None
            # The move plan (rounds of slot copies) is a pure function of the two tables and costs
            # 0.1-0.5 s of CPU at 64 x 256: made here, so with ``background`` it is off the critical path
            # (or taken from the policy, which may have planned it to price the migration).
            plan = None
            if new is not None and not np.array_equal(new.phy2log, current.phy2log):
                plan_of = getattr(self.policy, "migration_plan", None)
                plan = plan_of(number, current, new) if plan_of is not None else None
                if plan is None:
                    plan = plan_migration(current, new)
            measured = args[3] if len(args) > 3 else None
            decided.append((layer, current, new, verdict, predicted, plan,
                            None if measured is None else measured.ms_per_token))
        return decided

    def _apply(self, decided, optimizer, checked_at: int, iteration: int) -> list[MigrationResult]:
        """Agree on and carry out ``_decide``'s answers (collectives: call on every rank)."""
        done, self.last_check = [], []
        self.checked_at, self.applied_at = checked_at, iteration
        for layer, current, new, verdict, predicted, plan, ms_per_token in decided:
            reason = verdict.reason if verdict is not None else ("re-place" if new is not None else "keep")
            if layer.placement is not current:  # moved since the check (cannot happen: one pending check)
                new, reason = None, "placement changed since the check; kept"
            if new is not None and np.array_equal(new.phy2log, current.phy2log):
                new, reason = None, "the policy returned the current placement"
            if not self._agreed(layer, new):
                # A policy that is not a pure function of its inputs: keep the placement everywhere
                # (every rank sees the same reduced result), count it, and say so once.
                self.disagreements += 1
                if self.disagreements == 1:
                    warnings.warn(f"MicroEP re-placement: ranks disagreed on layer {layer.layer_number}'s new "
                                  "placement; keeping the current one (the policy must be a pure function of "
                                  "(layer number, history, current, measurements))", RuntimeWarning, stacklevel=2)
                new, reason = None, "ranks disagreed; kept"
            if predicted is not None:
                layer.replacement_stats.predicted_max_mean = predicted
            if new is None:
                self.last_check.append(LayerCheck(layer.layer_number, verdict, None, reason, ms_per_token))
                continue
            self._prior(layer, optimizer)  # collective on first use: before the migration, on every rank
            if plan is None:
                plan = plan_migration(current, new)
            result = migrate_layer(layer, new, optimizer, plan=plan)
            # The group waits for its slowest rank: that time is what the migration cost, everywhere.
            result = dataclasses.replace(result, ms=agreed_max_ms(layer, result.ms))
            self._record(layer, optimizer, plan, result.ms)
            stats = layer.replacement_stats
            stats.count += 1
            stats.ms += result.ms
            stats.bytes_moved += result.bytes_moved
            done.append(result)
            self.results.append((layer.layer_number, result))
            self.last_check.append(LayerCheck(layer.layer_number, verdict, result, reason, ms_per_token))
        if done and self.replica_sync is not None:
            self.replica_sync.placement_changed()
        return done

    def summary(self) -> str:
        """One line on the last check: per layer, kept or re-placed, gain vs migration ms, the measured
        expert time per token, and why."""
        parts = []
        for check in self.last_check:
            v = check.verdict
            times = (f", gain {round(v.gain_ms, 6):.3g} ms vs migration {round(v.migration_ms, 6):.3g} ms"
                     if v is not None and np.isfinite(v.gain_ms) else "")
            if check.ms_per_token is not None:
                times += f", experts {check.ms_per_token * 1e3:.3g} us per token"
            done = (f"re-placed ({check.result.moves} slots, {check.result.ms:.1f} ms)" if check.result is not None
                    else "kept")
            parts.append(f"layer {check.layer_number}: {done}{times}: {check.reason}")
        return "; ".join(parts)


class AdaptivePolicy:
    """``--micro-ep-placement adaptive``: the planning core's forecaster and asymmetric placement.

    Per call, a ``core.forecast.ReplacementPolicy`` is built from the layer's current placement and
    fed the history window (EMA forecast of per-expert loads), so the answer is a pure function of
    (history, current, measurements): no state carried between calls, nothing a restarted rank could
    lack. The best placement it finds (the current one improved in place, or a fresh asymmetric one
    aligned to the current slots; paper Sec. 6.3-6.4) is taken when

    * ``threshold`` is 0: whenever it differs from the current one; else
    * the current placement's predicted GPU max/mean exceeds ``threshold``, the new one predicts
      better, and the predicted gain over the next check interval exceeds the predicted migration
      time (paper Sec. 6.4). Gain (ms) = (LP optimum now - new, tokens per micro-batch of one
      group) x ms per token (the measured forward x ``FORWARD_AND_BACKWARD``) x micro-batches per
      check; migration (ms) from ``MigrationCost`` (fixed + per-round + bytes / bandwidth, fitted to
      the measured migrations of the layers of that slot size) on the candidate's slot moves. Called without measurements (three arguments), or when no
      expert forward was timed since the last check (e.g. CUDA-graphed experts), the time gate is
      skipped and the threshold alone decides; the verdict says so.

    The time gate prices the ``plan_migration`` plan that would run (its rounds and busiest rank's
    bytes), which the controller then executes (``migration_plan``); a gain not above the model's
    fixed cost is refused without planning (the verdict then shows the greedy slot moves' price).

    ``verdict(layer_number)`` says why the last call decided as it did.
    """

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"--micro-ep-replacement-threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.predicted: dict[int, float] = {}
        self.verdicts: dict[int, Verdict] = {}
        self.plans: dict[int, tuple[Placement, Placement, MigrationPlan] | None] = {}

    def __call__(self, layer_number: int, history: np.ndarray, current: Placement,
                 measured: LayerMeasurements | None = None) -> Placement | None:
        verdict, placement, plan = self._decide(history, current, measured)
        self.verdicts[layer_number] = verdict
        self.plans[layer_number] = (current, placement, plan) if plan is not None else None
        self.predicted[layer_number] = verdict.predicted_new if verdict.replace else verdict.predicted_current
        return placement if verdict.replace else None

    def decide(self, history: np.ndarray, current: Placement,
               measured: LayerMeasurements | None = None) -> tuple[Verdict, Placement]:
        """The verdict and the best placement found, from ``history`` ``[K, F, E]``; pure."""
        verdict, placement, _ = self._decide(history, current, measured)
        return verdict, placement

    def _decide(self, history: np.ndarray, current: Placement,
                measured: LayerMeasurements | None) -> tuple[Verdict, Placement, MigrationPlan | None]:
        """``decide`` plus the migration plan made to price the move (None when none was needed)."""
        from ..core.forecast import ReplacementPolicy

        kwargs = {}
        if measured is not None:
            kwargs = dict(migration=measured.migration, micro_batches_per_check=measured.micro_batches_per_check,
                          ms_per_token=measured.ms_per_token * FORWARD_AND_BACKWARD / max(measured.groups, 1))
        policy = ReplacementPolicy(current, interval=1, threshold=0.0, window=max(len(history), 1), **kwargs)
        for counts in history:
            policy.observe(counts)
        decision = policy.check()
        nan = float("nan")
        if decision is None:
            return Verdict(False, nan, nan, nan, nan, "no counts observed"), current, None
        gain, migration = ((decision.gain_ms, decision.migration_ms) if measured is not None else (nan, nan))
        now, new = float(decision.predicted_current), float(decision.predicted_new)
        plan = None

        def verdict(replace: bool, reason: str) -> tuple[Verdict, Placement, MigrationPlan | None]:
            return Verdict(replace, now, new, gain, migration, reason), decision.placement, plan

        if not decision.replace:
            return verdict(False, decision.reason)
        if self.threshold == 0:
            return verdict(True, "threshold 0: re-place whenever a better table is found")
        if not now > self.threshold:
            return verdict(False, f"predicted max/mean {now:.4f} <= threshold {self.threshold}")
        if not new < now:
            return verdict(False, f"no better table (predicted {now:.4f} -> {new:.4f})")
        if measured is None or not measured.tokens_timed:
            return verdict(True, f"predicted max/mean {now:.4f} -> {new:.4f} (no time gate: expert time not "
                                 "measured)")
        if gain > measured.migration.latency_ms:
            # Price the plan that would run (the greedy moves' rounds are off either way: relays save
            # rounds, stashes add some); the controller executes this plan if it re-places.
            plan = plan_migration(current, decision.placement)
            migration = measured.migration.estimate_ms(plan, current.num_gpus)
        if not gain > migration:
            return verdict(False, f"predicted gain {gain:.3f} ms <= migration {migration:.3f} ms")
        return verdict(True, f"predicted max/mean {now:.4f} -> {new:.4f}, gain {gain:.3f} ms > migration "
                             f"{migration:.3f} ms")

    def predicted_max_mean(self, layer_number: int) -> float:
        return self.predicted.get(layer_number, float("nan"))

    def verdict(self, layer_number: int) -> Verdict | None:
        return self.verdicts.get(layer_number)

    def migration_plan(self, layer_number: int, current: Placement, new: Placement) -> MigrationPlan | None:
        """The plan from ``current`` to ``new`` that the last call for the layer made to price its
        migration; None when it made none or for other tables."""
        made = self.plans.get(layer_number)
        if made is None or not (np.array_equal(made[0].phy2log, current.phy2log)
                                and np.array_equal(made[1].phy2log, new.phy2log)):
            return None
        return made[2]
