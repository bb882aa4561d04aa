"""Rotary and xpos embeddings at long positions (6k, 40k, 64k) for every block type: in float32, bfloat16 and float16
the output is finite and matches the same module in float64, or, where xpos cannot reach that far in the dtype, the
forward pass refuses the positions with a `ValueError`. A few tokens at shifted `position_ids` stand for a long
sequence. Also: the documented limits, exact angles and scales, autocast, the cache and torch.compile at long
positions."""

import copy

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache

from palme_hf import HierarchicalBlock, PalmETextModel, ParallelTransformerBlock, TransformerBlock
from palme_hf.layers_palme import PalmERotaryEmbedding, apply_rotary_pos_emb

from helpers import tiny_config

POSITIONS = (6_000, 40_000, 64_000)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUM_TOKENS = 4
# A one-layer module rounds its output to a few eps of its scale (measured at position 0: up to 4 eps in float32, about
# 1 in half precision); long positions must add nothing to that. Before this was fixed, float32 was 240 eps off at
# position 64k (angles in float32) and `rotate_values` in float16 360 eps off at 2.8k (frequencies rounded by
# `.half()`).
TOLERANCE_EPS = 8
# `max_xpos_distance` for xpos_scale_base=512, as documented (README, "Long positions")
XPOS_LIMITS = {torch.float16: 2832, torch.bfloat16: 34561, torch.float32: 34561, torch.float64: 288386}
XPOS_LIMITS_ROTATE_VALUES = {torch.float16: 2832, torch.bfloat16: 8640, torch.float32: 8640, torch.float64: 72096}


def text_model(rotate_values=False):
    config = tiny_config(num_hidden_layers=1, rotate_values=rotate_values).text_config
    return PalmETextModel(config)


BLOCKS = {
    # the PalmE decoder: ALiBi, rotary with xpos on the first 32 features, offset max_seq_len // 2 = 32
    "standard": text_model,
    "standard_rotate_values": lambda: text_model(rotate_values=True),
    "transformer_block": lambda: TransformerBlock(dim=48, dim_head=16, heads=4),
    "parallel_block": lambda: ParallelTransformerBlock(dim=48, dim_head=16, heads=4),
    # rotary positions are steps within a group: position // 2
    "hierarchical_full": lambda: HierarchicalBlock(dim=48, dim_head=16, heads=4, compress_factor=2),
    "hierarchical_window": lambda: HierarchicalBlock(dim=48, dim_head=16, heads=4, window_size=4, compress_factor=2),
}
XPOS_BLOCKS = ("standard", "transformer_block", "hierarchical_full")  # xpos on queries and keys only


def build(name):
    torch.manual_seed(0)
    module = BLOCKS[name]().eval()
    inputs = torch.randint(0, 96, (1, NUM_TOKENS)) if name.startswith("standard") else torch.randn(1, NUM_TOKENS, 48)
    return module, inputs


def run(module, inputs, position, dtype):
    """The module cast to `dtype` on `inputs` at positions `position, position + 1, ...`, as float64."""
    module = copy.deepcopy(module).to(dtype)
    position_ids = torch.arange(position, position + NUM_TOKENS)[None]
    with torch.no_grad():
        if isinstance(module, PalmETextModel):
            return module(input_ids=inputs, position_ids=position_ids).last_hidden_state.double()
        return module(inputs.to(dtype), position_ids=position_ids).double()


def xpos_offset(module):
    return module.config.xpos_offset if isinstance(module, PalmETextModel) else module.xpos_offset


def set_xpos_offset(module, position):
    """Moves the xpos offset of `module` to the rotary position of token `position`."""
    if isinstance(module, PalmETextModel):
        module.config.xpos_offset = position
    else:
        module.xpos_offset = position // getattr(module, "group_size", 1)


def farthest_xpos_distance(module, position):
    """How far from the xpos offset the rotary positions of the tokens at `position, ...` are (0 without xpos)."""
    if not module.rotary_emb.use_xpos:
        return 0
    group_size = getattr(module, "group_size", 1)
    last = (position + NUM_TOKENS - 1) // group_size
    return max(abs(last - xpos_offset(module)), abs(position // group_size - xpos_offset(module)))


def assert_matches_float64(output, reference, dtype, what):
    difference = (output - reference).abs().max().item()
    tolerance = TOLERANCE_EPS * torch.finfo(dtype).eps * reference.abs().max().item()
    print(f"{what}: max abs difference to float64 {difference:.2e} (tolerance {tolerance:.1e})")
    assert torch.isfinite(output).all(), what
    assert difference <= tolerance, what


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_long_positions_match_float64_or_are_refused(name, position):
    module, inputs = build(name)
    reference = run(module, inputs, position, torch.float64)
    assert torch.isfinite(reference).all()
    for dtype in DTYPES:
        limit = module.rotary_emb.max_xpos_distance(dtype)
        if farthest_xpos_distance(module, position) > limit:
            message = rf"Rotary position \d+ is \d+ positions from the xpos offset .* {dtype} .* within {limit} "
            with pytest.raises(ValueError, match=message):
                run(module, inputs, position, dtype)
        else:
            output = run(module, inputs, position, dtype)
            assert_matches_float64(output, reference, dtype, f"{name} {dtype} {position}")


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("name", XPOS_BLOCKS)
def test_xpos_offset_near_the_positions_reaches_them_in_every_dtype(name, position):
    # Without value rotation the offset cancels in attention scores: moving it changes nothing but the range.
    module, inputs = build(name)
    reference = run(module, inputs, position, torch.float64)
    set_xpos_offset(module, position)
    torch.testing.assert_close(run(module, inputs, position, torch.float64), reference, rtol=0, atol=1e-12)
    for dtype in DTYPES:
        assert_matches_float64(run(module, inputs, position, dtype), reference, dtype, f"{name} {dtype} {position}")


def test_documented_xpos_limits():
    for rotate_values, limits in ((False, XPOS_LIMITS), (True, XPOS_LIMITS_ROTATE_VALUES)):
        rotary = PalmERotaryEmbedding(32, use_xpos=True, xpos_scale_base=512, rotate_values=rotate_values)
        assert {dtype: rotary.max_xpos_distance(dtype) for dtype in limits} == limits
    assert PalmERotaryEmbedding(32, use_xpos=True, xpos_scale_base=256).max_xpos_distance(torch.float16) == 1416


def test_xpos_limits_on_both_sides_of_the_offset_and_on_the_span_of_a_pass():
    rotary = PalmERotaryEmbedding(32, use_xpos=True)
    rotary(torch.tensor([[0, 2832]]), xpos_offset=1416, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"Rotary position 0 is 2833 positions from the xpos offset \(2833\)"):
        rotary(torch.tensor([[0, 1]]), xpos_offset=2833, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"Rotary position 5666 is 2833 positions from the xpos offset \(2833\)"):
        rotary(torch.tensor([[5665, 5666]]), xpos_offset=2833, dtype=torch.float16)
    # Masked scores carry the factor of the distance between query and later key: 2**20 here, beyond float16.
    with pytest.raises(ValueError, match=r"span 0 to 5664, 5664 apart; in torch.float16, .* at most 2832 positions"):
        rotary(torch.tensor([[0, 5664]]), xpos_offset=2832, dtype=torch.float16)
    # A 64k context in bfloat16 and float32, with the offset in its middle (prefilled in chunks of at most 34561)
    for positions in ([[0, 30_000]], [[40_000, 65_536]]):
        rotary(torch.tensor(positions), xpos_offset=32_768, dtype=torch.bfloat16)


def test_angles_and_xpos_scales_are_exact_at_long_positions():
    rotary = PalmERotaryEmbedding(32, use_xpos=True).to(torch.bfloat16)
    assert rotary.inv_freq.dtype == rotary.xpos_scale.dtype == torch.float32  # the cast keeps their precision
    position_ids = torch.tensor([POSITIONS])
    xpos_offset = 50_000  # within 34561 positions of 40k and 64k, not of 6k
    with pytest.raises(ValueError, match="Rotary position 6000 is 44000 positions"):
        rotary(position_ids, xpos_offset=xpos_offset)
    tables = rotary(position_ids[:, 1:], xpos_offset=xpos_offset)
    positions = position_ids[:, None, 1:, None].double()
    angles = (positions * rotary.inv_freq.double()).repeat(1, 1, 1, 2)
    sign = torch.ones(32, dtype=torch.float64)
    sign[:16] = -1
    scale = rotary.xpos_scale.double() ** ((positions - xpos_offset) / 512)
    scale = scale.repeat(1, 1, 1, 2)
    exact = {
        "query_cos": angles.cos() * scale,
        "query_sin": angles.sin() * sign * scale,
        "key_cos": angles.cos() / scale,
        "key_sin": angles.sin() * sign / scale,
    }
    for name, expected in exact.items():
        table = getattr(tables, name)
        assert table.dtype == torch.float32 and table.shape == (1, 1, len(POSITIONS) - 1, 32), name
        # rounded once, to float32: computed in float32, cos at 64k was off by up to 4e-3
        error = (table.double() - expected).abs() / expected.abs().clamp_min(scale.min())
        assert error.max() <= 2**-24, name
    assert rotary(position_ids[:, 1:], xpos_offset=xpos_offset, dtype=torch.float64).query_cos.dtype == torch.float64


@pytest.mark.parametrize("rotary_dim", [16, 8])
@pytest.mark.parametrize("use_xpos", [False, True])
def test_rotation_is_the_rotate_half_formula(rotary_dim, use_xpos):
    # x * cos + rotate_half(x) * sin on the first rotary_dim features (times the xpos scale for queries, divided for
    # keys), the rest passed through: written out here in float64
    rotary = PalmERotaryEmbedding(rotary_dim, use_xpos=use_xpos)
    position_ids = torch.tensor([[3, 9, 200], [0, 1, 2]])
    tables = rotary(position_ids, xpos_offset=100)
    states = torch.randn(2, 4, 3, 16)
    angles = position_ids[:, None, :, None].double() * rotary.inv_freq.double()
    angles = torch.cat((angles, angles), dim=-1)
    scale = torch.ones_like(angles)
    if use_xpos:
        scale = rotary.xpos_scale.double() ** ((position_ids[:, None, :, None].double() - 100) / 512)
        scale = torch.cat((scale, scale), dim=-1)
    rotated, passed = states[..., :rotary_dim].double(), states[..., rotary_dim:].double()
    first, second = rotated.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    for cos, sin, factor in ((tables.query_cos, tables.query_sin, scale), (tables.key_cos, tables.key_sin, 1 / scale)):
        expected = torch.cat(((rotated * angles.cos() + rotated_half * angles.sin()) * factor, passed), dim=-1)
        torch.testing.assert_close(apply_rotary_pos_emb(states, cos, sin).double(), expected, rtol=1e-6, atol=1e-6)
    for dtype in (torch.bfloat16, torch.float64):
        output = apply_rotary_pos_emb(states.to(dtype), tables.query_cos, tables.query_sin)
        assert output.dtype == dtype and torch.equal(output[..., rotary_dim:], states[..., rotary_dim:].to(dtype))


def test_autocast_dtype_bounds_xpos_positions():
    module, inputs = build("transformer_block")
    position_ids = torch.arange(6_000, 6_000 + NUM_TOKENS)[None]
    module(inputs, position_ids=position_ids)  # float32
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(ValueError, match="torch.float16"):
        module(inputs, position_ids=position_ids)


def test_cached_decoding_at_long_positions_equals_full_forward():
    module, _ = build("standard")
    module.config.xpos_offset = 40_000
    input_ids = torch.randint(0, 96, (1, 6))
    position_ids = torch.arange(40_000, 40_006)[None]
    with torch.no_grad():
        full = module(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(config=module.config), DynamicCache())
        steps = [module(input_ids=input_ids[:, :3], position_ids=position_ids[:, :3], cache=cache).last_hidden_state]
        for index in range(3, 6):
            token = slice(index, index + 1)
            step = module(input_ids=input_ids[:, token], position_ids=position_ids[:, token], cache=cache)
            steps.append(step.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_rotary_embedding_compiles_to_one_graph():
    # the position check, which reads positions on the host, is left out of compiled graphs
    rotary = PalmERotaryEmbedding(32, use_xpos=True)
    compiled = torch.compile(rotary, fullgraph=True, backend="eager")
    position_ids = torch.tensor([[6_000, 6_001]])
    for expected, actual in zip(rotary(position_ids, xpos_offset=32), compiled(position_ids, xpos_offset=32)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_xpos_scales_stay_finite_in_half_precision():
    rotary = PalmERotaryEmbedding(32, use_xpos=True, xpos_scale_base=512)
    positions = torch.arange(8192)[None]
    tables = rotary(positions, xpos_offset=4096)
    states = torch.ones(1, 2, 8192, 64, dtype=torch.float16)
    assert torch.isfinite(apply_rotary_pos_emb(states, tables.query_cos, tables.query_sin)).all()
    assert torch.isfinite(apply_rotary_pos_emb(states, tables.key_cos, tables.key_sin)).all()
    assert torch.isfinite(apply_rotary_pos_emb(states.bfloat16(), tables.query_cos, tables.query_sin)).all()
