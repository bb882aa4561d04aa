"""PalmE models through the public API: forward, loss, attention implementations, caching and generate(),
padding, training features, the reference document's examples and bad input."""

import re

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    StaticCache,
)

from palme_hf import (
    PalmEConfig,
    PalmEForCausalLM,
    PalmEForConditionalGeneration,
    PalmEModel,
    PalmEProcessor,
    PalmETextConfig,
    blocks_palme,
    hierarchical_palme,
    modeling_palme,
)
from palme_hf.cli import DEFAULT_CAPTIONER
from palme_hf.compat_palme import CACHE_NAME
from palme_hf.layers_palme import PalmEAttention, PalmERotaryEmbedding

from helpers import BLOCK_TYPES, VARIANTS, combination_model, sample_image, tiny_config, tiny_inputs, tiny_model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_shapes_and_loss(variant):
    model = tiny_model(variant)
    pixel_values, input_ids = tiny_inputs(model)
    labels = input_ids.clone()
    labels[:, :3] = -100
    outputs = model(pixel_values=pixel_values, input_ids=input_ids, labels=labels)
    vocab_size = model.config.text_config.vocab_size
    assert outputs.logits.shape == (*input_ids.shape, vocab_size)
    expected = torch.nn.functional.cross_entropy(
        outputs.logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), "unused parameters"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eager_and_sdpa_agree(variant):
    model = tiny_model(variant)
    pixel_values, input_ids = tiny_inputs(model)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    results = []
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            results.append(model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits)
    # padding positions are not compared: what a fully masked query row yields differs between implementations
    real = attention_mask.bool()
    torch.testing.assert_close(results[0][real], results[1][real], atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(result).all() for result in results)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_by_step_cache_equals_full_forward(variant):
    model = tiny_model(variant)
    pixel_values, input_ids = tiny_inputs(model, length=9)
    with torch.no_grad():
        full = model(pixel_values=pixel_values, input_ids=input_ids).logits
        split = input_ids.shape[1] - 6
        outputs = model(pixel_values=pixel_values, input_ids=input_ids[:, :split], use_cache=True)
        steps = [outputs.logits]
        cache = getattr(outputs, CACHE_NAME)
        for position in range(split, input_ids.shape[1]):
            outputs = model(input_ids=input_ids[:, position : position + 1], cache=cache, use_cache=True)
            cache = getattr(outputs, CACHE_NAME)
            steps.append(outputs.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    if model.config.vision_integration == "cross_attention":
        assert isinstance(cache, EncoderDecoderCache)
        # the image's keys/values were computed once and are as many as the image features
        assert cache.cross_attention_cache.get_seq_length() == model.config.num_image_tokens


def test_past_key_values_is_still_accepted_for_cache():
    model = tiny_model()
    pixel_values, input_ids = tiny_inputs(model, length=6)
    with torch.no_grad():
        logits = []
        for name in ("cache", "past_key_values"):
            prompt = model(pixel_values=pixel_values, input_ids=input_ids[:, :-1], use_cache=True)
            step = model(input_ids=input_ids[:, -1:], use_cache=True, **{name: getattr(prompt, CACHE_NAME)})
            logits.append(step.logits)
        full = model(pixel_values=pixel_values, input_ids=input_ids).logits[:, -1:]
    torch.testing.assert_close(logits[0], full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1], full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_with_cache_equals_without(variant, cache_implementation):
    model = tiny_model(variant)
    pixel_values, input_ids = tiny_inputs(model)
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=12)
    kwargs["min_new_tokens"] = 12
    uncached = model.generate(**kwargs, use_cache=False)
    cached = model.generate(**kwargs, use_cache=True, cache_implementation=cache_implementation)
    assert uncached.shape[1] == input_ids.shape[1] + 12
    assert torch.equal(cached, uncached)


def test_generate_passes_the_image_only_while_the_cache_is_empty():
    model = tiny_model()
    pixel_values, input_ids = tiny_inputs(model)
    seen = []
    model.model.vision_model.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    model.generate(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert seen == [2]


@pytest.mark.parametrize(
    "variant, block_overrides",
    [
        ("reference", {}),
        ("zeta_quirks", {}),
        ("prefix", {}),
        ("reference", {"block_type": "parallel"}),
        # groups of the compressed hierarchical layout follow the padded index, so only compress_factor=1 here
        ("reference", {"block_type": "hierarchical", "compress_factor": 1}),
    ],
    ids=["reference", "zeta_quirks", "prefix", "parallel", "hierarchical"],
)
def test_left_padded_batch_generation_equals_one_by_one(variant, block_overrides):
    model = tiny_model(variant, **block_overrides)
    pixel_values, input_ids = tiny_inputs(model, batch_size=2, length=8)
    short = input_ids[1, 3:]  # the second prompt is 3 tokens shorter (keeps the prefix placeholders)
    if model.config.vision_integration == "prefix":
        short = input_ids[1, 0:].clone()
        short = torch.cat([short[:2], short[2 : 2 + model.config.num_image_tokens], short[-3:]])
    pad = input_ids.shape[1] - short.shape[0]
    padded = torch.cat([torch.zeros(pad, dtype=torch.long), short])
    batch = torch.stack([input_ids[0], padded])
    attention_mask = torch.stack([torch.ones_like(input_ids[0]), (torch.arange(len(padded)) >= pad).long()])
    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    batched = model.generate(pixel_values=pixel_values, input_ids=batch, attention_mask=attention_mask, **kwargs)
    first = model.generate(pixel_values=pixel_values[:1], input_ids=input_ids[:1], **kwargs)
    second = model.generate(pixel_values=pixel_values[1:], input_ids=short[None], **kwargs)
    assert torch.equal(batched[0, -8:], first[0, -8:])
    assert torch.equal(batched[1, -8:], second[0, -8:])


def test_encoder_and_decoder_widths_may_differ():
    model = tiny_model(vision=dict(hidden_size=24), hidden_size=40)
    pixel_values, input_ids = tiny_inputs(model)
    assert model(pixel_values=pixel_values, input_ids=input_ids).logits.shape == (2, 7, 97)
    cached = model.generate(pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=4, do_sample=False)
    uncached = model.generate(
        pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=4, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)


def test_output_attentions_and_hidden_states():
    model = tiny_model()
    model.set_attn_implementation("eager")
    pixel_values, input_ids = tiny_inputs(model)
    outputs = model(pixel_values=pixel_values, input_ids=input_ids, output_attentions=True, output_hidden_states=True)
    assert len(outputs.hidden_states) == 3  # embeddings + 2 layers
    assert len(outputs.attentions) == 2 and outputs.attentions[0].shape == (2, 4, 7, 7)
    assert len(outputs.cross_attentions) == 2 and outputs.cross_attentions[0].shape == (2, 4, 7, 16)
    probabilities = outputs.attentions[0]
    assert torch.allclose(probabilities.sum(-1), torch.ones(2, 4, 7))
    assert probabilities[..., 0, 1:].abs().max() == 0  # causal
    assert outputs.image_hidden_states.shape == (2, 16, 32)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("variant", ["reference", "prefix"])
def test_gradient_checkpointing_gives_the_same_gradients(variant, use_reentrant):
    model = tiny_model(variant).train()
    pixel_values, input_ids = tiny_inputs(model)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.zero_grad()
        model(pixel_values=pixel_values, input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert model.model.language_model.gradient_checkpointing and model.model.vision_model.gradient_checkpointing
    # the image features reach the loss through the checkpointed decoder layers: the vision encoder learns
    assert model.model.vision_model.embeddings.patch_projection.weight.grad.abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_weight_init_and_no_split_modules():
    model = tiny_model()
    text = model.model.language_model
    assert {"PalmEVisionEncoderLayer", "PalmETextDecoderLayer", "PalmEParallelDecoderLayer"} <= set(
        model._no_split_modules
    )
    assert torch.equal(text.layers[0].self_attn_layer_norm.weight, torch.ones(48))
    assert torch.equal(text.layers[0].self_attn.q_norm.weight, torch.ones(64))
    assert torch.equal(model.lm_head.bias, torch.zeros(97))
    std = text.embed_tokens.weight.std().item()
    assert 0.015 < std < 0.025  # initializer_range
    assert 0.01 < model.model.vision_model.embeddings.position_embedding.std().item() < 0.03


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("prefix")
    pixel_values, input_ids = tiny_inputs(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded, PalmEForConditionalGeneration)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixel_values, input_ids=input_ids).logits,
            model(pixel_values=pixel_values, input_ids=input_ids).logits,
        )
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, PalmEModel)


def test_reference_document_examples():
    # PalmE() on 16 images of 256x256 with 16 token sequences (the document's (50, 16) is a typo for (16, 50)).
    model = PalmEForConditionalGeneration(PalmEConfig.from_zeta_kwargs()).eval()
    pixel_values = torch.randn(16, 3, 256, 256)
    input_ids = torch.randint(0, 20000, (16, 50))
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=input_ids).logits
    assert logits.shape == (16, 50, 20000) and torch.isfinite(logits).all()
    del model
    config = PalmEConfig.from_zeta_kwargs(
        encoder_dim=1024, encoder_depth=8, decoder_dim=1024, decoder_depth=8, attn_flash=False
    )
    assert config._attn_implementation == "eager"
    model = PalmEForConditionalGeneration(config).eval()
    assert model.config.text_config.hidden_size == 1024 and len(model.model.language_model.layers) == 8
    with torch.no_grad():
        logits = model(pixel_values=pixel_values[:1], input_ids=input_ids[:1, :8]).logits
    assert logits.shape == (1, 8, 20000) and torch.isfinite(logits).all()


# The hierarchical windowed case: a prompt longer than a chunk of queries (64) and its window (3 steps of 2 tokens)
# takes the chunked window kernel, with its band mask; the others build a dense mask.
MASK_CASES = {
    "standard": ("standard", {}, 7, "create_causal_mask"),
    "parallel": ("parallel", {}, 7, "create_causal_mask"),
    "hierarchical": ("hierarchical", {}, 7, "hierarchical_attention_mask"),
    "hierarchical_windowed": ("hierarchical", dict(window_size=3), 80, "windowed_attention_mask"),
}


@pytest.mark.parametrize("case", MASK_CASES)
def test_rotary_tables_and_masks_are_computed_once_per_forward(case, monkeypatch):
    # As in modeling_llama.py: the text model computes them, every layer reuses them. The hierarchical layers share
    # one window, group size and cache layout, hence one mask, which the text model prepares.
    block_type, options, length, prompt_mask = MASK_CASES[case]
    model = tiny_model(block_type=block_type, **options)
    pixel_values, input_ids = tiny_inputs(model, length=length)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, :3] = 0
    rotary_embeddings = [module for module in model.modules() if isinstance(module, PalmERotaryEmbedding)]
    assert rotary_embeddings == [model.model.language_model.rotary_emb]  # none of the layers holds its own
    rotary_calls = []
    for module in model.modules():
        if isinstance(module, PalmERotaryEmbedding):
            module.register_forward_hook(lambda module, args, output: rotary_calls.append(module))
    mask_calls = []

    def counting(name, create_mask):
        def wrapper(*args, **kwargs):
            mask_calls.append(name)
            return create_mask(*args, **kwargs)

        return wrapper

    for module in (modeling_palme, blocks_palme, hierarchical_palme):
        for name in (
            "create_causal_mask",
            "create_bidirectional_mask",
            "hierarchical_attention_mask",
            "windowed_attention_mask",
        ):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    prepare = modeling_palme.create_hierarchical_mask
    monkeypatch.setattr(modeling_palme, "create_hierarchical_mask", counting("prepare_attention", prepare))
    with torch.no_grad():
        cached = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        builds = [name for name in mask_calls if name != "prepare_attention"]
        assert len(rotary_calls) == 1 and builds == [prompt_mask]
        assert mask_calls.count("prepare_attention") == (block_type == "hierarchical")
        # a decoding step: one query over the cached window, a dense mask (the groups need one)
        mask_calls.clear()
        attention_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        model(input_ids=input_ids[:, :1], cache=getattr(cached, CACHE_NAME), attention_mask=attention_mask)
    step_mask = "create_causal_mask" if block_type != "hierarchical" else "hierarchical_attention_mask"
    assert len(rotary_calls) == 2 and [name for name in mask_calls if name != "prepare_attention"] == [step_mask]
    assert mask_calls.count("prepare_attention") == (block_type == "hierarchical")
    assert len(model.model.language_model.layers) == 2


# Bad input


def test_wrong_image_size_or_channels():
    model = tiny_model()
    _, input_ids = tiny_inputs(model)
    with pytest.raises(ValueError, match=r"\(batch_size, 3, 32, 32\).*\(2, 3, 48, 48\)"):
        model(pixel_values=torch.rand(2, 3, 48, 48), input_ids=input_ids)
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\)"):
        model(pixel_values=torch.rand(2, 1, 32, 32), input_ids=input_ids)


def test_token_ids_outside_the_vocabulary():
    model = tiny_model()
    pixel_values, input_ids = tiny_inputs(model)
    input_ids[1, 3] = 97
    with pytest.raises(ValueError, match="token id 97.*0 to 96"):
        model(pixel_values=pixel_values, input_ids=input_ids)
    input_ids[1, 3] = -1
    with pytest.raises(ValueError, match="token id -1"):
        model(pixel_values=pixel_values, input_ids=input_ids)


def test_image_batch_must_match_text_batch():
    model = tiny_model()
    pixel_values, input_ids = tiny_inputs(model)
    with pytest.raises(ValueError, match="3 images for 2 text sequences"):
        model(pixel_values=torch.rand(3, 3, 32, 32), input_ids=input_ids)


def test_sequence_longer_than_absolute_positions():
    model = tiny_model("abs_positions")
    pixel_values = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="Position 64 is beyond `max_position_embeddings` \\(64\\)"):
        model(pixel_values=pixel_values, input_ids=torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(
            pixel_values=pixel_values,
            input_ids=torch.zeros(1, 60, dtype=torch.long),
            max_new_tokens=10,
            min_new_tokens=10,
        )
    # rotary models are not bound to max_seq_len
    assert (
        tiny_model()(pixel_values=pixel_values, input_ids=torch.zeros(1, 80, dtype=torch.long)).logits.shape[1] == 80
    )


def test_prefix_placeholder_count_must_match():
    model = tiny_model("prefix")
    pixel_values, input_ids = tiny_inputs(model)
    input_ids[1, 2] = 5  # the second sequence loses one of its 16 placeholders
    message = r"31 image placeholder tokens .*\[16, 15\] per sequence.*but 2 images were given, which need 16"
    with pytest.raises(ValueError, match=message):
        model(pixel_values=pixel_values, input_ids=input_ids)
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match=message):
        model(pixel_values=pixel_values, inputs_embeds=model.get_input_embeddings()(input_ids))


def test_text_only_forward_skips_cross_attention():
    model = tiny_model()
    pixel_values, input_ids = tiny_inputs(model)
    with torch.no_grad():
        text_only = model(input_ids=input_ids).logits
        with_image = model(pixel_values=pixel_values, input_ids=input_ids).logits
        for layer in model.model.language_model.layers:
            layer.cross_attn.attention.o_proj.weight.zero_()
        image_silenced = model(pixel_values=pixel_values, input_ids=input_ids).logits
    assert (text_only - with_image).abs().max() > 1e-3  # the image matters when it is there
    # without an image, every cross-attention layer is skipped: as if it added nothing
    torch.testing.assert_close(text_only, image_silenced, atol=1e-5, rtol=1e-5)


def test_a_filled_self_attention_cache_needs_its_cross_attention_part():
    model = tiny_model()
    _, input_ids = tiny_inputs(model)
    with pytest.raises(ValueError, match="EncoderDecoderCache"):
        cache = DynamicCache()
        model(pixel_values=torch.rand(2, 3, 32, 32), input_ids=input_ids, cache=cache, use_cache=True)
        model(input_ids=input_ids[:, :1], cache=cache, use_cache=True)


# PalmE from any block, with either integration, with and without the Perceiver resampler

COMBINATIONS = [
    (block_type, integration, num_latents)
    for block_type in BLOCK_TYPES
    for integration in ("reference", "prefix")
    for num_latents in (None, 4)
]


def train_on_fixed_batch(model, pixel_values, input_ids, steps, learning_rate=1e-2):
    """AdamW steps on the trainable parameters with the captioning loss of one batch; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    losses = []
    for _ in range(steps):
        loss = model(pixel_values=pixel_values, input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("block_type, integration, num_latents", COMBINATIONS)
def test_every_combination_generates_trains_and_reloads(tmp_path, block_type, integration, num_latents):
    model = combination_model(block_type, integration, num_latents)
    assert model.config.num_image_tokens == (num_latents or 16)
    pixel_values, input_ids = tiny_inputs(model)
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    uncached = model.generate(**kwargs, use_cache=False)
    assert torch.equal(model.generate(**kwargs), uncached)
    assert torch.equal(model.generate(**kwargs, cache_implementation="static"), uncached)

    losses = train_on_fixed_batch(model.train(), pixel_values, input_ids, steps=12)
    assert losses[-1] < 0.6 * losses[0], losses

    model.eval().save_pretrained(tmp_path)
    loaded = PalmEForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.text_config.block_type == block_type and loaded.config.num_latents == num_latents
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixel_values, input_ids=input_ids).logits,
            model(pixel_values=pixel_values, input_ids=input_ids).logits,
        )


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_peft_lora_trains_and_merges(block_type):
    model = combination_model(block_type, "reference", None).train()
    pixel_values, input_ids = tiny_inputs(model)
    lora_model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    trainable = [name for name, parameter in lora_model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    losses = train_on_fixed_batch(lora_model, pixel_values, input_ids, steps=10)
    assert losses[-1] < losses[0]
    lora_model.eval()
    with torch.no_grad():
        adapted = lora_model(pixel_values=pixel_values, input_ids=input_ids).logits
        merged = lora_model.merge_and_unload()
        assert isinstance(merged, PalmEForConditionalGeneration)
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(
            merged(pixel_values=pixel_values, input_ids=input_ids).logits, adapted, atol=1e-5, rtol=1e-4
        )


def test_prefix_generation_never_emits_the_image_placeholder(tmp_path):
    model = tiny_model("prefix")
    pixel_values, input_ids = tiny_inputs(model)
    with torch.no_grad():
        model.lm_head.bias[model.config.image_token_id] = 100.0  # the placeholder would win every step
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    generated = model.generate(**kwargs)
    assert (generated[:, input_ids.shape[1] :] != model.config.image_token_id).all()
    assert torch.equal(generated, model.generate(**kwargs, use_cache=False))
    # the suppression is the model's, not a generation-config field that a user's own options would replace
    for options in (
        {"suppress_tokens": [3]},
        {"generation_config": GenerationConfig(max_new_tokens=5, do_sample=True)},
    ):
        generated = model.generate(pixel_values=pixel_values, input_ids=input_ids, min_new_tokens=5, **options)
        assert (generated[:, input_ids.shape[1] :] != model.config.image_token_id).all()
    model.save_pretrained(tmp_path)
    reloaded = PalmEForConditionalGeneration.from_pretrained(tmp_path)
    generated = reloaded.generate(**kwargs)
    assert (generated[:, input_ids.shape[1] :] != model.config.image_token_id).all()


# Transformers' conventions for its own models


def test_token_ids_live_in_the_text_config_and_reach_generate():
    model = tiny_model(pad_token_id=0, bos_token_id=1)
    assert (model.generation_config.pad_token_id, model.generation_config.bos_token_id) == (0, 1)
    pixel_values, input_ids = tiny_inputs(model, batch_size=1)
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=6)
    first_token = int(model.generate(**kwargs)[0, input_ids.shape[1]])
    stopping = tiny_model(pad_token_id=0, eos_token_id=first_token)
    stopping.load_state_dict(model.state_dict())
    assert stopping.generation_config.eos_token_id == first_token
    assert stopping.generate(**kwargs).shape[1] == input_ids.shape[1] + 1  # stopped at the end-of-sequence token
    with pytest.raises(ValueError, match="eos_token_id.*97"):
        tiny_model(eos_token_id=97)


@pytest.mark.parametrize("variant", ["reference", "prefix"])
def test_get_image_features_returns_base_model_output_with_pooling(variant):
    model = tiny_model(variant, num_latents=4)
    pixel_values, input_ids = tiny_inputs(model)
    image_outputs = model.get_image_features(pixel_values)
    assert image_outputs.last_hidden_state.shape == (2, 16, 32)  # the vision encoder's patch features
    width = 48 if variant == "prefix" else 32  # projected to the decoder's width for the token sequence
    assert image_outputs.pooler_output.shape == (2, 4, width)
    outputs = model(pixel_values=pixel_values, input_ids=input_ids)
    torch.testing.assert_close(outputs.image_outputs.pooler_output, image_outputs.pooler_output)
    assert model(input_ids=input_ids[:, -2:]).image_outputs is None


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_attention_implementation_switches_every_layer(tmp_path, block_type):
    model = combination_model(block_type, "reference", 4)
    attention_layers = [module for module in model.modules() if isinstance(module, PalmEAttention)]
    pixel_values, input_ids = tiny_inputs(model)
    logits = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert {layer.config._attn_implementation for layer in attention_layers} == {implementation}
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, input_ids=input_ids, output_attentions=True)
        logits[implementation] = outputs.logits
        # attention probabilities exist only where they are computed, in eager attention
        assert len(outputs.attentions) == (2 if implementation == "eager" else 0)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = PalmEForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert {m.config._attn_implementation for m in loaded.modules() if isinstance(m, PalmEAttention)} == {"eager"}


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_output_attentions_and_hidden_states_for_every_block(block_type):
    model = combination_model(block_type, "reference", None)
    model.set_attn_implementation("eager")
    pixel_values, input_ids = tiny_inputs(model)
    outputs = model(pixel_values=pixel_values, input_ids=input_ids, output_attentions=True, output_hidden_states=True)
    assert len(outputs.hidden_states) == 3 and outputs.hidden_states[-1].shape == (2, 7, 48)
    assert [tuple(a.shape) for a in outputs.attentions] == [(2, 4, 7, 7)] * 2
    assert [tuple(a.shape) for a in outputs.cross_attentions] == [(2, 4, 7, 16)] * 2
    for probabilities in outputs.attentions:
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 4, 7))
        assert probabilities[..., 0, 1:].abs().max() == 0  # causal


@pytest.mark.parametrize("variant", ["reference", "prefix"])
def test_inputs_embeds_with_pixel_values(variant):
    model = tiny_model(variant)
    pixel_values, input_ids = tiny_inputs(model)
    inputs_embeds = model.get_input_embeddings()(input_ids)
    with torch.no_grad():
        from_ids = model(pixel_values=pixel_values, input_ids=input_ids).logits
        from_embeds = model(pixel_values=pixel_values, inputs_embeds=inputs_embeds).logits
    torch.testing.assert_close(from_embeds, from_ids)
    generated = model.generate(pixel_values=pixel_values, inputs_embeds=inputs_embeds, max_new_tokens=4)
    expected = model.generate(pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=4)
    assert torch.equal(generated, expected[:, input_ids.shape[1] :])


@pytest.mark.parametrize("block_type, key_value_heads", [("standard", 4), ("parallel", 1), ("hierarchical", 4)])
def test_num_key_value_heads_plans_the_cache(block_type, key_value_heads):
    model = combination_model(block_type, "reference", None)
    text_config = model.config.text_config
    assert text_config.num_key_value_heads == key_value_heads
    pixel_values, input_ids = tiny_inputs(model)
    outputs = model(pixel_values=pixel_values, input_ids=input_ids, use_cache=True)
    assert getattr(outputs, CACHE_NAME).self_attention_cache.layers[0].keys.shape[1] == key_value_heads
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        PalmETextConfig(block_type=block_type, alibi_num_heads=0, num_key_value_heads=2)


@pytest.mark.parametrize("variant", ["reference", "prefix"])
def test_causal_lm_is_the_text_half_of_a_full_checkpoint(tmp_path, variant):
    model = tiny_model(variant)
    _, input_ids = tiny_inputs(model)
    input_ids = input_ids[:, -5:]  # text only
    model.save_pretrained(tmp_path / "full")
    text_model = PalmEForCausalLM.from_pretrained(tmp_path / "full").eval()
    assert isinstance(text_model.config, PalmETextConfig)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        torch.testing.assert_close(text_model(input_ids=input_ids).logits, expected, atol=0, rtol=0)
    kwargs = dict(input_ids=input_ids, do_sample=False, max_new_tokens=5)
    assert torch.equal(text_model.generate(**kwargs), model.generate(**kwargs))
    loss = text_model(input_ids=input_ids, labels=input_ids).loss
    torch.testing.assert_close(loss, model(input_ids=input_ids, labels=input_ids).loss)

    text_model.save_pretrained(tmp_path / "text")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    assert isinstance(loaded, PalmEForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, atol=0, rtol=0)


def test_empty_inputs_wrong_masks_and_unbatched_images_are_named():
    model = tiny_model()
    pixel_values, input_ids = tiny_inputs(model)
    with pytest.raises(ValueError, match="no tokens"):
        model(pixel_values=pixel_values, input_ids=input_ids[:, :0])
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 7\), got \(2, 6\)"):
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 7\), got \(1, 7\)"):
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"a batch of images.*\(3, 32, 32\)"):
        model(pixel_values=pixel_values[0], input_ids=input_ids[:1])


@pytest.mark.slow  # trains, saves and loads the captioner twice
def test_lora_with_added_words_saves_reloads_and_merges(tmp_path):
    processor = PalmEProcessor.from_pretrained(DEFAULT_CAPTIONER)
    model = PalmEForConditionalGeneration.from_pretrained(DEFAULT_CAPTIONER)
    old_vocab_size = model.config.vocab_size
    assert old_vocab_size == model.config.text_config.vocab_size
    processor.tokenizer.add_tokens(["purple", "hexagon"])
    model.resize_token_embeddings(len(processor.tokenizer))  # new rows drawn at random around the old ones
    assert model.config.vocab_size == model.config.text_config.vocab_size == old_vocab_size + 2

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = processor(images=[sample_image()], text=["a small purple hexagon"])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == processor.tokenizer.pad_token_id, -100)
    optimizer = torch.optim.AdamW([parameter for parameter in lora.parameters() if parameter.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = lora(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lora.eval()
    with torch.no_grad():
        expected = lora(**batch).logits
    lora.save_pretrained(tmp_path)  # PEFT saves the resized embeddings as it sees `config.vocab_size` changed
    processor.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.model.model.language_model.embed_tokens.weight"].shape[0] == old_vocab_size + 2
    assert saved["base_model.model.lm_head.weight"].shape[0] == old_vocab_size + 2

    processor = PalmEProcessor.from_pretrained(tmp_path)
    base = PalmEForConditionalGeneration.from_pretrained(DEFAULT_CAPTIONER)
    base.resize_token_embeddings(len(processor.tokenizer))  # other random rows: the adapter's must replace them
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(
        processor(images=[sample_image()], text=["a small purple hexagon"])["input_ids"], batch["input_ids"]
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, PalmEForConditionalGeneration)
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["reference", "prefix"])
def test_return_dict_false_gives_tuples_as_transformers_does(variant):
    model = tiny_model(variant)
    pixel_values, input_ids = tiny_inputs(model)
    with torch.no_grad():
        image_outputs = model.get_image_features(pixel_values)
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
        torch.testing.assert_close(as_tuple[0], image_outputs.last_hidden_state)
        torch.testing.assert_close(as_tuple[1], image_outputs.pooler_output)
        logits = model(pixel_values=pixel_values, input_ids=input_ids).logits
        generated = model.generate(pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=3)
        model.config.return_dict = False
        assert isinstance(model.model.get_image_features(pixel_values), tuple)
        assert isinstance(model.get_image_features(pixel_values), tuple)
        outputs = model(pixel_values=pixel_values, input_ids=input_ids)
        assert isinstance(outputs, tuple)
        torch.testing.assert_close(outputs[0], logits)
        assert torch.equal(model.generate(pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=3), generated)
        text_model = PalmEForCausalLM(model.config.text_config).eval()
        text_model.config.return_dict = False
        assert isinstance(text_model(input_ids=input_ids[:, :2]), tuple)


@pytest.mark.parametrize("variant", ["reference", "prefix"])
def test_static_cache_type_follows_the_decoder_layers(variant):
    # a decoder with cross-attention layers keeps the image keys/values beside the static self-attention cache; the
    # prefix route has none, and gets the plain StaticCache of Transformers' decoder-only models
    model = tiny_model(variant)
    pixel_values, input_ids = tiny_inputs(model)
    kwargs = dict(max_new_tokens=3, cache_implementation="static", return_dict_in_generate=True)
    cache = getattr(model.generate(pixel_values=pixel_values, input_ids=input_ids, **kwargs), CACHE_NAME)
    text_model = PalmEForCausalLM(model.config.text_config).eval()
    text_cache = getattr(text_model.generate(input_ids=input_ids[:, :2], **kwargs), CACHE_NAME)
    if variant == "prefix":
        assert type(cache) is StaticCache and type(text_cache) is StaticCache
    else:
        assert type(cache) is EncoderDecoderCache and type(cache.self_attention_cache) is StaticCache
        assert type(text_cache) is EncoderDecoderCache and type(text_cache.self_attention_cache) is StaticCache


@pytest.mark.parametrize("model_class", [PalmEForConditionalGeneration, PalmEForCausalLM, PalmEModel])
def test_from_pretrained_names_a_truncated_weights_file(tmp_path, model_class):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=f"^{weights}: truncated or corrupt"):
        model_class.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_class", [PalmEForConditionalGeneration, PalmEForCausalLM])
def test_from_pretrained_names_a_missing_config(tmp_path, model_class):
    tiny_model().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").unlink()
    with pytest.raises(OSError, match=f"config.json is missing from {tmp_path / 'model'}: it is not a saved model"):
        model_class.from_pretrained(tmp_path / "model")
    config = tiny_model().config
    assert model_class.from_pretrained(tmp_path / "model", config=config).config.vocab_size == 97  # given: fine


@pytest.mark.parametrize(
    "variant, block_type, option",
    [
        ("prefix", "standard", "`alibi_num_heads=2`"),
        ("prefix", "hierarchical", "`block_type='hierarchical'`"),
        ("reference", "parallel", "`add_cross_attention=True`"),
    ],
)
def test_a_serving_engines_attention_is_refused_for_what_it_would_compute_wrong(variant, block_type, option):
    """vLLM's Transformers backend builds the model with its own attention implementation ("vllm"), which ignores the
    mask and the layers' kernels: a decoder that needs them is refused at construction, naming the option."""
    config = tiny_config(variant, block_type=block_type)
    config.text_config._attn_implementation = "vllm"
    with pytest.raises(ValueError, match=f"The attention implementation 'vllm' .*{re.escape(option)}"):
        PalmEForConditionalGeneration(config)
