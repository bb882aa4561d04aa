"""PalmEConfig: the reference's flat arguments, validation, and serialisation."""

import dataclasses
import json
import os
import typing

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from palme_hf import PalmEConfig, PalmEForCausalLM, PalmEForConditionalGeneration, PalmETextConfig, PalmEVisionConfig

from helpers import FIXTURES


def test_defaults_are_the_references():
    for config in (PalmEConfig(), PalmEConfig.from_zeta_kwargs()):
        vision, text = config.vision_config, config.text_config
        assert (vision.image_size, vision.patch_size, vision.hidden_size) == (256, 32, 512)
        assert (vision.num_hidden_layers, vision.num_attention_heads) == (6, 8)
        assert (text.vocab_size, text.max_position_embeddings, text.hidden_size) == (20000, 1024, 512)
        assert (text.num_hidden_layers, text.num_attention_heads, text.head_dim) == (6, 8, 64)
        assert text.alibi_num_heads == 4 and text.use_rotary and text.use_xpos and text.rotary_dim == 32
        # zeta's qk_norm reaches nothing in its PalmE: query/key normalisation is off
        assert text.qk_norm is False and text.use_absolute_position_embeddings is False
        assert config.vision_integration == "cross_attention" and text.add_cross_attention
    assert PalmEConfig()._attn_implementation_internal is None  # no kernel pinned: Transformers picks, users change


def test_zeta_kwargs_map_into_sub_configs():
    config = PalmEConfig.from_zeta_kwargs(
        encoder_dim=1024, encoder_depth=8, decoder_dim=768, decoder_depth=8, attn_flash=False
    )
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 8
    assert config.text_config.hidden_size == 768 and config.text_config.num_hidden_layers == 8
    assert config.text_config.cross_attention_hidden_size == 1024
    assert config._attn_implementation == "eager" and config.text_config._attn_implementation == "eager"


def test_zeta_switches():
    text = PalmEConfig.from_zeta_kwargs(alibi_pos_bias=False, rotary_xpos=False, use_abs_pos_emb=True).text_config
    assert text.alibi_num_heads == 0 and not text.use_rotary and not text.use_xpos
    assert text.use_absolute_position_embeddings
    # as in the reference, absolute positions are only added when there is no rotary embedding
    assert not PalmEConfig.from_zeta_kwargs(use_abs_pos_emb=True).text_config.use_absolute_position_embeddings
    prefix = PalmEConfig.from_zeta_kwargs(cross_attend=False, num_tokens=100)
    assert prefix.vision_integration == "prefix" and not prefix.text_config.add_cross_attention
    # the placeholder is a token of its own, after zeta's vocabulary: it shadows no word
    assert prefix.image_token_id == 100 and prefix.text_config.vocab_size == 101
    with pytest.raises(ValueError, match="does not take.*encoder_width"):
        PalmEConfig.from_zeta_kwargs(encoder_width=3)


@pytest.mark.parametrize("flat", [{"encoder_dim": 1024}, {"cross_attend": False}, {"block_type": "parallel"}])
def test_zeta_arguments_point_to_the_adapter(flat):
    with pytest.raises(ValueError, match="from_zeta_kwargs"):
        PalmEConfig(**flat)


@pytest.mark.parametrize(
    "config_class, kwargs, message",
    [
        (PalmEVisionConfig, {"image_size": 250, "patch_size": 32}, "divisible"),
        (PalmETextConfig, {"alibi_num_heads": 9}, "alibi_num_heads"),
        (PalmEVisionConfig, {"hidden_size": 0}, "hidden_size"),
        (PalmETextConfig, {"num_hidden_layers": -1}, "num_hidden_layers"),
        (PalmETextConfig, {"vocab_size": 0}, "vocab_size"),
        (PalmEConfig, {"vision_integration": "sideways"}, "vision_integration"),
        (PalmEConfig, {"vision_integration": "prefix"}, "needs `image_token_id`"),
        (PalmEConfig, {"image_token_id": 20000}, "image_token_id"),
        (PalmEConfig, {"text_config": {"add_cross_attention": False}}, "contradicts"),
        (PalmETextConfig, {"num_hiden_layers": 2}, "no option `num_hiden_layers`. Did you mean `num_hidden_layers`"),
        (PalmEVisionConfig, {"patch_sise": 8}, "Did you mean `patch_size`"),
        (PalmETextConfig, {"use_xpos": "false"}, "`use_xpos` must be True or False, got 'false'"),
        (PalmETextConfig, {"qk_norm": 1}, "`qk_norm` must be True or False"),
        (PalmETextConfig, {"rope_theta": 0}, "`rope_theta` must be a positive number"),
        (PalmETextConfig, {"layer_norm_eps": -1e-5}, "`layer_norm_eps` must be a positive number"),
        (PalmEVisionConfig, {"layer_norm_eps": 0.0}, "`layer_norm_eps` must be a positive number"),
        (PalmETextConfig, {"attention_dropout": 1.0}, "dropout probability"),
        (PalmETextConfig, {"hidden_act": "swishy"}, "hidden_act"),
        (
            PalmETextConfig,
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
            "rotary embedding has no scaling",
        ),
        (PalmETextConfig, {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "`rotary_dim` sets"),
        (PalmETextConfig, {"rope_parameters": 10000.0}, "`rope_parameters` must be"),
        (PalmETextConfig, {"rope_parameters": {"rope_theta": -1.0}}, "`rope_theta` must be a positive number"),
        (PalmETextConfig, {"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}, "`rope_theta=10000.0` contra"),
        (PalmETextConfig, {"rope_thetta": 1e4}, "Did you mean `rope_theta`"),
        (PalmEVisionConfig, {"rope_theta": 1e4}, "has no option `rope_theta`"),
        (PalmETextConfig, {"alibi_num_heads": "2"}, "`alibi_num_heads` \\('2'\\) must be between 0 and"),
    ],
)
def test_invalid_values_raise(config_class, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config_class(**kwargs)


def test_transformers_own_keys_stay_accepted():
    config = PalmETextConfig(
        torch_dtype="float32", name_or_path="x", num_labels=2, max_length=20, output_attentions=True
    )
    assert config.output_attentions


@pytest.mark.parametrize(
    "block_type, option, value",
    [
        ("parallel", "alibi_num_heads", 2),
        ("hierarchical", "alibi_num_heads", 2),
        ("parallel", "rotate_values", True),
        ("parallel", "use_rotary", False),
        ("hierarchical", "qk_norm", True),
        ("hierarchical", "attention_dropout", 0.1),
        ("standard", "window_size", 4),
        ("parallel", "compress_factor", 2),
        ("parallel", "rotary_dim", 32),
        ("parallel", "intermediate_size", 700),
    ],
)
def test_options_a_block_type_does_not_have_are_refused(block_type, option, value):
    with pytest.raises(
        ValueError, match=f"block_type='{block_type}'.*{option}|{option}.*{block_type}|rotates the whole head|multiple"
    ):
        PalmETextConfig(block_type=block_type, **{option: value})


def test_block_type_defaults():
    parallel = PalmETextConfig(block_type="parallel")
    assert (parallel.alibi_num_heads, parallel.rotary_dim, parallel.hidden_act, parallel.num_key_value_heads) == (
        0,
        64,
        "silu",
        1,
    )
    window = PalmETextConfig(block_type="hierarchical", window_size=8)
    assert window.use_xpos is False and window.hidden_act == "gelu"  # the reference's window attention has no xpos
    assert PalmETextConfig(block_type="hierarchical").use_xpos is True
    with pytest.raises(ValueError, match="block_type"):
        PalmETextConfig(block_type="diagonal")


def test_invalid_rotary_dim_raises():
    with pytest.raises(ValueError, match="rotary_dim"):
        PalmETextConfig(head_dim=16, rotary_dim=32)
    assert PalmETextConfig(head_dim=16).rotary_dim == 16


def test_round_trip(tmp_path):
    config = PalmEConfig.from_zeta_kwargs(
        decoder_dim=64, encoder_dim=32, cross_attend=False, image_size=64, patch_size=16
    )
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


def load_warnings(load) -> tuple[object, str]:
    """`load()`'s result and what it logged through palme_hf's configuration logger."""
    from transformers.testing_utils import CaptureLogger

    from palme_hf.configuration_palme import logger

    with CaptureLogger(logger) as captured:
        result = load()
    return result, captured.out


@pytest.mark.parametrize("config_class", [PalmEVisionConfig, PalmETextConfig, PalmEConfig])
def test_unknown_saved_keys_are_kept_and_named_once(tmp_path, config_class):
    # what a tool (or `config.key = value`) adds to a config, and a later palme-hf may write: it loads back
    config = config_class()
    config.batch_norm_eps = 1.0
    config.tool_flag_of_a_later_version = {"kept": [1, 2]}
    config.save_pretrained(tmp_path)

    loaded, logged = load_warnings(
        lambda: [config_class.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)]
    )
    for config in loaded:
        assert type(config) is config_class
        assert config.batch_norm_eps == 1.0 and config.tool_flag_of_a_later_version == {"kept": [1, 2]}
    name = config_class.__name__
    assert logged.count(f"{name}: the saved key `batch_norm_eps`") == 1, logged
    if config_class is PalmETextConfig:
        assert "`batch_norm_eps` is not one of its options (the closest option is `layer_norm_eps`)" in logged
    assert logged.count(f"{name}: the saved key `tool_flag_of_a_later_version`") == 1

    loaded[0].save_pretrained(tmp_path / "again")
    again = config_class.from_pretrained(tmp_path / "again")
    assert again.tool_flag_of_a_later_version == {"kept": [1, 2]}
    assert config_class.from_json_file(tmp_path / "again" / "config.json").batch_norm_eps == 1.0
    assert config_class.from_dict(again.to_dict()).to_dict() == again.to_dict()


def test_unknown_keys_of_the_sub_configs_round_trip_with_the_model(tmp_path):
    from transformers.testing_utils import set_config_for_less_flaky_test

    from helpers import tiny_config

    config = tiny_config()
    # what Transformers' common model tests do to every config they test, before building, saving and loading a model
    set_config_for_less_flaky_test(config)
    config.text_config.text_tool_flag = "t"
    config.vision_config.vision_tool_flag = "v"
    model = PalmEForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    (loaded, causal_lm), logged = load_warnings(
        lambda: [
            PalmEForConditionalGeneration.from_pretrained(tmp_path),
            PalmEForCausalLM.from_pretrained(tmp_path),
        ]
    )
    config = loaded.config
    assert config.batch_norm_eps == 1.0 and config.rms_norm_eps == 1.0
    assert config.text_config.text_tool_flag == "t" and config.text_config.rms_norm_eps == 1.0
    assert config.vision_config.vision_tool_flag == "v" and config.vision_config.norm_eps == 1.0
    assert config.text_config.layer_norm_eps == 1.0  # a known option keeps its meaning
    assert causal_lm.config.text_tool_flag == "t"
    assert logged.count("PalmETextConfig: the saved key `text_tool_flag`") == 1
    assert logged.count("PalmEVisionConfig: the saved key `vision_tool_flag`") == 1
    pixel_values, input_ids = torch.rand(1, 3, 32, 32), torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixel_values, input_ids=input_ids).logits,
            model(pixel_values=pixel_values, input_ids=input_ids).logits,
        )
    # a loaded config's sub-configs build new configs, as data
    rebuilt = PalmEConfig(vision_config=config.vision_config, text_config=config.text_config)
    assert rebuilt.text_config.text_tool_flag == "t" and rebuilt.vision_config.vision_tool_flag == "v"


@pytest.mark.parametrize(
    "config_class, kwargs",
    [
        (PalmEConfig, {"vision_integraton": "prefix"}),
        (PalmEConfig, {"text_config": {"num_hiden_layers": 2}}),
        (PalmEConfig, {"vision_config": {"patch_sise": 8}}),
    ],
)
def test_typed_keys_stay_strict(config_class, kwargs):
    with pytest.raises(ValueError, match="has no option `(vision_integraton|num_hiden_layers|patch_sise)`. Did you"):
        config_class(**kwargs)


@pytest.mark.parametrize(
    "config_class, key, value, message",
    [
        (PalmEConfig, "vocab_size", 20001, r"saved `vocab_size=20001` contradicts its options, which give 20000"),
        (PalmEConfig, "num_image_tokens", 3, r"saved `num_image_tokens=3` contradicts its options, which give 64"),
        (PalmEVisionConfig, "num_patches", 16, r"saved `num_patches=16` contradicts its options, which give 64"),
        (PalmETextConfig, "num_key_value_heads", 2, r"has 8 key/value heads, got `num_key_value_heads=2`"),
    ],
)
def test_saved_keys_that_contradict_the_options_are_refused(tmp_path, config_class, key, value, message):
    config_class().save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    config = config_class.from_pretrained(tmp_path)
    saved[key] = getattr(config, key)  # the value the options give loads
    config_file.write_text(json.dumps(saved))
    assert getattr(config_class.from_pretrained(tmp_path), key) == saved[key]
    saved[key] = value
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=message):
        config_class.from_pretrained(tmp_path)


def test_rope_parameters_round_trip(tmp_path):
    config = PalmEConfig(text_config={"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert config.text_config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    # the flat keyword of earlier releases (and of the zeta-signature blocks) sets the same base
    assert PalmETextConfig(rope_theta=500000.0).rope_parameters == config.text_config.rope_parameters
    assert PalmETextConfig().rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert saved["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0} and "rope_theta" not in saved
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.text_config.rope_parameters == config.text_config.rope_parameters


def test_the_rotary_base_reaches_the_model():
    from helpers import tiny_config, tiny_inputs

    logits = []
    for rope in ({"rope_parameters": {"rope_theta": 500.0}}, {"rope_theta": 500.0}, {}):
        torch.manual_seed(0)
        model = PalmEForConditionalGeneration(tiny_config(**rope)).eval()
        torch.manual_seed(1)
        pixel_values, input_ids = tiny_inputs(model)
        with torch.no_grad():
            logits.append(model(pixel_values=pixel_values, input_ids=input_ids).logits)
    torch.testing.assert_close(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2])  # 10000.0, the default base, rotates otherwise


def test_flat_rope_theta_of_saved_configs_is_read_into_rope_parameters(tmp_path):
    from helpers import tiny_config, tiny_inputs

    model = PalmEForConditionalGeneration(tiny_config(rope_parameters={"rope_theta": 500.0})).eval()
    model.save_pretrained(tmp_path)
    # the config.json of a release before `rope_parameters`, with the same base as a flat key
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    saved["text_config"]["rope_theta"] = saved["text_config"].pop("rope_parameters")["rope_theta"]
    config_file.write_text(json.dumps(saved))
    loaded, logged = load_warnings(lambda: PalmEForConditionalGeneration.from_pretrained(tmp_path).eval())
    assert loaded.config.text_config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    assert "rope_theta" not in vars(loaded.config.text_config) and "saved key" not in logged
    pixel_values, input_ids = tiny_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixel_values, input_ids=input_ids).logits,
            model(pixel_values=pixel_values, input_ids=input_ids).logits,
        )
    loaded.save_pretrained(tmp_path / "again")  # saved again in today's form
    again = json.loads((tmp_path / "again" / "config.json").read_text())["text_config"]
    assert again["rope_parameters"]["rope_theta"] == 500.0 and "rope_theta" not in again


def checked_options(config_class) -> list[str]:
    """The declared options of `config_class` that carry a check of their value."""
    return [field.name for field in dataclasses.fields(config_class) if "check" in field.metadata]


@pytest.mark.parametrize("config_class", [PalmEVisionConfig, PalmETextConfig])
def test_declared_options_refuse_a_value_of_the_wrong_type(config_class):
    # every checked option, on every supported Transformers release: a clear ValueError naming it, not a TypeError
    options = checked_options(config_class)
    assert {"hidden_size", "layer_norm_eps", "hidden_act", "attention_dropout"} <= set(options)
    for option in options:
        with pytest.raises(ValueError, match=rf"{config_class.__name__}: `{option}` must be .*, got 'x'"):
            config_class(**{option: "x"})


@pytest.mark.parametrize(
    "config_class, option",
    [(PalmETextConfig, "block_type"), (PalmEConfig, "vision_integration"), (PalmEConfig, "projector_type")],
)
def test_literal_options_name_their_values(config_class, option):
    allowed = typing.get_args(config_class.__dataclass_fields__[option].type)
    assert len(allowed) >= 2
    with pytest.raises(ValueError, match=rf"`{option}` must be one of \({allowed[0]!r}, {allowed[1]!r}"):
        config_class(**{option: "sideways"})


def test_configs_are_typed_dataclasses_with_the_sub_configs_declared():
    text_fields = {field.name: field for field in dataclasses.fields(PalmETextConfig)}
    assert text_fields["hidden_size"].default == 512 and text_fields["rope_parameters"].default is None
    assert "rope_theta" not in text_fields  # read into `rope_parameters`
    assert PalmEConfig.sub_configs == {"vision_config": PalmEVisionConfig, "text_config": PalmETextConfig}
    config = PalmEConfig(attn_implementation="eager")
    assert config.vision_config._attn_implementation == config.text_config._attn_implementation == "eager"
    # Transformers' own checks run on a built config, as on its own typed configs
    with pytest.raises(Exception, match="`output_attentions` attribute is not supported"):
        PalmETextConfig(output_attentions=True, attn_implementation="sdpa")


def test_tied_embeddings_build_on_every_release():
    # 5.19 adds the embeddings to the tensor parallel plan of a tied model's config
    config = PalmEConfig(text_config={"tie_word_embeddings": True})
    assert config.tie_word_embeddings and config.text_config.base_model_tp_plan["layers.*.mlp.fc1"] == "colwise"
    with pytest.raises(ValueError, match="set `tie_word_embeddings` in `text_config`"):
        PalmEConfig(tie_word_embeddings=True)
