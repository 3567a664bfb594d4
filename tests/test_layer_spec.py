"""The layer-spec transform and MicroEPConfig validation (single process, no process groups)."""

import pytest
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

from micromoe_megatron.mcore.config import LayoutError, MicroEPConfig
from micromoe_megatron.mcore.layer import MicroMoELayer, use_micro_ep


def test_local_layer_spec_gets_a_micro_moe_layer_and_the_original_is_untouched():
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    settings = MicroEPConfig(replicas=2)
    micro = use_micro_ep(spec, settings)
    assert micro.submodules.mlp.func is MicroMoELayer
    assert micro.submodules.mlp.keywords["micro_ep"] is settings
    assert micro.submodules.mlp.keywords["submodules"] is spec.submodules.mlp.keywords["submodules"]
    assert spec.submodules.mlp.func is MoELayer


def test_dense_layers_are_left_alone():
    spec = get_gpt_layer_local_spec()
    assert use_micro_ep(spec, MicroEPConfig(replicas=2)).submodules.mlp is spec.submodules.mlp


def test_decoder_block_spec_with_mixed_dense_and_moe_layers():
    # The shape get_gpt_decoder_block_spec returns: TransformerBlockSubmodules(layer_specs=[...]).
    moe, dense = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False), get_gpt_layer_local_spec()
    block = TransformerBlockSubmodules(layer_specs=[moe, dense, moe, dense])
    micro = use_micro_ep(block, MicroEPConfig(replicas=2))
    kinds = [getattr(layer.submodules.mlp, "func", None) for layer in micro.layer_specs]
    assert kinds[0] is MicroMoELayer and kinds[2] is MicroMoELayer
    assert kinds[1] is not MicroMoELayer and kinds[3] is not MicroMoELayer
    assert [layer.submodules.mlp.func for layer in block.layer_specs[::2]] == [MoELayer, MoELayer]
    wrapped = use_micro_ep(ModuleSpec(module=TransformerBlock, submodules=block), MicroEPConfig(replicas=2))
    assert wrapped.submodules.layer_specs[0].submodules.mlp.func is MicroMoELayer


@pytest.mark.parametrize("kwargs,message", [
    (dict(replicas=0), "--micro-ep must be >= 1"),
    (dict(replicas=2, placement="ring"), "--micro-ep-placement 'ring' is unknown"),
    (dict(replicas=2, placement="custom"), "needs --micro-ep-placement-file"),
    (dict(replicas=2, solver_work_limit=0), "--micro-ep-solver-work-limit must be in \\[1, 2\\*\\*62\\)"),
])
def test_config_errors_name_the_flag(kwargs, message):
    with pytest.raises(LayoutError, match=message):
        MicroEPConfig(**kwargs)


@pytest.mark.parametrize("args,message", [
    (dict(num_experts=8, micro_ep_size=6), "--micro-ep 4 must divide the MicroEP group size 6"),
    (dict(num_experts=6, micro_ep_size=16), "--num-experts 6 must be divisible by the expert-parallel size 4"),
    (dict(num_experts=8, micro_ep_size=8, world_expert_dp=6), "must divide the expert data-parallel size 6"),
    (dict(num_experts=8, micro_ep_size=8, expert_tp=2), "--expert-tensor-parallel-size 2 is not supported"),
])
def test_layout_errors_name_the_flag(args, message):
    with pytest.raises(LayoutError, match=message):
        MicroEPConfig(replicas=4).validate_layout(**args)


def test_valid_layout_returns_vanilla_ep():
    assert MicroEPConfig(replicas=2).validate_layout(num_experts=8, micro_ep_size=4, world_expert_dp=4) == 2
