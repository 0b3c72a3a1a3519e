import pytest

from evomerge.checkpoint import Block, count_layers, locate

# (name, layer, block) for each supported naming scheme
CASES = {
    "llama / mistral / qwen2": [
        ("model.embed_tokens.weight", None, Block.EMBEDDING),
        ("model.layers.0.self_attn.q_proj.weight", 0, Block.ATTENTION),
        ("model.layers.11.self_attn.o_proj.weight", 11, Block.ATTENTION),
        ("model.layers.3.self_attn.k_proj.bias", 3, Block.ATTENTION),  # qwen2 has biases
        ("model.layers.3.mlp.gate_proj.weight", 3, Block.MLP),
        ("model.layers.3.mlp.down_proj.weight", 3, Block.MLP),
        ("model.layers.3.input_layernorm.weight", 3, Block.NORM),
        ("model.layers.3.post_attention_layernorm.weight", 3, Block.NORM),
        ("model.norm.weight", None, Block.NORM),
        ("lm_head.weight", None, Block.HEAD),
    ],
    "gemma": [
        ("model.layers.2.pre_feedforward_layernorm.weight", 2, Block.NORM),
        ("model.layers.2.post_feedforward_layernorm.weight", 2, Block.NORM),
        ("model.layers.2.self_attn.q_norm.weight", 2, Block.NORM),
        ("model.layers.2.self_attn.v_proj.weight", 2, Block.ATTENTION),
    ],
    "phi-3": [
        ("model.layers.5.self_attn.qkv_proj.weight", 5, Block.ATTENTION),
        ("model.layers.5.mlp.gate_up_proj.weight", 5, Block.MLP),
    ],
    "gpt-2": [
        ("transformer.wte.weight", None, Block.EMBEDDING),
        ("transformer.wpe.weight", None, Block.EMBEDDING),
        ("transformer.h.7.attn.c_attn.weight", 7, Block.ATTENTION),
        ("transformer.h.7.attn.c_proj.bias", 7, Block.ATTENTION),
        ("transformer.h.7.mlp.c_fc.weight", 7, Block.MLP),
        ("transformer.h.7.mlp.c_proj.weight", 7, Block.MLP),
        ("transformer.h.7.ln_1.weight", 7, Block.NORM),
        ("transformer.ln_f.bias", None, Block.NORM),
    ],
    "gpt-neox": [
        ("gpt_neox.embed_in.weight", None, Block.EMBEDDING),
        ("gpt_neox.layers.4.attention.query_key_value.weight", 4, Block.ATTENTION),
        ("gpt_neox.layers.4.attention.dense.bias", 4, Block.ATTENTION),
        ("gpt_neox.layers.4.mlp.dense_h_to_4h.weight", 4, Block.MLP),
        ("gpt_neox.layers.4.post_attention_layernorm.weight", 4, Block.NORM),
        ("gpt_neox.final_layer_norm.weight", None, Block.NORM),
        ("embed_out.weight", None, Block.HEAD),
    ],
}


@pytest.mark.parametrize(
    "name,layer,block", [case for cases in CASES.values() for case in cases], ids=lambda x: str(x)
)
def test_tensor_is_located_by_layer_and_block(name, layer, block):
    loc = locate(name)
    assert (loc.layer, loc.block) == (layer, block)


def test_unknown_tensors_are_other_but_keep_their_layer():
    assert locate("model.layers.2.block_sparse_moe.gate.weight").block is Block.OTHER
    assert locate("model.layers.2.block_sparse_moe.gate.weight").layer == 2
    assert locate("score.weight").block is Block.OTHER


def test_layer_index_is_not_fooled_by_digits_elsewhere():
    assert locate("model.layers_extra.3.foo").layer is None
    assert locate("model.layers.3.mlp.experts.12.w1.weight").layer == 3


def test_count_layers_is_one_more_than_the_highest_index():
    names = [n for n, _, _ in CASES["gpt-2"]] + ["transformer.h.11.ln_2.weight"]
    assert count_layers(names) == 12
    assert count_layers(["lm_head.weight"]) == 0
