"""GPT (MoE) pretraining with Megatron's own training loop, plus ``--micro-ep D``.

Run as ``torchrun ... scripts/pretrain_gpt.py <Megatron arguments> [--micro-ep D ...]``. It provides
what Megatron-LM's repo-root ``pretrain_gpt.py`` provides for GPT pretraining (batches, loss,
forward step, mock and indexed datasets; the megatron-core wheel ships ``megatron.training`` but not
that script) and wires MicroEP in through Megatron's extension points:

* ``extra_args_provider``: the ``--micro-ep*`` flags (megatron_args.py);
* ``GPTModelConfig.transformer_layer_spec``: Megatron's default spec with MoE layers made
  MicroMoELayers;
* ``GPTModelConfig.pre_wrap_hooks``: replicas marked and made identical before DDP wraps the model;
* ``TransformerConfig.finalize_model_grads_func``: Megatron's finalize, then the replica gradient
  sum, the periodic replica guard and the metrics report.

Without ``--micro-ep`` none of these is installed: stock Megatron. Without CUDA the CPU compat
module and ``adapt_to_cpu`` make the same command run on CPU over gloo.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch

from ..mcore import cpu_compat, megatron_fixes


def adapt_to_cpu(args) -> list[str]:
    """On a machine without CUDA: gloo, the local (non-TE) transformer, no CUDA-only fusions.

    Returns the changes made, so the launcher can say what it did.
    """
    if torch.cuda.is_available():
        return []
    changes = {"distributed_backend": "gloo", "gradient_accumulation_fusion": False,
               "masked_softmax_fusion": False, "bias_gelu_fusion": False, "bias_swiglu_fusion": False,
               "bias_dropout_fusion": False, "apply_rope_fusion": False, "no_persist_layer_norm": True,
               "moe_permute_fusion": False, "moe_router_fusion": False, "transformer_impl": "local"}
    # Megatron asserts this for TP/CP > 1 (a CUDA stream setting); it means nothing on CPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    done = []
    for name, value in changes.items():
        if hasattr(args, name) and getattr(args, name) != value:
            setattr(args, name, value)
            done.append(f"{name}={value}")
    if getattr(args, "moe_grouped_gemm", False):
        args.moe_grouped_gemm = False  # grouped GEMM is TransformerEngine-only
        done.append("moe_grouped_gemm=False")
    return done


def parse_arguments(argv=None, quiet: bool = False):
    """Megatron's parse + validate, with the MicroEP flags and layout translation in between.
    ``quiet``: do not print the start-up notes (the launch scripts' pre-flight check)."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    from ..mcore.config import LayoutError
    from .flags import add_micro_ep_args, apply_micro_ep_layout, micro_ep_config_from_args
    from .resume_check import check_resume

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = parse_args(extra_args_provider=add_micro_ep_args)
    cpu_changes = adapt_to_cpu(args)
    notes = []
    try:
        micro_ep = micro_ep_config_from_args(args)
        if micro_ep is not None:
            notes = apply_micro_ep_layout(args, micro_ep)
        check_data_args(args)
        validate_args(args, {"tokenizer_type": "NullTokenizer"})
        check_resume(args)
    except LayoutError as error:
        raise SystemExit(f"pretrain_gpt.py: error: {error}") from None
    set_global_variables(args)
    if int(os.environ.get("RANK", "0")) == 0 and not quiet:
        for note in notes:
            print(f"pretrain_gpt.py: {note}", flush=True)
    return args, micro_ep, cpu_changes


def check_data_args(args) -> None:
    """One-line errors where Megatron would fail deep inside (a traceback per rank)."""
    sources = [args.mock_data, args.data_path, args.data_args_path, args.train_data_path,
               args.valid_data_path, args.test_data_path, args.per_split_data_args_path]
    if not any(sources):
        raise SystemExit("pretrain_gpt.py: error: no training data: pass --data-path PREFIX (made by "
                         "`micromoe prepare-data`) or --mock-data")
    if args.tokenizer_type == "HuggingFaceTokenizer" and not args.tokenizer_model:
        raise SystemExit("pretrain_gpt.py: error: --tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR "
                         "(the tokenizer directory `micromoe prepare-data` prints)")
    if args.data_path:
        _check_splits(args)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# Megatron's value when --data-path comes without --split (megatron/training/arguments.py).
MEGATRON_DEFAULT_SPLIT = "969, 30, 1"


def _check_splits(args) -> None:
    """Refuse a ``--split`` share that leaves a dataset's split without a single document:
    megatron-core 0.19.2 then loops forever in ``GPTDataset._get_num_epochs`` (0 tokens per
    epoch), on every rank. Megatron splits each ``--data-path`` prefix by documents, bounds
    ``round(cumulative share x documents)`` (``blended_megatron_dataset_builder``)."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    split = args.split if args.split is not None else MEGATRON_DEFAULT_SPLIT
    shares = parse_and_normalize_split(split)
    bounds = np.cumsum([0.0, *shares])
    for prefix in args.data_path:
        if _is_number(prefix):  # a blend weight ("0.3 prefix_a 0.7 prefix_b"), not a prefix
            continue
        if not (os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin")):
            raise SystemExit(f"pretrain_gpt.py: error: --data-path {prefix}: no {prefix}.idx / {prefix}.bin "
                             "(make them with `micromoe prepare-data`)")
        documents = len(IndexedDataset(prefix))
        for name, share, begin, end in zip(("train", "validation", "test"), shares, bounds[:-1], bounds[1:]):
            if share > 0 and int(round(end * documents)) <= int(round(begin * documents)):
                fix = ("give it a larger share" if name == "train" else
                       "pass a 0 share for it (e.g. --split 100,0,0) or a larger one")
                raise SystemExit(
                    f"pretrain_gpt.py: error: --split {split!r} gives the {name} split of {prefix} "
                    f"({documents} documents) no document, and megatron-core hangs on an empty split; "
                    f"{fix}, or use more documents")


def print_help() -> None:
    """The plugin's flags. (megatron-core 0.19.2's own --help crashes on a '%' in one of its help
    strings, --moe-paged-stash-buffer-size-factor-cuda, so it is not chained.)"""
    import argparse

    from .flags import add_micro_ep_args

    parser = argparse.ArgumentParser(prog="torchrun ... scripts/pretrain_gpt.py",
                                     usage="%(prog)s <Megatron arguments> [--micro-ep D ...]",
                                     description="GPT pretraining with Megatron's training loop; every Megatron "
                                                 "argument is accepted. MicroEP flags:")
    print(add_micro_ep_args(parser).format_help())
    raise SystemExit(0)


# ---------------------------------------------------------------- data, loss, forward step


def get_batch(data_iterator, vp_stage=None):
    """This rank's micro-batch (TP rank 0 reads, the TP group gets a broadcast; CP slices)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None
    args = get_args()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = next(data_iterator)
        batch = {k: (v.to(torch.cuda.current_device(), non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in batch.items()}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=args.context_parallel_size,
        tp_rank=tp_rank, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        mtp_on_this_rank=False, pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(), is_pipeline_last_stage=mpu.is_pipeline_last_stage())
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group())
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch["attention_mask"], batch["position_ids"])


def loss_func(loss_mask, output_tensor, model=None, micro_ep_layers=()):
    """Token-averaged LM loss in Megatron's ``[sum, count]`` format, plus MicroEP's log entries."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    from .metrics import iteration_line_entries

    args = get_args()
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}
    if args.check_for_nan_in_loss_and_grad:
        get_rerun_state_machine().validate_result(
            result=loss, rejection_func=torch.isnan, message="found NaN in local forward loss calculation",
            tolerance=0.0, fatal=True)
    report.update(iteration_line_entries(micro_ep_layers, loss.device))
    return loss, num_tokens, report


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    from .metrics import micro_ep_layers

    if return_schedule_plan:
        raise NotImplementedError("schedule-plan return (EP A2A overlap) is not supported by this launcher")
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, functools.partial(loss_func, loss_mask, model=model,
                                            micro_ep_layers=micro_ep_layers(model))


def is_dataset_built_on_rank(vp_stage=None):
    from megatron.core import parallel_state as mpu
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return is_first_or_last_pipeline_stage(vp_stage) and mpu.get_tensor_model_parallel_rank() == 0


def dataset_config(args):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files, tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        context_parallel_size=args.context_parallel_size, data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building train, validation, and test datasets for GPT ({dataset_type.__name__}) ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, functools.partial(is_dataset_built_on_rank, vp_stage=vp_stage),
        dataset_config(args)).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


train_valid_test_datasets_provider.is_distributed = True


def get_embedding_ranks(pp_ranks):
    from megatron.training import get_args

    args = get_args()
    if len(pp_ranks) == 1 or args.untie_embeddings_and_output_weights:
        return [pp_ranks[0]]
    return [pp_ranks[0], pp_ranks[-1]]


# ---------------------------------------------------------------- MicroEP wiring


def install_micro_ep(model_cfg, args, micro_ep) -> None:
    """Install MicroEP into a GPTModelConfig through Megatron's extension points."""
    from megatron.training import get_tensorboard_writer, get_wandb_writer
    from megatron.training.models.gpt import default_layer_spec
    from megatron.training.utils import is_last_rank, print_rank_last

    from ..mcore.layer import use_micro_ep
    from .metrics import MetricsReporter
    from ..mcore.replicas import ReplicaSync

    def micro_ep_layer_spec(config, vp_stage=None):
        return use_micro_ep(default_layer_spec(config, vp_stage), micro_ep)

    if args.mtp_num_layers:
        _convert_mtp_layers(micro_ep)
    reporter = MetricsReporter(args.num_layers, args.log_interval, micro_ep.metrics_file,
                               mtp_layers=args.mtp_num_layers or 0)

    def report_metrics(model_chunks):
        iteration = getattr(args, "curr_iteration", 0) + 1
        reporter(model_chunks, iteration, writer=get_tensorboard_writer(), wandb_writer=get_wandb_writer(),
                 is_last_rank=is_last_rank(), print_fn=lambda text, flush=True: print_rank_last(text))

    sync = ReplicaSync(check_every=micro_ep.check_replicas_interval, after_step=[report_metrics])
    model_cfg.transformer_layer_spec = micro_ep_layer_spec
    model_cfg.pre_wrap_hooks.append(sync.attach)
    model_cfg.transformer.finalize_model_grads_func = sync
    if micro_ep.replacement_interval:
        _install_replacement(micro_ep, sync)


def _install_replacement(micro_ep, sync) -> None:
    """Run the re-placement controller after every optimizer step (``--micro-ep-placement adaptive``).

    Megatron's ``train()`` calls ``megatron.training.training.post_training_step_callbacks(model,
    optimizer, ..., iteration, ...)`` after each step and before the next forward, looked up as a
    module global at call time; it has no hook list, so the launcher wraps that one function (see
    ``patches/README.md``). The controller migrates experts and their optimizer state there. The
    policy's time gate gets the measured expert time per token, the micro-batches until the next
    check (interval x Megatron's current number of micro-batches) and the measured migration cost.
    """
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.training import training
    from megatron.training.utils import print_rank_0

    from ..mcore.replacement import AdaptivePolicy, ReplacementController

    controller = ReplacementController(AdaptivePolicy(micro_ep.replacement_threshold),
                                       micro_ep.replacement_interval, replica_sync=sync,
                                       micro_batches_per_iteration=get_num_microbatches,
                                       background=micro_ep.replacement_background)
    callbacks = training.post_training_step_callbacks

    @functools.wraps(callbacks)
    def with_replacement(model, optimizer, opt_param_scheduler, iteration, *args, **kwargs):
        result = callbacks(model, optimizer, opt_param_scheduler, iteration, *args, **kwargs)
        moved = controller.step(model, optimizer, iteration)
        if controller.applied_at == iteration:
            applied = (f" (applied after iteration {iteration})" if controller.checked_at != iteration else "")
            print_rank_0(f" MicroEP re-placement check [iteration {controller.checked_at}]{applied}: {len(moved)} "
                         f"layer(s) re-placed, {sum(r.moves for r in moved)} slots moved, "
                         f"{sum(r.bytes_moved for r in moved) / 1e6:.2f} MB, "
                         f"{max((r.ms for r in moved), default=0.0):.1f} ms | {controller.summary()}")
        return result

    training.post_training_step_callbacks = with_replacement


def _convert_mtp_layers(micro_ep) -> None:
    """Make the MoE layers of the multi-token-prediction block MicroMoELayers too.

    Megatron's ``GPTModelConfig.build_model`` derives the MTP block spec itself, from its default
    decoder layer spec (``megatron.training.models.gpt.mtp_block_spec``), not from
    ``transformer_layer_spec``; there is no extension point for it, so the launcher wraps that one
    function (looked up at call time by ``build_model``). Without this the MTP MoE layer would run
    as a stock MoELayer over the d x EP group: a different model.
    """
    from megatron.training.models import gpt

    from ..mcore.layer import use_micro_ep

    original = gpt.mtp_block_spec
    if getattr(original, "micro_ep", None) is not None:
        original = original.__wrapped__

    @functools.wraps(original)
    def mtp_block_spec(*args, **kwargs):
        return use_micro_ep(original(*args, **kwargs), micro_ep)

    mtp_block_spec.micro_ep = micro_ep
    gpt.mtp_block_spec = mtp_block_spec


def main(argv=None) -> None:
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        print_help()
    cpu_compat.apply()
    megatron_fixes.apply()
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from megatron.core.enums import ModelType
    from megatron.training import pretrain, print_rank_0
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args

    if os.environ.get("MICROMOE_CHECK_ARGS") == "1":
        # The launch scripts' pre-flight (scripts/train_*_node.sh): the same parse and checks as
        # every rank makes, once, before torchrun starts ranks, so a refused flag prints one line
        # instead of one per rank plus torchrun's ChildFailedError traceback.
        import logging

        logging.getLogger("megatron").setLevel(logging.WARNING)  # only the verdict: no dataset INFO lines
        parse_arguments(argv, quiet=True)
        return
    args, micro_ep, cpu_changes = parse_arguments(argv)
    if cpu_changes:
        print_rank_0(f"pretrain_gpt.py: no CUDA, running on CPU over gloo ({', '.join(cpu_changes)})")
    model_cfg = gpt_config_from_args(args)
    if micro_ep is not None:
        install_micro_ep(model_cfg, args, micro_ep)
        print_rank_0(f"pretrain_gpt.py: MicroEP on: d={micro_ep.replicas}, EP={args.micro_ep_vanilla_ep}, "
                     f"MicroEP group of {args.expert_model_parallel_size} ranks, placement {micro_ep.placement}")
    cfg = pretrain_cfg_container_from_args(args, model_cfg)
    pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step,
             get_embedding_ranks=get_embedding_ranks)
