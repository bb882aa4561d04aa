"""PalmEConfig: the reference's flat arguments, validation, and serialisation."""

import os

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file
from transformers import AutoConfig

from palme_hf import PalmEConfig, PalmEForConditionalGeneration, PalmETextConfig, PalmEVisionConfig


def test_defaults_are_the_references():
    config = PalmEConfig()
    vision, text = config.vision_config, config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (256, 32, 512)
    assert (vision.num_hidden_layers, vision.num_attention_heads) == (6, 8)
    assert (text.vocab_size, text.max_position_embeddings, text.hidden_size) == (20000, 1024, 512)
    assert (text.num_hidden_layers, text.num_attention_heads, text.head_dim) == (6, 8, 64)
    assert text.alibi_num_heads == 4 and text.use_rotary and text.use_xpos and text.rotary_dim == 32
    assert text.qk_norm is True and text.use_absolute_position_embeddings is False
    assert config.vision_integration == "cross_attention" and text.add_cross_attention
    assert config._attn_implementation_internal is None  # no kernel pinned: Transformers picks one, users change it


def test_flat_arguments_map_into_sub_configs():
    config = PalmEConfig(encoder_dim=1024, encoder_depth=8, decoder_dim=768, decoder_depth=8, attn_flash=False)
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 8
    assert config.text_config.hidden_size == 768 and config.text_config.num_hidden_layers == 8
    assert config.text_config.cross_attention_hidden_size == 1024
    assert config._attn_implementation == "eager"
    assert config.text_config._attn_implementation == "eager"


def test_flat_switches():
    config = PalmEConfig(alibi_pos_bias=False, rotary_xpos=False, use_abs_pos_emb=True, qk_norm=False)
    text = config.text_config
    assert text.alibi_num_heads == 0 and not text.use_rotary and not text.use_xpos
    assert text.use_absolute_position_embeddings and not text.qk_norm
    # as in the reference, absolute positions are only added when there is no rotary embedding
    assert not PalmEConfig(use_abs_pos_emb=True).text_config.use_absolute_position_embeddings
    prefix = PalmEConfig(cross_attend=False, num_tokens=100)
    assert prefix.vision_integration == "prefix" and not prefix.text_config.add_cross_attention
    assert prefix.image_token_id == 99


def test_flat_argument_overrides_sub_config():
    config = PalmEConfig(text_config={"hidden_size": 64, "num_attention_heads": 2}, decoder_heads=4)
    assert config.text_config.hidden_size == 64 and config.text_config.num_attention_heads == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 250, "patch_size": 32}, "divisible"),
        ({"alibi_num_heads": 9, "decoder_heads": 8}, "alibi_num_heads"),
        ({"encoder_dim": 0}, "hidden_size"),
        ({"decoder_depth": -1}, "num_hidden_layers"),
        ({"num_tokens": 0}, "vocab_size"),
        ({"vision_integration": "sideways"}, "vision_integration"),
        ({"vision_integration": "prefix", "cross_attend": True}, "contradicts"),
        ({"image_token_id": 20000}, "image_token_id"),
    ],
)
def test_invalid_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PalmEConfig(**kwargs)


def test_invalid_rotary_dim_raises():
    with pytest.raises(ValueError, match="rotary_dim"):
        PalmETextConfig(head_dim=16, rotary_dim=32)
    assert PalmETextConfig(head_dim=16).rotary_dim == 16


def test_round_trip(tmp_path):
    config = PalmEConfig(decoder_dim=64, encoder_dim=32, cross_attend=False, image_size=64, patch_size=16)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PalmEConfig)
    saved = {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    assert {key: value for key, value in loaded.to_dict().items() if key != "_name_or_path"} == saved
    assert PalmEConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert isinstance(loaded.vision_config, PalmEVisionConfig) and isinstance(loaded.text_config, PalmETextConfig)
    assert loaded.vision_integration == "prefix" and loaded.num_image_tokens == 16


@pytest.mark.parametrize("case", ["cross_attention", "prefix_resampler", "parallel", "hierarchical_window"])
def test_models_saved_by_earlier_versions_load_unchanged(case):
    # written by palme-hf 0.1.0 as released (before the 5.24 port), with its outputs on fixed inputs
    folder = os.path.join(FIXTURES, "legacy_models", case)
    model = PalmEForConditionalGeneration.from_pretrained(folder).eval()
    io = load_file(os.path.join(folder, "io.safetensors"))
    with torch.no_grad():
        logits = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"]).logits
    torch.testing.assert_close(logits, io["logits"], atol=1e-5, rtol=1e-5)
