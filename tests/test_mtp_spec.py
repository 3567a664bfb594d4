"""Multi-token-prediction blocks: their MoE layers become MicroMoELayers (single process)."""

from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from micromoe_megatron.mcore.config import MicroEPConfig
from micromoe_megatron.mcore.layer import MicroMoELayer, use_micro_ep


def _mlp_kind(mlp):
    return getattr(mlp, "func", None) or getattr(mlp, "module", None)


def test_mtp_block_moe_layer_is_converted_and_the_original_is_untouched(monkeypatch):
    # Megatron builds the MTP block on the last pipeline stage; no process groups here.
    monkeypatch.setattr(parallel_state, "is_pipeline_last_stage", lambda *args, **kwargs: True)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=8,
                               mtp_num_layers=2, use_cpu_initialization=True)
    block = get_gpt_mtp_block_spec(config, get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False),
                                   use_transformer_engine=False)
    settings = MicroEPConfig(replicas=2)
    micro = use_micro_ep(block, settings)
    assert len(micro.layer_specs) == 2
    for layer in micro.layer_specs:
        mlp = layer.submodules.mtp_model_layer.submodules.mlp
        assert _mlp_kind(mlp) is MicroMoELayer and mlp.keywords["micro_ep"] is settings
    assert all(_mlp_kind(layer.submodules.mtp_model_layer.submodules.mlp) is MoELayer for layer in block.layer_specs)


def test_no_mtp_block_stays_none():
    assert use_micro_ep(None, MicroEPConfig(replicas=2)) is None
