"""Start-up check of ``--load``: a resume is exact, or refused before the model is built.

Every checkpoint a MicroEP run writes carries its layout (``args.micro_ep_layout``, see
``flags.layout_record``: d, EP, the placement table and a format version) inside Megatron's saved
``args``. Model weights and optimizer states in Megatron's model-space formats are keyed by logical
expert (mcore/checkpoint.py), so they load into any layout. The one format that cannot move is the
distributed optimizer's default ``dp_reshardable``: it stores flat gradient-bucket shards, whose
order depends on which expert sits in which slot. Loading such a checkpoint into another expert
layout would either put states into the wrong experts without an error (MicroEP -> stock) or fail
deep inside torch.distributed.checkpoint (stock -> MicroEP); this check refuses it with one line.

Runs on every rank after Megatron's ``validate_args`` and before ``pretrain()``; each rank reads the
same files, so each takes the same decision.
"""

from __future__ import annotations

import os

from ..mcore.config import LayoutError
from .flags import LAYOUT_VERSION


def describe(record: dict | None, megatron_ep: int) -> str:
    """One phrase for an expert layout: stock EP, or MicroEP's d, EP and placement."""
    if not record:
        return f"stock expert parallelism, --expert-model-parallel-size {megatron_ep}"
    return (f"--micro-ep {record['d']} x --expert-model-parallel-size {record['ep']}, "
            f"{record['placement']} placement (seed {record['placement_seed']})")


def same_expert_layout(saved: dict | None, saved_ep: int, run: dict | None, run_ep: int) -> bool:
    """Whether every expert slot holds the same logical expert in both layouts (then bucket order
    is the same, given the same model and parallel sizes)."""
    if not saved or not run:
        return not saved and not run and saved_ep == run_ep
    return (saved["d"], saved["ep"], saved["phy2log"]) == (run["d"], run["ep"], run["phy2log"])


def checkpoint_dir(args) -> str | None:
    """The iteration directory ``pretrain()`` will load, or None when it starts from scratch."""
    from megatron.training.checkpointing import get_checkpoint_name, get_checkpoint_tracker_filename, read_metadata

    if not args.load:
        return None
    tracker = get_checkpoint_tracker_filename(args.load)
    if not os.path.isfile(tracker):
        return None
    iteration, release = read_metadata(tracker)
    if getattr(args, "ckpt_step", None):
        iteration, release = args.ckpt_step, False
    return get_checkpoint_name(args.load, iteration, release, return_base_dir=True)


def check_resume(args) -> None:
    """Refuse (LayoutError, one line) a ``--load`` that cannot resume exactly in this layout."""
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    directory = checkpoint_dir(args)
    if directory is None or not os.path.isdir(directory):
        return
    run = getattr(args, "micro_ep_layout", None)
    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        if run:
            raise LayoutError(f"--load {directory} is not a torch_dist checkpoint; --micro-ep resumes only "
                              "from --ckpt-format torch_dist checkpoints (convert it or resume without --micro-ep)")
        return
    common = dist_checkpointing.load_common_state_dict(directory)
    saved_args = common.get("args")
    saved = getattr(saved_args, "micro_ep_layout", None)
    if saved and saved.get("version", 0) > LAYOUT_VERSION:
        raise LayoutError(f"--load {directory} was written by a newer micromoe_megatron (layout format "
                          f"{saved['version']} > {LAYOUT_VERSION}); upgrade micromoe_megatron")
    saved_ep = getattr(saved_args, "expert_model_parallel_size", None)
    run_ep = args.expert_model_parallel_size
    loads_optimizer = (args.use_distributed_optimizer and not args.no_load_optim and not args.finetune
                       and not getattr(saved_args, "no_save_optim", False))
    sharding = (dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}).get(
        "distrib_optim_sharding_type")
    if (loads_optimizer and sharding and sharding not in DistributedOptimizer.checkpoint_fully_reshardable_formats
            and (saved or run) and not same_expert_layout(saved, saved_ep, run, run_ep)):
        raise LayoutError(
            f"--load {directory}: its distributed-optimizer state is in Megatron's {sharding} format, which is "
            f"tied to the expert layout it was saved with ({describe(saved, saved_ep)}), but this run uses "
            f"{describe(run, run_ep)}; resume once in the saved layout and save with "
            "--dist-ckpt-optim-fully-reshardable (MicroEP runs do so by default), or add --no-load-optim")
