"""Fixes for megatron-core 0.19.2 bugs on the distributed-optimizer load path without Apex/TE.

These are not CPU shims: any machine whose Megatron falls back to torch's Adam (no Apex, no
TransformerEngine) hits them when resuming with ``--use-distributed-optimizer``. Each is the
runtime form of a diff in ``patches/`` (see ``patches/README.md``); ``apply()`` is a no-op when
Megatron uses Apex/TE's fused Adam, whose step counter lives in the param groups. To re-qualify a
new megatron-core, skip fixes with ``MICROMOE_MEGATRON_FIXES_SKIP=F1,F2+F3,F4,F5``.

F1  ``sharded_state_dict(is_loading=True)`` reads ``state_dict()`` before the dummy-state init:
    with torch Adam the state is empty after a restart and ``assert len(steps) == 1`` fails
    (distrib_optimizer.py:839). Fix: initialise the dummy state first.
F2  ``_set_main_param_and_optimizer_states`` copies into fp32 main params that are views of leaf
    parameters (distrib_optimizer.py:1225) outside ``no_grad``. Fix: run it under ``no_grad``.
F3  The fully-reshardable load skips torch Adam's ``step`` in the source tensors but looks it up
    for every destination state (``KeyError: 'step'``). Fix: leave states the source lacks alone.
F4  ``load_state_dict`` gives every parameter's state the *same* ``step`` tensor
    (distrib_optimizer.py:1025-1031); torch Adam then increments it once per parameter each step,
    so bias correction drifts after a resume. Fix: one step tensor per parameter.
F5  Megatron's default distributed-optimizer checkpoint format (``dp_reshardable``) hands torch
    Adam's ``step`` to ``_set_main_param_and_optimizer_states`` as a ``LocalNonpersistentObject``:
    the value this rank held *before* the load (the dummy state, step 1), which is then copied over
    the step ``load_state_dict`` just restored from the param groups. The first iteration after a
    resume is exact, every later one drifts (bias correction of step 1). Fix: ``step`` is never
    taken from ``tensors``; the param groups are its one source (with F2+F3).
"""

from __future__ import annotations

import functools
import os

import torch

_applied = False


def needed() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False)


def _require(owner, name: str):
    if not hasattr(owner, name):
        raise RuntimeError(f"megatron_fixes: {owner.__name__}.{name} no longer exists; re-check the fixes "
                           "in patches/ against this megatron-core version")
    return getattr(owner, name)


def _fix_dummy_state_before_load(cls) -> None:
    original = _require(cls, "sharded_state_dict")
    _require(cls, "_init_optimizer_states_with_dummy_values")

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return original(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    cls.sharded_state_dict = sharded_state_dict


def _fix_set_states(cls, keep_restored_step: bool = True) -> None:
    original = _require(cls, "_set_main_param_and_optimizer_states")

    @functools.wraps(original)
    @torch.no_grad()
    def set_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            current = {k: v for k, v in self.optimizer.state[main_param].items() if isinstance(v, torch.Tensor)}
            # States the checkpoint does not carry keep their value (F3); "step" always keeps the value
            # load_state_dict restored from the param groups (F5).
            tensors = {**current, **{k: v for k, v in tensors.items() if k != "step" or not keep_restored_step}}
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states


def _fix_shared_step(cls) -> None:
    original = _require(cls, "load_state_dict")

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        return result

    cls.load_state_dict = load_state_dict


def apply() -> bool:
    """Install the fixes once if Megatron runs without Apex/TE. Returns whether they are active."""
    global _applied
    if _applied:
        return True
    if not needed():
        return False
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    skipped = {f.strip() for f in os.environ.get("MICROMOE_MEGATRON_FIXES_SKIP", "").split(",")}
    fixes = (("F1", _fix_dummy_state_before_load),
             ("F2+F3", functools.partial(_fix_set_states, keep_restored_step="F5" not in skipped)),
             ("F4", _fix_shared_step))
    for fix_id, fix in fixes:
        if fix_id not in skipped:
            fix(DistributedOptimizer)
    _applied = True
    return True
