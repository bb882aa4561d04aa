import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from palme_hf import ParallelTransformerBlock, PerceiverLayer, TransformerBlock

from helpers import fixture_path

PARITY_ATOL = 1e-5
CACHE_ATOL = 1e-5

BLOCK_CASES = {
    "parallel_block_seed_example": ParallelTransformerBlock,
    "parallel_block_small": ParallelTransformerBlock,
    "transformer_block_default": TransformerBlock,
    "transformer_block_lora": TransformerBlock,
    "transformer_block_qk_rmsnorm": TransformerBlock,
}


def load_case(case: str):
    state_dict = torch.load(fixture_path(case, "checkpoint.pt"), weights_only=True)
    with open(fixture_path(case, "kwargs.json")) as f:
        kwargs = json.load(f)
    return state_dict, kwargs, load_file(fixture_path(case, "io.safetensors"))


def lora_modules(tensors) -> tuple[nn.Linear, ...] | None:
    """The fixture's `(lora_q, lora_k, lora_v, lora_o)` as bias-free linear layers, or None."""
    if "lora_q.weight" not in tensors:
        return None
    modules = []
    for name in "qkvo":
        weight = tensors[f"lora_{name}.weight"]
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            module.weight.copy_(weight)
        modules.append(module)
    return tuple(modules)


def random_lora(dim: int, dim_head: int, heads: int) -> tuple[nn.Linear, ...]:
    return (
        nn.Linear(dim, heads * dim_head, bias=False),
        nn.Linear(dim, dim_head, bias=False),
        nn.Linear(dim, dim_head, bias=False),
        nn.Linear(heads * dim_head, dim, bias=False),
    )


# --- reference parity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_reference_parity(case, attn_implementation):
    state_dict, kwargs, tensors = load_case(case)
    block = (
        BLOCK_CASES[case]
        .from_reference_state_dict(state_dict, attn_implementation=attn_implementation, **kwargs)
        .eval()
    )
    with torch.no_grad():
        output = block(tensors["x"], finetune_modules=lora_modules(tensors))
    difference = (output - tensors["y"]).abs().max().item()
    print(f"{case} [{attn_implementation}]: max abs difference {difference:.3e}")
    assert output.shape == tensors["y"].shape
    assert difference <= PARITY_ATOL


def test_lora_given_to_constructor_reproduces_reference_and_is_registered():
    state_dict, kwargs, tensors = load_case("transformer_block_lora")
    modules = lora_modules(tensors)
    block = TransformerBlock.from_reference_state_dict(state_dict, finetune_modules=modules, **kwargs).eval()
    assert block.finetune_modules[0] is modules[0]
    assert "finetune_modules.3.weight" in block.state_dict()
    with torch.no_grad():
        output = block(tensors["x"])
    assert (output - tensors["y"]).abs().max().item() <= PARITY_ATOL


def test_lora_given_to_forward_overrides_the_constructor_ones():
    state_dict, kwargs, tensors = load_case("transformer_block_lora")
    other = random_lora(kwargs["dim"], kwargs["dim_head"], kwargs["heads"])
    block = TransformerBlock.from_reference_state_dict(state_dict, finetune_modules=other, **kwargs).eval()
    with torch.no_grad():
        overridden = block(tensors["x"], finetune_modules=lora_modules(tensors))
        with_constructor_modules = block(tensors["x"])
    assert (overridden - tensors["y"]).abs().max().item() <= PARITY_ATOL
    assert (with_constructor_modules - tensors["y"]).abs().max().item() > 1e-3


def test_reference_state_dict_problems_are_named():
    state_dict, kwargs, _ = load_case("transformer_block_default")
    missing = {key: value for key, value in state_dict.items() if key != "attn_out.weight"}
    with pytest.raises(ValueError, match="missing keys \\['attn_out.weight'\\]"):
        TransformerBlock.from_reference_state_dict(missing, **kwargs)
    with pytest.raises(ValueError, match="unexpected keys \\['extra.weight'\\]"):
        TransformerBlock.from_reference_state_dict({**state_dict, "extra.weight": torch.zeros(1)}, **kwargs)
    with pytest.raises(ValueError, match="wrongly shaped tensors \\['ff_out.2.weight"):
        TransformerBlock.from_reference_state_dict({**state_dict, "ff_out.2.weight": torch.zeros(3, 3)}, **kwargs)
    with pytest.raises(ValueError, match=r"fused_attn_ff_proj.weight \(608, 64\) \(expected \(576, 64\)\)"):
        TransformerBlock.from_reference_state_dict(state_dict, **{**kwargs, "heads": 2})
    with pytest.raises(ValueError, match="norm.beta"):
        TransformerBlock.from_reference_state_dict({**state_dict, "norm.beta": torch.ones(kwargs["dim"])}, **kwargs)
    zeta_state_dict, zeta_kwargs, _ = load_case("parallel_block_small")
    with pytest.raises(
        ValueError, match="missing keys \\['ff_out.1.weight'\\].*unexpected keys \\['ff_out.2.weight'\\]"
    ):
        ParallelTransformerBlock.from_reference_state_dict(
            {
                ("ff_out.2.weight" if key == "ff_out.1.weight" else key): value
                for key, value in zeta_state_dict.items()
            },
            **zeta_kwargs,
        )


# --- attention implementation ----------------------------------------------------------------------------------------


def test_flash_attn_selects_sdpa_with_identical_results():
    eager = TransformerBlock(32, dim_head=8, heads=4, qk_rmsnorm=True).eval()
    sdpa = TransformerBlock(32, dim_head=8, heads=4, qk_rmsnorm=True, flash_attn=True).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    with torch.no_grad():
        torch.testing.assert_close(eager(x), sdpa(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(eager(x, mask)[0, 3:], sdpa(x, mask)[0, 3:], atol=1e-6, rtol=0)


def test_perceiver_eager_and_sdpa_agree():
    eager = PerceiverLayer(32, 4, 2, dim_head=8).eval()
    sdpa = PerceiverLayer(32, 4, 2, dim_head=8, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    mask = torch.rand(2, 7) > 0.3
    with torch.no_grad():
        torch.testing.assert_close(eager(q, k, v, mask), sdpa(q, k, v, mask), atol=1e-6, rtol=0)


def test_block_reads_a_shared_config():
    config = TransformerBlock(16, dim_head=8, heads=2).config
    block = ParallelTransformerBlock(16, dim_head=8, heads=2, config=config)
    assert block.self_attn.config is config
    config._attn_implementation = "sdpa"
    assert block(torch.randn(1, 3, 16)).shape == (1, 3, 16)


# --- cache equivalence -----------------------------------------------------------------------------------------------


def make_block(variant: str, attn_implementation: str) -> tuple[TransformerBlock, dict]:
    if variant == "parallel":
        return ParallelTransformerBlock(
            32, dim_head=8, heads=4, attn_implementation=attn_implementation, layer_idx=1
        ), {}
    if variant == "lora":
        block = TransformerBlock(32, dim_head=8, heads=4, attn_implementation=attn_implementation, layer_idx=1)
        return block, {"finetune_modules": random_lora(32, 8, 4)}
    options = {"xpos": {}, "qk_rmsnorm": {"qk_rmsnorm": True}}[variant]
    return TransformerBlock(
        32, dim_head=8, heads=4, attn_implementation=attn_implementation, layer_idx=1, **options
    ), {}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["parallel", "xpos", "qk_rmsnorm", "lora"])
def test_token_by_token_cache_matches_full_forward(variant, attn_implementation):
    block, forward_kwargs = make_block(variant, attn_implementation)
    block.eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        full = block(x, **forward_kwargs)
        cache = DynamicCache()
        steps = torch.cat([block(x[:, i : i + 1], cache=cache, **forward_kwargs) for i in range(10)], dim=1)
    torch.testing.assert_close(steps, full, atol=CACHE_ATOL, rtol=0)
    # multi-query: the cache holds the single key/value head, at the block's layer index
    assert cache.layers[1].keys.shape == (2, 1, 10, 8)
    assert cache.layers[1].values.shape == (2, 1, 10, 8)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_chunked_prefill_then_decode_matches_full_forward(attn_implementation):
    block = TransformerBlock(32, dim_head=8, heads=4, attn_implementation=attn_implementation).eval()
    x = torch.randn(1, 12, 32)
    with torch.no_grad():
        full = block(x)
        cache = DynamicCache()
        parts = [block(x[:, :5], cache=cache), block(x[:, 5:9], cache=cache)]
        parts += [block(x[:, i : i + 1], cache=cache) for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=CACHE_ATOL, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padding_mask_with_cache_matches_full_forward(attn_implementation):
    block = TransformerBlock(32, dim_head=8, heads=4, attn_implementation=attn_implementation).eval()
    x = torch.randn(2, 8, 32)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    with torch.no_grad():
        full = block(x, attention_mask)
        cache = DynamicCache()
        steps = torch.cat([block(x[:, i : i + 1], attention_mask[:, : i + 1], cache=cache) for i in range(8)], dim=1)
        other_padding = x.clone()
        other_padding[1, :3] = torch.randn(3, 32)
        changed = block(other_padding, attention_mask)
    # padded positions' own outputs are meaningless; every real token must match
    torch.testing.assert_close(steps[0], full[0], atol=CACHE_ATOL, rtol=0)
    torch.testing.assert_close(steps[1, 3:], full[1, 3:], atol=CACHE_ATOL, rtol=0)
    torch.testing.assert_close(changed[1, 3:], full[1, 3:], atol=1e-6, rtol=0)


def test_explicit_position_ids_match_default_positions():
    block = TransformerBlock(32, dim_head=8, heads=4).eval()
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        full = block(x)
        cache = DynamicCache()
        block(x[:, :4], cache=cache, position_ids=torch.arange(4)[None])
        tail = block(x[:, 4:], cache=cache, position_ids=torch.arange(4, 6)[None])
    torch.testing.assert_close(tail, full[:, 4:], atol=CACHE_ATOL, rtol=0)


def test_causal_and_non_causal_attention():
    x = torch.randn(1, 6, 32)
    later_changed = x.clone()
    later_changed[:, -1] = torch.randn(32)
    causal = TransformerBlock(32, dim_head=8, heads=4).eval()
    bidirectional = TransformerBlock(32, dim_head=8, heads=4, causal=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(causal(x)[:, :-1], causal(later_changed)[:, :-1], atol=1e-6, rtol=0)
        assert (bidirectional(x)[:, 0] - bidirectional(later_changed)[:, 0]).abs().max() > 1e-4
        with pytest.raises(ValueError, match="causal"):
            bidirectional(x, cache=DynamicCache())


# --- PerceiverLayer --------------------------------------------------------------------------------------------------


def test_perceiver_documented_example_shape():
    q, k, v = torch.randn(1, 32, 512), torch.randn(1, 32, 512), torch.randn(1, 32, 512)
    layer = PerceiverLayer(512, 8, 6, 64)
    assert layer(q, k, v).shape == (1, 32, 512)
    assert len(layer.layers) == 6


def test_perceiver_output_has_the_query_shape_for_any_context_length():
    layer = PerceiverLayer(32, 4, 2, dim_head=8).eval()
    assert layer(torch.randn(3, 4, 32), torch.randn(3, 11, 32), torch.randn(3, 11, 32)).shape == (3, 4, 32)


def test_perceiver_mask_removes_the_influence_of_masked_positions():
    layer = PerceiverLayer(32, 4, 2, dim_head=8).eval()
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, :2] = False
    k_changed, v_changed = k.clone(), v.clone()
    k_changed[~mask] = torch.randn(int((~mask).sum()), 32)
    v_changed[~mask] = torch.randn(int((~mask).sum()), 32)
    with torch.no_grad():
        masked = layer(q, k, v, mask)
        torch.testing.assert_close(layer(q, k_changed, v_changed, mask), masked, atol=1e-6, rtol=0)
        # the same as leaving the masked positions out
        torch.testing.assert_close(layer(q[:1], k[:1, :6], v[:1, :6]), masked[:1], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            layer(q, k, v, torch.ones(2, 9, dtype=torch.bool)), layer(q, k, v), atol=1e-6, rtol=0
        )
        assert (layer(q, k_changed, v_changed) - masked).abs().max() > 1e-4


@pytest.mark.parametrize("wrap", [False, True])
def test_perceiver_caches_cross_attention_keys_and_values(wrap):
    layer = PerceiverLayer(32, 4, 3, dim_head=8, layer_idx=2).eval()
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    mask = torch.rand(2, 7) > 0.3
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if wrap else DynamicCache()
    cross_cache = cache.cross_attention_cache if wrap else cache
    with torch.no_grad():
        expected = layer(q, k, v, mask)
        first = layer(q, k, v, mask, cache=cache)
        again = layer(q, mask=mask, cache=cache)
        other_query = torch.randn(2, 5, 32)
        reused = layer(other_query, mask=mask, cache=cache)
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(reused, layer(other_query, k, v, mask), atol=1e-6, rtol=0)
    # one entry per layer, at layer_idx .. layer_idx + depth - 1, not appended to on reuse
    for index in (2, 3, 4):
        assert cross_cache.layers[index].keys.shape == (2, 4, 7, 8)
    if wrap:
        assert cache.self_attention_cache.get_seq_length() == 0


def test_perceiver_bad_inputs():
    layer = PerceiverLayer(32, 4, 1, dim_head=8)
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    with pytest.raises(ValueError, match="`q` must have shape"):
        layer(torch.randn(2, 5, 16), k, v)
    with pytest.raises(ValueError, match="`k` and `v` must both have shape"):
        layer(q, k, torch.randn(2, 6, 32))
    with pytest.raises(ValueError, match="both `k` and `v`"):
        layer(q, k)
    with pytest.raises(ValueError, match="unless `cache`"):
        layer(q)
    with pytest.raises(ValueError, match="`mask` must have shape"):
        layer(q, k, v, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="`depth` must be a positive integer, got 0"):
        PerceiverLayer(32, 4, 0)


# --- bad input -------------------------------------------------------------------------------------------------------


def test_block_bad_inputs():
    block = TransformerBlock(32, dim_head=8, heads=4)
    with pytest.raises(
        ValueError, match=r"`hidden_states` must have shape \(batch_size, seq_len, 32\), got \(1, 3, 16\)"
    ):
        block(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape .* = \(1, 3\), got \(1, 4\)"):
        block(torch.randn(1, 3, 32), torch.ones(1, 4))
    with pytest.raises(ValueError, match="four modules"):
        block(torch.randn(1, 3, 32), finetune_modules=(nn.Identity(),))
    with pytest.raises(ValueError, match="`dim` must be a positive integer, got 0"):
        ParallelTransformerBlock(0)
    with pytest.raises(ValueError, match="`heads` must be a positive integer, got -2"):
        TransformerBlock(32, heads=-2)
    with pytest.raises(ValueError, match="`dim_head` must be even"):
        TransformerBlock(32, dim_head=7)
    with pytest.raises(ValueError, match="`attn_dropout`"):
        TransformerBlock(32, attn_dropout=1.5)
    with pytest.raises(ValueError, match="`attn_implementation` must be one of"):
        ParallelTransformerBlock(32, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="either `config` or `flash_attn=True`"):
        TransformerBlock(32, flash_attn=True, config=block.config)


def test_blocks_train():
    block = TransformerBlock(32, dim_head=8, heads=4, attn_dropout=0.1, ff_dropout=0.1)
    lora = random_lora(32, 8, 4)
    x = torch.randn(2, 5, 32)
    block(x, finetune_modules=lora).sum().backward()
    assert block.self_attn.q_proj.weight.grad is not None
    assert all(module.weight.grad is not None for module in lora)


def test_a_block_without_its_own_rotary_embedding_takes_the_models():
    # A model's parallel layers share the text model's rotary embedding and causal mask, computed once per forward.
    block = ParallelTransformerBlock(32, dim_head=8, heads=4, own_rotary=False).eval()
    assert block.rotary_emb is None
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="built with `own_rotary=False`: pass `position_embeddings`"):
        block(x)
    own = ParallelTransformerBlock(32, dim_head=8, heads=4).eval()
    own.load_state_dict(block.state_dict())
    positions = torch.arange(5).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(block(x, position_embeddings=own.rotary_emb(positions)), own(x))
