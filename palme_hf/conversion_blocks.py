"""Loading the reference implementations' checkpoints into the documented blocks: the key mapping and the checks
behind `TransformerBlock.from_reference_state_dict`, `ParallelTransformerBlock.from_reference_state_dict` and
`HierarchicalBlock.from_reference_state_dict` (the zeta PalmE converter, `conversion_zeta.py`, shares the check)."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


def check_state_dict_shapes(state_dict: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple], what: str):
    """
    Raises a `ValueError` naming every missing, unexpected and wrongly shaped tensor of a reference `state_dict`,
    given the shape expected for each of its keys; `what` says what the state dict should fit.
    """
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    misshapen = sorted(
        f"{key} {tuple(state_dict[key].shape)} (expected {tuple(shape)})"
        for key, shape in expected_shapes.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(shape)
    )
    if missing or unexpected or misshapen:
        raise ValueError(
            f"The state dict does not fit {what}: missing keys {missing}, unexpected keys {unexpected}, wrongly "
            f"shaped tensors {misshapen}."
        )


@dataclass(frozen=True)
class ParallelBlockReference:
    """How a reference parallel block stores its weights."""

    feed_forward_key: str
    norm_gain_offset: float  # the reference's LayerNorm gain is `gamma + norm_gain_offset`
    buffers: tuple[str, ...]  # fixed buffers it saves, checked rather than loaded
    # Its attention scales by `dim_head ** -0.5` whatever its `qk_scale` says.
    ignores_qk_scale: bool = False


PARALLEL_BLOCK_REFERENCES = {
    # palm-rlhf-pytorch 0.8.0's ParallelTransformerBlock, the working original of zeta's TransformerBlock
    "TransformerBlock": ParallelBlockReference(
        "ff_out.2.weight", 1.0, ("norm.beta", "rotary_emb.inv_freq", "rotary_emb.scale"), ignores_qk_scale=True
    ),
    # zetascale 2.8.8's ParallelTransformerBlock: no xpos
    "ParallelTransformerBlock": ParallelBlockReference("ff_out.1.weight", 0.0, ("norm.beta", "rotary_emb.inv_freq")),
}


def load_parallel_block_reference(
    block_class: type, state_dict: Mapping[str, torch.Tensor], kwargs: dict
) -> nn.Module:
    """
    Builds `block_class` (`TransformerBlock` or `ParallelTransformerBlock`) from the reference's constructor keyword
    arguments and loads the reference's state dict. The reference's fused projection `fused_attn_ff_proj` (queries,
    the key head, the value head, the feed-forward's value half, the feed-forward's gate half) is split into
    `self_attn.q_proj`, `k_proj`, `v_proj`, `mlp.up_proj` and `mlp.gate_proj`.

    Raises:
        `ValueError`: missing, unexpected or wrongly shaped keys, or a fixed buffer (the LayerNorm's zero bias, the
        rotary frequencies) that differs from what the block computes.
    """
    layout = PARALLEL_BLOCK_REFERENCES[block_class.__name__]
    constructor_kwargs = kwargs
    if layout.ignores_qk_scale and kwargs.get("qk_rmsnorm", False):
        constructor_kwargs = {**kwargs, "qk_scale": kwargs.get("dim_head", 64) ** -0.5}
    block = block_class(**constructor_kwargs)
    attention = block.self_attn
    inner_dim = block.mlp.up_proj.out_features
    split_sizes = (
        attention.num_heads * attention.head_dim,
        attention.head_dim,
        attention.head_dim,
        inner_dim,
        inner_dim,
    )
    all_buffers = {
        "norm.beta": torch.zeros(block.hidden_size),
        "rotary_emb.inv_freq": block.rotary_emb.inv_freq,
        "rotary_emb.scale": block.rotary_emb.xpos_scale,
    }
    fixed_buffers = {key: all_buffers[key] for key in layout.buffers}
    expected_shapes = {
        "norm.gamma": (block.hidden_size,),
        "fused_attn_ff_proj.weight": (sum(split_sizes), block.hidden_size),
        "attn_out.weight": tuple(attention.o_proj.weight.shape),
        layout.feed_forward_key: tuple(block.mlp.down_proj.weight.shape),
        **{key: tuple(value.shape) for key, value in fixed_buffers.items()},
    }
    if attention.q_norm is not None:
        expected_shapes["q_scale"] = tuple(attention.q_norm.weight.shape)
        expected_shapes["k_scale"] = tuple(attention.k_norm.weight.shape)

    check_state_dict_shapes(state_dict, expected_shapes, f"a reference {block_class.__name__} built with {kwargs}")
    for key, value in fixed_buffers.items():
        if not torch.allclose(state_dict[key].float().cpu(), value.float().cpu()):
            raise ValueError(f"The reference buffer `{key}` differs from the fixed value this block computes.")

    q_weight, k_weight, v_weight, up_weight, gate_weight = state_dict["fused_attn_ff_proj.weight"].split(split_sizes)
    weights = {
        "input_layernorm.weight": state_dict["norm.gamma"] + layout.norm_gain_offset,
        "self_attn.q_proj.weight": q_weight,
        "self_attn.k_proj.weight": k_weight,
        "self_attn.v_proj.weight": v_weight,
        "self_attn.o_proj.weight": state_dict["attn_out.weight"],
        "mlp.up_proj.weight": up_weight,
        "mlp.gate_proj.weight": gate_weight,
        "mlp.down_proj.weight": state_dict[layout.feed_forward_key],
    }
    if attention.q_norm is not None:
        weights["self_attn.q_norm.weight"] = state_dict["q_scale"]
        weights["self_attn.k_norm.weight"] = state_dict["k_scale"]
    if getattr(block, "finetune_modules", None) is not None:
        # The reference keeps LoRA modules outside the block: those given to the constructor stay as they are.
        weights.update(
            {f"finetune_modules.{key}": value for key, value in block.finetune_modules.state_dict().items()}
        )
    block.load_state_dict(weights)
    return block


def load_hierarchical_block_reference(
    block_class: type, state_dict: Mapping[str, torch.Tensor], kwargs: dict
) -> nn.Module:
    """
    Builds `block_class` (`HierarchicalBlock`) from the reference's constructor keyword arguments and loads the
    reference's state dict
    (`torch.save(block.state_dict())`). The reference's fused `attn.to_qkv` is split into `self_attn.q_proj`,
    `k_proj` and `v_proj`. Full attention in the reference rotates interleaved feature pairs `(2i, 2i + 1)`, this
    block rotates halves `(i, i + dim_head // 2)`: the rows of each query and key head are reordered to match
    (attention scores are unchanged by reordering the features of queries and keys alike).

    Raises:
        `ValueError`: missing, unexpected or wrongly shaped keys.
    """
    block = block_class(**kwargs)
    attention = block.self_attn
    # reference key -> this block's key, for the tensors that are only renamed
    renamed = {
        "ff.net.0.gamma": "mlp_norm.weight",
        "ff.net.1.weight": "mlp.fc1.weight",
        "ff.net.3.weight": "mlp.fc2.weight",
    }
    if attention is not None:
        renamed["attn.to_out.weight"] = "self_attn.o_proj.weight"
        if block.window_size is None:
            renamed["attn.norm.gamma"] = "self_attn_norm.weight"
            renamed["attn.rotary_emb.freqs"] = "rotary_emb.inv_freq"
        else:
            renamed["attn.norm.weight"] = "self_attn_norm.weight"
            renamed["attn.norm.bias"] = "self_attn_norm.bias"
            renamed["attn.attn_fn.rel_pos.inv_freq"] = "rotary_emb.inv_freq"

    own_shapes = {key: tuple(value.shape) for key, value in block.state_dict().items()}
    expected_shapes = {key: own_shapes[own_key] for key, own_key in renamed.items()}
    if attention is not None:
        expected_shapes["attn.to_qkv.weight"] = (3 * attention.num_heads * attention.head_dim, block.hidden_size)

    check_state_dict_shapes(state_dict, expected_shapes, f"a reference HierarchicalBlock built with {kwargs}")

    weights = {own_key: state_dict[key] for key, own_key in renamed.items()}
    if attention is not None:
        q_weight, k_weight, v_weight = state_dict["attn.to_qkv.weight"].chunk(3)
        if block.window_size is None:
            head_dim = attention.head_dim
            # new feature i <- old 2i, new feature head_dim // 2 + i <- old 2i + 1, in every head
            order = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
            order = (torch.arange(attention.num_heads)[:, None] * head_dim + order).flatten()
            q_weight, k_weight = q_weight[order], k_weight[order]
        weights["self_attn.q_proj.weight"] = q_weight
        weights["self_attn.k_proj.weight"] = k_weight
        weights["self_attn.v_proj.weight"] = v_weight
    block.load_state_dict(weights)
    return block
