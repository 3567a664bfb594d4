"""Rank functions for tests/test_recipe.py: the README's integration recipe against stock EP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from micromoe_megatron.mcore.replicas import check_replicas, replica_layers
from tests.train_cases import MICRO_BATCH, SEQ, _batches, _forward_step

STEPS = 3


def _train(ddp, optimizer, rank: int) -> list[float]:
    losses = []
    forward_backward = get_forward_backward_func()
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(forward_step_func=_forward_step, data_iterator=_batches(rank, step, 1), model=[ddp],
                               num_microbatches=1, seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=False)
        ok, _, _ = optimizer.step()
        assert ok
        loss = out[0]["lm loss"].clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / dist.get_world_size())
    return losses


def run_recipe(rank, world_size, *, code: str, micro_ep: bool):
    """Run the README block (``micro_ep=True``) or the same model as stock EP (the block with its
    MicroEP lines replaced by what a stock loop does: EP = ep, Megatron's own finalize_model_grads),
    then train a few steps on the shared test data."""
    if not micro_ep:  # the stock reference: d = 1 groups of ep, no MicroEP pieces
        code = (code.replace("d * ep", "ep").replace("use_micro_ep(", "(lambda spec, _: spec)(")
                .replace("replica_sync.attach([model])", "")
                .replace("config.finalize_model_grads_func = replica_sync",
                         "from megatron.core.distributed import finalize_model_grads\n"
                         "config.finalize_model_grads_func = finalize_model_grads"))
    namespace: dict = {}
    exec(compile(code, "README.md recipe", "exec"), namespace)  # noqa: S102 - the README's own code
    losses = _train(namespace["ddp"], namespace["optimizer"], rank)
    if micro_ep:
        check_replicas(replica_layers([namespace["model"]]))
    parallel_state.destroy_model_parallel()
    return losses
