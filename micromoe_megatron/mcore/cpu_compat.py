"""Shims that let megatron-core 0.19.2 run on a CPU-only machine over gloo.

Applied only when CUDA is absent (and ``MICROMOE_NO_CPU_COMPAT`` is unset); on a GPU machine
``apply()`` does nothing. Every patch has an id (see ``../shared/design/cpu-notes.md`` §4) and can
be switched off alone with ``MICROMOE_CPU_COMPAT_SKIP=P1a,P3`` to re-qualify a new megatron version.
A patch whose target has vanished fails loudly instead of silently doing nothing.

The patches: P1a, P1b, P1c, P2, P3 for megatron.core-level layers; P1d, P4, P5, P6, P7a/b/c for
``megatron.training.pretrain`` and megatron's optimizers. ``apply()`` installs all of them (the
launcher and the test ranks both need the whole set). P8 (torch_dist saves without psutil) is not needed: psutil is a dependency. P9/P10 of the
notes are Megatron bugs on the no-Apex/TE optimizer path, not CPU shims: see megatron_fixes.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import types

import torch
from torch.overrides import TorchFunctionMode

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


def _patch_p1d_device_bookkeeping():
    # set_device (initialize.py:282) and the training log's memory report.
    for name in ("set_device", "empty_cache", "reset_peak_memory_stats", "reset_max_memory_allocated"):
        setattr(torch.cuda, name, lambda *args, **kwargs: None)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *args, **kwargs: 0)
    torch.cuda.memory_stats = lambda *args, **kwargs: {}
    # validate_args asks for the architecture when TP/CP > 1 (arguments.py:1414).
    properties = types.SimpleNamespace(name="cpu", major=0, minor=0, total_memory=0, multi_processor_count=1)
    torch.cuda.get_device_properties = lambda *args, **kwargs: properties
    torch.cuda.get_device_capability = lambda *args, **kwargs: (0, 0)


def _patch_p4_initialize_without_cuda():
    # initialize.py:66 asserts CUDA unless allow_no_cuda; with 0 devices it also silently skips the
    # model-parallel groups and the RNG seeding (initialize.py:358/447), so report one device while
    # initialisation runs, and only then.
    from megatron.training import initialize, training

    original = _require(initialize, "initialize_megatron")

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        device_count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count = device_count

    initialize.initialize_megatron = initialize_megatron
    training.initialize_megatron = initialize_megatron


def _patch_p5_prebuilt_dataset_helpers():
    # The wheel ships helpers_cpp prebuilt but no Makefile, so `make` at start-up fails (a packaging
    # bug, GPU users of the wheel hit it too): skip the build when the helper imports.
    from megatron.core.datasets import utils

    original = _require(utils, "compile_helpers")

    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            original()

    utils.compile_helpers = compile_helpers


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _patch_p6_rng_warning():
    # Under P2 the "CUDA" and CPU generators are one object, so every dropout warns.
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        _DropMessage("CPU RNG state changed within GPU RNG context"))


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """P7: ~40 megatron sites hard-code device='cuda' and check 'torch.cuda.*Tensor' types.

    P7a rewrites device= and pin_memory=, P7b makes .cuda()/.pin_memory()/.to('cuda')/
    record_stream CPU no-ops, P7c reports CPU tensors' .type() as torch.cuda.*; each can be skipped.
    """

    def __init__(self, parts: set[str]):
        super().__init__()
        self.parts = parts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "P7a" in self.parts:
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs["device"] = "cpu"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
        if "P7b" in self.parts:
            if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
                return args[0]
            if func is torch.Tensor.record_stream:
                return None
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
        if "P7c" in self.parts and func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        return func(*args, **kwargs)


def _patch_p7_cuda_to_cpu_mode():
    parts = {"P7a", "P7b", "P7c"} - _skipped()
    CudaToCpuMode(parts).__enter__()  # process-wide, never exited


def _require(module, name: str):
    if not hasattr(module, name):
        raise RuntimeError(f"cpu_compat: {module.__name__}.{name} no longer exists; this megatron-core "
                           "version needs its CPU patches re-qualified (see cpu_compat.py)")
    return getattr(module, name)


_PATCHES = {
    "P1a": _patch_p1a_current_device,
    "P1b": _patch_p1b_streams_and_events,
    "P1c": _patch_p1c_synchronize,
    "P2": _patch_p2_rng,
    "P3": _patch_p3_split_sizes_as_numpy,
    "P1d": _patch_p1d_device_bookkeeping,
    "P4": _patch_p4_initialize_without_cuda,
    "P5": _patch_p5_prebuilt_dataset_helpers,
    "P6": _patch_p6_rng_warning,
    "P7": _patch_p7_cuda_to_cpu_mode,
}


def apply() -> list[str]:
    """Apply the patches once per process when CUDA is absent; returns the ids applied.

    Call it before megatron builds anything (the launcher calls it first thing).
    """
    if not needed():
        return []
    skipped = _skipped()
    for patch_id, patch in _PATCHES.items():
        if patch_id not in skipped and patch_id not in _applied:
            patch()
            _applied.add(patch_id)
    return sorted(_applied)
