"""Shims that let megatron-core 0.19.2 run on a CPU-only machine over gloo.

Applied only when CUDA is absent (and ``MICROMOE_NO_CPU_COMPAT`` is unset); on a GPU machine
``apply()`` does nothing. Every patch has an id (see ``../shared/design/cpu-notes.md`` §4) and can
be switched off alone with ``MICROMOE_CPU_COMPAT_SKIP=P1a,P3`` to re-qualify a new megatron version.
A patch whose target has vanished fails loudly instead of silently doing nothing.

Tier "core" (megatron.core-level layers and tests): P1a, P1b, P1c, P2, P3.
"""

from __future__ import annotations

import contextlib
import os

import torch

_applied: set[str] = set()


def _skipped() -> set[str]:
    return {p.strip() for p in os.environ.get("MICROMOE_CPU_COMPAT_SKIP", "").split(",") if p.strip()}


def needed() -> bool:
    """True on a machine without CUDA unless disabled by MICROMOE_NO_CPU_COMPAT=1."""
    return not torch.cuda.is_available() and os.environ.get("MICROMOE_NO_CPU_COMPAT", "0") != "1"


class _FakeEvent:
    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _FakeStream:
    """Every fake stream is the same stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        """Accepts torch.cuda.Stream's arguments (device, priority) and ignores them."""

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def record_event(self, event=None):
        return event if event is not None else _FakeEvent()

    def __eq__(self, other):
        return isinstance(other, _FakeStream)

    def __hash__(self):
        return 0


def _patch_p1a_current_device():
    # ~200 megatron call sites pass current_device() as device=: it must mean the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")


def _patch_p1b_streams_and_events():
    # The alltoall dispatcher builds a torch.cuda.Stream in __init__ (token_dispatcher.py:469).
    shared = _FakeStream()
    torch.cuda.Stream = _FakeStream
    torch.cuda.ExternalStream = _FakeStream
    torch.cuda.Event = lambda *args, **kwargs: _FakeEvent()
    torch.cuda.current_stream = lambda device=None: shared
    torch.cuda.default_stream = lambda device=None: shared
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.set_stream = lambda stream: None
    torch.cuda.is_current_stream_capturing = lambda: False


def _patch_p1c_synchronize():
    torch.cuda.synchronize = lambda device=None: None


def _patch_p2_rng():
    # The "CUDA" generator becomes the CPU default generator (model_parallel_cuda_manual_seed,
    # CudaRNGStatesTracker). Not torch.manual_seed: that calls cuda.manual_seed_all and recurses.
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = torch.cuda.manual_seed
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    _require(tp_random, "_get_cuda_rng_state")
    _require(tp_random, "_set_cuda_rng_state")
    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    tp_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))


def _patch_p3_split_sizes_as_numpy():
    # gloo's all_to_all_single takes split sizes as lists/ndarrays, not tensors; megatron converts
    # only CUDA tensors. Rebind in every namespace that imported the function by name.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = _require(moe_utils, "maybe_move_tensor_to_cpu")

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _require(module, name: str):
    if not hasattr(module, name):
        raise RuntimeError(f"cpu_compat: {module.__name__}.{name} no longer exists; this megatron-core "
                           "version needs its CPU patches re-qualified (see cpu_compat.py)")
    return getattr(module, name)


_CORE_PATCHES = {
    "P1a": _patch_p1a_current_device,
    "P1b": _patch_p1b_streams_and_events,
    "P1c": _patch_p1c_synchronize,
    "P2": _patch_p2_rng,
    "P3": _patch_p3_split_sizes_as_numpy,
}


def apply() -> list[str]:
    """Apply the core-tier patches once per process when CUDA is absent; returns the ids applied."""
    if not needed():
        return []
    skipped = _skipped()
    for patch_id, patch in _CORE_PATCHES.items():
        if patch_id not in skipped and patch_id not in _applied:
            patch()
            _applied.add(patch_id)
    return sorted(_applied)
