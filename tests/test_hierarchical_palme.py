import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache, StaticCache

from palme_hf import HierarchicalBlock, PalmEForConditionalGeneration
from palme_hf.hierarchical_palme import create_hierarchical_mask
from palme_hf.layers_palme import WindowedAttentionMask

from helpers import FIXTURES, fixture_path, tiny_inputs, tiny_model

FIXTURE_CASES = ["hierarchical_block_full", "hierarchical_block_window", "hierarchical_block_compress"]
PARITY_ATOL = 1e-5
CACHE_ATOL = 1e-5

# Random-init layouts beyond the fixtures: full/window attention, with and without groups (compress_factor // stride),
# and a feed-forward-only block (window_size=0).
CACHE_LAYOUTS = [
    dict(window_size=None),
    dict(window_size=3),
    dict(window_size=None, compress_factor=4, stride=2),
    dict(window_size=2, compress_factor=4),
    dict(window_size=2, compress_factor=8, stride=2),
    dict(window_size=0, compress_factor=2),
]


def load_case(case: str):
    with open(fixture_path(case, "kwargs.json")) as f:
        kwargs = json.load(f)
    state_dict = torch.load(fixture_path(case, "checkpoint.pt"), weights_only=True)
    return kwargs, state_dict, load_file(fixture_path(case, "io.safetensors"))


def small_block(**kwargs) -> HierarchicalBlock:
    block = HierarchicalBlock(dim=32, dim_head=8, heads=2, **kwargs).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return block


def make_cache(block: HierarchicalBlock, cache_class: str):
    if cache_class == "dynamic":
        return DynamicCache(config=block.config)
    return StaticCache(config=block.config, max_cache_len=24)


def run_in_chunks(block: HierarchicalBlock, x: torch.Tensor, chunk_sizes, cache, attention_mask=None) -> torch.Tensor:
    """Feeds `x` through `block` chunk by chunk with `cache`; with a 2-D `attention_mask`, its prefix so far."""
    outputs, start = [], 0
    for size in chunk_sizes:
        mask = None if attention_mask is None else attention_mask[:, : start + size]
        outputs.append(block(x[:, start : start + size], attention_mask=mask, cache=cache))
        start += size
    assert start == x.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_reference_parity(case):
    kwargs, state_dict, io = load_case(case)
    block = HierarchicalBlock.from_reference_state_dict(state_dict, **kwargs).eval()
    with torch.no_grad():
        output = block(io["x"])
    difference = (output - io["y"]).abs().max().item()
    print(f"{case}: max abs difference {difference:.2e}")
    assert output.shape == io["x"].shape
    assert difference <= PARITY_ATOL


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_reference_parity_token_by_token(case):
    kwargs, state_dict, io = load_case(case)
    block = HierarchicalBlock.from_reference_state_dict(state_dict, **kwargs).eval()
    seq_len = io["x"].shape[1]
    with torch.no_grad():
        output = run_in_chunks(block, io["x"], [1] * seq_len, DynamicCache(config=block.config))
    torch.testing.assert_close(output, io["y"], atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_eager_and_sdpa_agree(case):
    kwargs, state_dict, io = load_case(case)
    eager = HierarchicalBlock.from_reference_state_dict(state_dict, **kwargs, attn_implementation="eager").eval()
    sdpa = HierarchicalBlock.from_reference_state_dict(state_dict, **kwargs, attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        eager_output, sdpa_output = eager(io["x"]), sdpa(io["x"])
        sdpa.config._attn_implementation = "eager"
        switched_output = sdpa(io["x"])
    torch.testing.assert_close(eager_output, sdpa_output, atol=1e-6, rtol=0)
    torch.testing.assert_close(switched_output, eager_output, atol=0, rtol=0)


@pytest.mark.parametrize("layout", CACHE_LAYOUTS, ids=str)
@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
def test_cache_matches_full_forward(layout, cache_class):
    block = small_block(**layout)
    x = torch.randn(2, 19, 32)
    with torch.no_grad():
        full = block(x)
        # a prompt, single tokens, then a chunk: every way a cache is fed during generation
        cached = run_in_chunks(block, x, [5] + [1] * 7 + [7], make_cache(block, cache_class))
    torch.testing.assert_close(cached, full, atol=CACHE_ATOL, rtol=0)


@pytest.mark.parametrize("layout", [dict(window_size=3), dict(window_size=2, compress_factor=8, stride=2)], ids=str)
def test_window_cache_stays_bounded(layout):
    block = small_block(**layout)
    assert block.cache_layer_type == "hybrid_sliding"
    assert block.sliding_window == layout["window_size"] * block.group_size + 1
    cache = DynamicCache(config=block.config)
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        full = block(x)
        cached = run_in_chunks(block, x, [1] * 40, cache)
    torch.testing.assert_close(cached, full, atol=CACHE_ATOL, rtol=0)
    # the window needs the keys of the last `window_size` steps of every group, no more
    assert cache.layers[0].keys.shape[-2] == block.sliding_window - 1
    assert cache.get_seq_length() == 40
    # the token-shift state: the last `group_size` tokens' shifted halves, for attention and feed-forward
    assert [tuple(state.shape) for state in cache.layers[0].conv_states.values()] == [(1, 16, block.group_size)] * 2


@pytest.mark.parametrize(
    "layout", [dict(window_size=2, compress_factor=2), dict(compress_factor=4, stride=2)], ids=str
)
@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
def test_padding_mask_with_cache_matches_full_forward(layout, cache_class):
    block = small_block(**layout)
    x = torch.randn(2, 12, 32)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, :3] = 0
    is_token = attention_mask.bool()
    other_padding = x.clone()
    other_padding[1, :3] = torch.randn(3, 32)
    with torch.no_grad():
        full = block(x, attention_mask=attention_mask)
        cached = run_in_chunks(block, x, [4] + [1] * 8, make_cache(block, cache_class), attention_mask)
        with_other_padding = block(other_padding, attention_mask=attention_mask)
        unmasked = block(x)
    # outputs at padding positions are meaningless; at tokens they match and do not depend on the padding
    torch.testing.assert_close(cached[is_token], full[is_token], atol=CACHE_ATOL, rtol=0)
    torch.testing.assert_close(with_other_padding[is_token], full[is_token], atol=0, rtol=0)
    torch.testing.assert_close(full[0], unmasked[0], atol=0, rtol=0)


def test_four_dimensional_mask_is_combined_with_the_block_mask():
    block = small_block(window_size=None, compress_factor=2)
    x = torch.randn(2, 8, 32)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[0, 2] = 0
    everything = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    padding_as_4d = attention_mask.bool()[:, None, None, :].expand(-1, 1, 8, -1)
    additive_4d = torch.zeros(2, 1, 8, 8).masked_fill(~padding_as_4d, torch.finfo(torch.float32).min)
    with torch.no_grad():
        unmasked = block(x)
        torch.testing.assert_close(block(x, attention_mask=everything), unmasked, atol=0, rtol=0)
        masked = block(x, attention_mask=padding_as_4d)
        torch.testing.assert_close(block(x, attention_mask=additive_4d), masked, atol=0, rtol=0)
    # key 2 of the first sequence is masked: only queries of its group from 2 on see a difference
    changed = (masked - unmasked).abs().amax(dim=-1) > 1e-6
    assert changed[0].nonzero().flatten().tolist() == [2, 4, 6] and not changed[1].any()


def test_state_dict_round_trip_keeps_rotary_frequencies():
    kwargs, state_dict, io = load_case("hierarchical_block_full")
    block = HierarchicalBlock.from_reference_state_dict(state_dict, **kwargs).eval()
    reloaded = HierarchicalBlock(**kwargs).eval()
    reloaded.load_state_dict(block.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(io["x"]), io["y"], atol=PARITY_ATOL, rtol=0)


def test_xpos_offset_does_not_change_outputs():
    kwargs, state_dict, io = load_case("hierarchical_block_compress")
    block = HierarchicalBlock.from_reference_state_dict(state_dict, **kwargs, xpos_offset=1000).eval()
    with torch.no_grad():
        torch.testing.assert_close(block(io["x"]), io["y"], atol=PARITY_ATOL, rtol=0)


def test_documented_signature_and_shapes():
    x = torch.randn(2, 13, 64)
    for kwargs in (dict(), dict(window_size=4, compress_factor=4), dict(compress_factor=8, stride=4, ff_mult=2)):
        block = HierarchicalBlock(64, 16, 4, **kwargs)
        assert block(x).shape == x.shape
    block = HierarchicalBlock(dim=64, dim_head=16, heads=4, window_size=4)
    block(x).sum().backward()
    assert all(parameter.grad is not None for parameter in block.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(compress_factor=3), "compress_factor"),
        (dict(compress_factor=0), "compress_factor"),
        (dict(compress_factor=2, stride=4), "stride"),
        (dict(compress_factor=4, stride=3), "stride"),
        (dict(window_size=-1), "window_size"),
        (dict(dim_head=7), "dim_head"),
        (dict(attn_implementation="flash"), "attn_implementation"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HierarchicalBlock(dim=32, **{"dim_head": 8, "heads": 2, **kwargs})


def test_bad_inputs():
    block = small_block(window_size=2)
    with pytest.raises(ValueError, match=r"\(batch_size, seq_len, 32\).*\(2, 5, 16\)"):
        block(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        block(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(2, past_len \+ 5\), got \(2, 4\)"):
        block(torch.randn(2, 5, 32), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="length 5"):
        block(torch.randn(2, 5, 32), attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(2, 5, 32), attention_mask=torch.ones(2, 1, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="DynamicCache\\(config=block.config\\)"):
        block(torch.randn(2, 5, 32), cache=DynamicCache())


def test_bad_reference_state_dicts():
    kwargs, state_dict, _ = load_case("hierarchical_block_window")
    missing = {key: value for key, value in state_dict.items() if key != "attn.norm.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['attn.norm.bias'\]"):
        HierarchicalBlock.from_reference_state_dict(missing, **kwargs)
    with pytest.raises(ValueError, match=r"unexpected keys \['attn.extra'\]"):
        HierarchicalBlock.from_reference_state_dict({**state_dict, "attn.extra": torch.zeros(1)}, **kwargs)
    misshapen = {**state_dict, "attn.to_out.weight": torch.zeros(64, 32)}
    with pytest.raises(ValueError, match=r"attn.to_out.weight \(64, 32\) \(expected \(64, 64\)\)"):
        HierarchicalBlock.from_reference_state_dict(misshapen, **kwargs)
    # a full-attention checkpoint does not fit a window block
    full_kwargs, full_state_dict, _ = load_case("hierarchical_block_full")
    with pytest.raises(ValueError, match="attn.norm.gamma"):
        HierarchicalBlock.from_reference_state_dict(full_state_dict, **full_kwargs, window_size=4)


WINDOW_LAYOUTS = [dict(window_size=3), dict(window_size=40), dict(window_size=5, compress_factor=4, stride=2)]


@pytest.mark.parametrize("layout", WINDOW_LAYOUTS, ids=str)
@pytest.mark.parametrize("cache_class", [None, "dynamic", "static"])
def test_windowed_kernel_matches_the_dense_mask(layout, cache_class):
    # Over more keys than the window needs, sdpa runs the chunked window kernel; a 4-D mask that allows everything and
    # the eager kernel both take the dense n x n mask, the reference.
    block = small_block(**layout)
    dense = small_block(**layout, attn_implementation="eager")
    dense.load_state_dict(block.state_dict())
    length = 3 * block.chunk_size + block.attention_span + 5
    x = torch.randn(2, length, 32)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, :7] = 0
    is_token = attention_mask.bool()
    everything = torch.ones(2, 1, length, length, dtype=torch.bool)
    with torch.no_grad():
        if cache_class is None:
            windowed = block(x, attention_mask=attention_mask)
        else:
            cache = DynamicCache(config=block.config) if cache_class == "dynamic" else None
            if cache is None:
                cache = StaticCache(config=block.config, max_cache_len=length)
            # a long prompt, then a long chunk after it: both windowed, the second with keys from the cache
            windowed = run_in_chunks(block, x, [length - 90, 1, 89], cache, attention_mask)
        reference = dense(x, attention_mask=attention_mask)
        dense_sdpa = block(x, attention_mask=everything)
    torch.testing.assert_close(windowed[is_token], reference[is_token], atol=1e-5, rtol=0)
    torch.testing.assert_close(block(x), dense_sdpa, atol=1e-5, rtol=0)


def test_model_decoding_step_attends_over_the_window_only():
    # A decoding step's cost follows the keys it attends to: with window attention the cache keeps the last window of
    # every layer, however long the sequence grows, and greedy ids match recomputing the whole sequence.
    model = tiny_model(block_type="hierarchical", window_size=3, compress_factor=2)
    pixel_values, input_ids = tiny_inputs(model, batch_size=1, length=5)
    with torch.no_grad():
        output = model.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            do_sample=False,
            max_new_tokens=30,
            min_new_tokens=30,
            return_dict_in_generate=True,
        )
        uncached = model.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            do_sample=False,
            max_new_tokens=30,
            min_new_tokens=30,
            use_cache=False,
        )
    assert torch.equal(output.sequences, uncached)
    self_attention_cache = output.past_key_values.self_attention_cache
    assert self_attention_cache.get_seq_length() == 34  # the last token is not fed back
    span = 3 * 2
    assert [layer.keys.shape[-2] for layer in self_attention_cache.layers] == [span] * 2


def test_models_saved_with_per_block_rotary_frequencies_load_without_unexpected_keys():
    folder = os.path.join(FIXTURES, "legacy_models", "hierarchical_window")
    model, info = PalmEForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    # the text model computes the rotary embeddings once per forward pass, for every layer
    assert model.model.language_model.rotary_emb is not None
    assert all(not hasattr(layer, "rotary_emb") for layer in model.model.language_model.layers)
    io = load_file(os.path.join(folder, "io.safetensors"))
    with torch.no_grad():
        logits = model.eval()(pixel_values=io["pixel_values"], input_ids=io["input_ids"]).logits
    torch.testing.assert_close(logits, io["logits"], atol=1e-5, rtol=1e-5)


def test_model_layers_share_the_windowed_mask_and_match_the_dense_mask():
    # The text model prepares one mask for all its layers. Over more keys than a chunk and its window, sdpa takes the
    # windowed kernel (a padded prompt, then a long chunk after it from the cache); eager takes the dense mask.
    model = tiny_model(block_type="hierarchical", window_size=3, compress_factor=2)
    layer = model.model.language_model.layers[0]
    length = 2 * layer.chunk_size + layer.attention_span + 10
    pixel_values, input_ids = tiny_inputs(model, length=length)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, :4] = 0
    prompt_len = length - 70
    assert prompt_len > layer.chunk_size + layer.attention_span

    def prepare(length, attention_mask, cache=None):
        text_config = model.config.text_config
        inputs_embeds = torch.zeros(2, length, 48)
        return create_hierarchical_mask(
            text_config._attn_implementation, inputs_embeds, attention_mask, cache, layer.window_size, layer.group_size
        )

    with torch.no_grad():
        prepared = prepare(prompt_len, attention_mask[:, :prompt_len])
        assert isinstance(prepared, WindowedAttentionMask)
        prompt = model(
            pixel_values=pixel_values,
            input_ids=input_ids[:, :prompt_len],
            attention_mask=attention_mask[:, :prompt_len],
            use_cache=True,
        )
        cache = prompt.past_key_values
        assert isinstance(prepare(70, attention_mask, cache.self_attention_cache), WindowedAttentionMask)
        rest = model(input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask, cache=cache)
        windowed = torch.cat([prompt.logits, rest.logits], dim=1)
        model.set_attn_implementation("eager")
        assert not isinstance(prepare(length, attention_mask), WindowedAttentionMask)
        dense = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
    is_token = attention_mask.bool()
    torch.testing.assert_close(windowed[is_token], dense[is_token], atol=1e-5, rtol=1e-5)
