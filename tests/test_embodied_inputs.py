"""State vectors and object vectors beside images (the PaLM-E paper's multimodal sentences): each kind through its own
encoder into the placeholders of its token, in `forward`, `generate` (cache, static cache, compile, beams, samples),
with `inputs_embeds`, save/load, PEFT and frozen towers, on PalmE's own decoder and on a Transformers language model;
the processor's `states=` and `objects=` and its chat template."""

import numpy as np
import PIL.Image
import pytest
import torch
from jinja2.exceptions import TemplateError
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForImageTextToText, AutoProcessor, StaticCache

from palme_hf import PalmEConfig, PalmEForCausalLM, PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.compat_palme import CACHE_NAME

from helpers import count_host_syncs, save_tiny_towers, tiny_config, tiny_embodied_model
from tiny_captioner import build_tokenizer
from tiny_captioner import tiny_config as captioner_config

TEXT_TOWERS = ["palme", "llama"]


def sentence(model, *parts) -> list[int]:
    """Token ids of a multimodal sentence: ints are text tokens, "image", "state" and "object" their placeholders."""
    config, ids = model.config, []
    for part in parts:
        if isinstance(part, int):
            ids.append(part)
        else:
            count = config.num_image_tokens if part == "image" else getattr(config, f"num_{part}_tokens")
            ids += [getattr(config, f"{part}_token_id")] * count
    return ids


def observations(model, num_images: int, num_states: int, num_objects: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    return dict(
        pixel_values=torch.rand(num_images, 3, 32, 32, generator=generator),
        state_values=torch.rand(num_states, config.state_dim, generator=generator),
        object_values=torch.rand(num_objects, config.object_dim, generator=generator),
    )


def robot_prompt(model) -> dict:
    """One text with an image, a state and two objects, and its inputs."""
    ids = sentence(model, 5, "image", 6, "state", 7, "object", 8, "object", 9)
    return dict(input_ids=torch.tensor([ids]), **observations(model, 1, 1, 2))


def texts_with_different_counts(model) -> tuple[dict, list[dict]]:
    """
    A left-padded batch of two texts (the first with a state and two objects, the second with an image, two states
    and one object), and each text alone with its own values.
    """
    texts = [
        sentence(model, 5, "state", 6, "object", "object", 7),
        sentence(model, "image", 8, "state", 9, "state", "object", 4),
    ]
    first, second = observations(model, 0, 1, 2, seed=1), observations(model, 1, 2, 1, seed=2)
    alone = [
        dict(
            input_ids=torch.tensor([texts[0]]),
            state_values=first["state_values"],
            object_values=first["object_values"],
        ),
        dict(input_ids=torch.tensor([texts[1]]), **second),
    ]
    length = max(map(len, texts))
    batch = dict(
        input_ids=torch.tensor([[0] * (length - len(text)) + text for text in texts]),
        attention_mask=torch.tensor([[0] * (length - len(text)) + [1] * len(text) for text in texts]),
        pixel_values=second["pixel_values"],
        state_values=torch.cat([first["state_values"], second["state_values"]]),
        object_values=torch.cat([first["object_values"], second["object_values"]]),
    )
    return batch, alone


def generate(model, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model.generate(max_new_tokens=5, min_new_tokens=5, **kwargs)


def test_observations_are_off_by_default():
    config = tiny_config("prefix")
    assert (config.state_dim, config.state_token_id, config.object_dim, config.object_token_id) == (None,) * 4
    model = PalmEForConditionalGeneration(config)
    assert model.model.state_encoder is None and model.model.object_encoder is None
    assert not any("state_encoder" in key or "object_encoder" in key for key in model.state_dict())
    # a config saved before these options existed reads as one without them
    saved = {key: value for key, value in config.to_dict().items() if "state" not in key and "object" not in key}
    assert PalmEConfig.from_dict(saved).to_dict() == config.to_dict()


@pytest.mark.parametrize("text_tower", TEXT_TOWERS)
def test_each_vector_replaces_its_own_placeholders_in_order(text_tower):
    model = tiny_embodied_model(text_tower)
    inputs = robot_prompt(model)
    input_ids = inputs["input_ids"]
    assert model.model.state_encoder(inputs["state_values"]).shape == (1, 2, model.config.text_config.hidden_size)
    # the sentence PalmE builds: each placeholder run holds its encoder's features, in the order of the values
    embeddings = model.get_input_embeddings()(input_ids)
    image_features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    for token_id, features in (
        (model.config.image_token_id, image_features),
        (model.config.state_token_id, model.model.state_encoder(inputs["state_values"])),
        (model.config.object_token_id, model.model.object_encoder(inputs["object_values"])),
    ):
        embeddings[input_ids == token_id] = features.reshape(-1, features.shape[-1])
    with torch.no_grad():
        logits = model(**inputs).logits
        by_hand = model(inputs_embeds=embeddings).logits
        # with `inputs_embeds`, the placeholders are found by their embeddings
        embedded = model(inputs_embeds=model.get_input_embeddings()(input_ids), **{**inputs, "input_ids": None}).logits
        swapped = model(**{**inputs, "object_values": inputs["object_values"].flip(0)}).logits
    torch.testing.assert_close(logits, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embedded, logits, atol=1e-5, rtol=1e-5)
    first_object = input_ids[0].tolist().index(model.config.object_token_id)
    torch.testing.assert_close(swapped[:, :first_object], logits[:, :first_object])  # causal: before them, the same
    assert not torch.allclose(swapped[:, first_object:], logits[:, first_object:])


@pytest.mark.parametrize("text_tower", TEXT_TOWERS)
def test_a_left_padded_batch_with_different_counts_equals_each_text_alone(text_tower):
    model = tiny_embodied_model(text_tower)
    batch, alone = texts_with_different_counts(model)
    generated = generate(model, **batch)
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        last_logits = model(**batch).logits[:, -1]
    for row, text in enumerate(alone):
        assert torch.equal(generated[row, length:], generate(model, **text)[0, text["input_ids"].shape[1] :])
        with torch.no_grad():
            torch.testing.assert_close(last_logits[row], model(**text).logits[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_type", ["standard", "parallel", "hierarchical"])
def test_every_strategy_gives_with_the_cache_what_it_gives_without(block_type):
    model = tiny_embodied_model("palme", block_type=block_type)
    batch, _ = texts_with_different_counts(model)
    for strategy in (
        {},
        dict(do_sample=True, top_k=5, num_return_sequences=2),
        dict(num_beams=3, num_return_sequences=2),
    ):
        cached = generate(model, **batch, **strategy)
        assert torch.equal(cached, generate(model, **batch, **strategy, use_cache=False)), strategy
        if block_type != "hierarchical":  # a hierarchical decoder's cache is of its own layout
            static = generate(model, **batch, **strategy, cache_implementation="static")
            assert torch.equal(static, cached), strategy


@pytest.mark.parametrize("text_tower", TEXT_TOWERS)
def test_beams_score_each_sequence_with_its_own_vectors(text_tower):
    model = tiny_embodied_model(text_tower)
    batch, alone = texts_with_different_counts(model)
    kwargs = dict(num_beams=3, num_return_sequences=3, length_penalty=0.0, output_scores=True)
    outputs = generate(model, **batch, **kwargs, return_dict_in_generate=True)
    new_tokens = outputs.sequences[:, batch["input_ids"].shape[1] :]
    for row, score in enumerate(outputs.sequences_scores):
        text = alone[row // 3]
        input_ids = torch.cat([text["input_ids"], new_tokens[row][None]], dim=1)
        with torch.no_grad():
            logits = model(**{**text, "input_ids": input_ids}).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1)[text["input_ids"].shape[1] - 1 : -1]
        expected = log_probs.gather(1, new_tokens[row][:, None]).sum()
        torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-4)


def test_a_cached_decoding_step_never_waits_for_the_device():
    model = tiny_embodied_model("palme")
    batch, _ = texts_with_different_counts(model)
    cache = StaticCache(config=model.config.text_config, max_cache_len=batch["input_ids"].shape[1] + 2)
    with torch.no_grad():
        prompt = model(**batch, cache=cache, use_cache=True)
        next_tokens = prompt.logits[:, -1:].argmax(-1)
        attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(next_tokens)], dim=1)
        with count_host_syncs() as counts:
            step = model(
                input_ids=next_tokens,
                attention_mask=attention_mask,
                position_ids=attention_mask.sum(dim=1, keepdim=True) - 1,
                cache=getattr(prompt, CACHE_NAME),
                use_cache=True,
            )
    assert counts == dict.fromkeys(counts, 0)
    assert torch.isfinite(step.logits).all()


def test_placeholders_are_never_generated():
    model = tiny_embodied_model("palme")
    with torch.no_grad():
        model.lm_head.bias[model.config.state_token_id] = 1e4
        model.lm_head.bias[model.config.object_token_id] = 1e4
    generated = generate(model, **robot_prompt(model))[0, len(robot_prompt(model)["input_ids"][0]) :]
    assert not set(generated.tolist()) & {model.config.state_token_id, model.config.object_token_id}


def test_save_and_load(tmp_path):
    model = tiny_embodied_model("palme")
    model.save_pretrained(tmp_path)
    inputs = robot_prompt(model)
    for loaded in (
        PalmEForConditionalGeneration.from_pretrained(tmp_path),
        AutoModelForImageTextToText.from_pretrained(tmp_path),
    ):
        options = ("state_dim", "num_state_tokens", "state_token_id", "object_dim", "num_object_tokens")
        assert [getattr(loaded.config, key) for key in options] == [6, 2, 98, 4, 1]
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits)


def test_the_text_decoder_of_an_embodied_checkpoint_loads_alone(tmp_path):
    model = tiny_embodied_model("palme")
    model.save_pretrained(tmp_path)
    decoder, loading_info = PalmEForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    text = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(decoder.eval()(input_ids=text).logits, model(input_ids=text).logits)


def test_frozen_towers_leave_the_encoders_trainable():
    model = tiny_embodied_model("llama").train()
    model.freeze_towers()
    batch, _ = texts_with_different_counts(model)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for encoder in (model.model.state_encoder, model.model.object_encoder):
        assert all(parameter.requires_grad and parameter.grad.abs().sum() > 0 for parameter in encoder.parameters())
    assert all(parameter.grad is None for parameter in model.model.language_model.parameters())


def test_lora_trains_the_encoders_in_full():
    from peft import LoraConfig, get_peft_model

    model = tiny_embodied_model("llama")
    targets = model.lora_targets()
    assert {"model.state_encoder", "model.object_encoder"} <= set(targets["modules_to_save"])
    assert not any("encoder" in name for name in targets["target_modules"])
    peft_model = get_peft_model(model, LoraConfig(r=4, **targets))
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert any("state_encoder.modules_to_save" in name for name in trainable)
    assert any("object_encoder.modules_to_save" in name for name in trainable)
    batch, _ = texts_with_different_counts(model)
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    state_weight = peft_model.base_model.model.model.state_encoder.modules_to_save["default"].linear_1.weight
    assert state_weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(state_values=torch.rand(2, 6)),
            r"2 state placeholder tokens \(id 98; \[2\] per sequence\).* 2 `state_values`",
        ),
        (dict(object_values=torch.rand(1, 4)), r"2 object placeholder tokens .* 1 `object_values`"),
        (
            dict(state_values=torch.rand(1, 5)),
            r"`state_values` must have shape \(num_states, state_dim\) = \(num_states, 6\)",
        ),
        (dict(object_values=torch.rand(2)), r"`object_values` must have shape .* got \(2,\)"),
        (dict(state_values=torch.tensor([[0.0, 1, 2, float("nan"), 4, 5]])), "`state_values` hold NaN or infinite"),
        (dict(object_values=torch.tensor([[float("inf"), 0, 0, 0]] * 2)), "`object_values` hold NaN or infinite"),
        (
            dict(input_ids=torch.tensor([[5, 6, 7]]), pixel_values=None, object_values=None),
            "`state_values` were given"
            r" \(1\), but the text holds no state placeholder tokens \(id 98\)",
        ),
        (dict(state_values=None), r"`input_ids` hold state placeholder tokens \(id 98\) but no `state_values`"),
    ],
)
def test_bad_values_are_value_errors(change, message):
    model = tiny_embodied_model("palme")
    inputs = robot_prompt(model)
    inputs["input_ids"] = torch.tensor([[5, *sentence(model, "state"), 6, *sentence(model, "object", "object")]])
    inputs["pixel_values"] = None
    with pytest.raises(ValueError, match=message):
        model(**{**inputs, **change})


def test_values_for_a_model_without_their_encoder_are_value_errors():
    model = tiny_embodied_model("palme", object_dim=None, object_token_id=None)
    inputs = dict(input_ids=torch.tensor([[5, 6]]), object_values=torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"`object_values` were given, but this model takes no object vectors"):
        model(**inputs)
    with pytest.raises(ValueError, match=r"this model takes no object vectors"):
        model.generate(**inputs, num_beams=2, max_new_tokens=2)
    plain = tiny_config("reference")  # cross-attention: no state route
    with pytest.raises(ValueError, match=r"`state_values` were given, but this model takes no state vectors"):
        PalmEForConditionalGeneration(plain)(input_ids=torch.tensor([[5]]), state_values=torch.rand(1, 6))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(state_dim=6), r"`state_dim` needs `state_token_id`, the id of its placeholder token in \[0, 100\)"),
        (dict(object_dim=4, object_token_id=100), r"`object_dim` needs `object_token_id`.* got 100"),
        (dict(state_token_id=98), r"`state_token_id` \(98\) is set but `state_dim` is not"),
        (dict(state_dim=6, state_token_id=97), r"`state_token_id` \(97\) is the image placeholder"),
        (dict(state_dim=6, state_token_id=98, object_dim=4, object_token_id=98), "both 98"),
        (dict(state_dim=0, state_token_id=98), r"`state_dim` must be a positive integer, got 0"),
        (
            dict(object_dim=4, object_token_id=99, num_object_tokens=0),
            "`num_object_tokens` must be a positive integer",
        ),
    ],
)
def test_bad_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("prefix", image_token_id=97, vocab_size=100, observations=options)


def test_observations_need_the_prefix_route():
    with pytest.raises(ValueError, match=r"`state_dim` needs `vision_integration='prefix'`"):
        tiny_config("reference", vocab_size=100, observations=dict(state_dim=6, state_token_id=98))


def embodied_captioner_config(tokenizer) -> PalmEConfig:
    """A tiny captioner for `tokenizer` (whose last token is `<image>`) that also takes state and object vectors,
    whose markers `PalmEProcessor.from_model_config` adds after it."""
    return tiny_config(
        "prefix",
        vision=dict(patch_size=16, num_hidden_layers=1),
        image_token_id=len(tokenizer) - 1,
        vocab_size=len(tokenizer) + 2,
        observations=dict(
            state_dim=6,
            num_state_tokens=2,
            state_token_id=len(tokenizer),
            object_dim=4,
            object_token_id=len(tokenizer) + 1,
        ),
    )


@pytest.fixture
def embodied_processor():
    tokenizer = build_tokenizer()
    return PalmEProcessor.from_model_config(embodied_captioner_config(tokenizer), tokenizer)


def test_the_processor_expands_each_marker_into_its_placeholders(embodied_processor):
    processor = embodied_processor
    tokenizer = processor.tokenizer
    assert (processor.state_token, processor.state_token_id, processor.num_state_tokens) == ("<state>", 17, 2)
    assert (processor.object_token, processor.object_token_id, processor.num_object_tokens) == ("<obj>", 18, 1)
    objects = torch.rand(2, 4)
    inputs = processor(
        images=PIL.Image.new("RGB", (8, 8)),
        text="<image> a <state> red <obj> <obj> circle",
        states=np.arange(6),
        objects=objects,
    )
    a, red, circle = tokenizer.convert_tokens_to_ids(["a", "red", "circle"])
    assert inputs["input_ids"].tolist() == [[tokenizer.bos_token_id, *[16] * 4, a, 17, 17, red, 18, 18, circle]]
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "state_values", "object_values"}
    assert inputs["state_values"].dtype == torch.float32 and inputs["state_values"].tolist() == [list(range(6))]
    assert torch.equal(inputs["object_values"], objects)


def test_values_given_one_group_per_text_are_the_flat_values(embodied_processor):
    texts = ["<state> a <obj>", "<obj> <obj> red <state>"]
    states, objects = torch.rand(2, 6), torch.rand(3, 4)
    flat = embodied_processor(text=texts, states=states, objects=objects, padding=True)
    grouped = embodied_processor(
        text=texts, states=[states[:1], states[1:]], objects=[objects[:1], objects[1:]], padding=True
    )
    listed = embodied_processor(text=texts, states=list(states), objects=objects.tolist(), padding=True)
    for outputs in (grouped, listed):
        assert outputs.keys() == flat.keys()
        for key in flat:
            torch.testing.assert_close(outputs[key], flat[key])
    assert (flat["input_ids"] == 17).sum(dim=1).tolist() == [2, 2]


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(text="<state> a", states=torch.rand(2, 6)), r"1 state markers '<state>' \(\[1\] per text\) but 2 state"),
        (dict(text=["<obj> a", "b"], objects=None), r"1 object markers '<obj>' \(\[1, 0\] per text\) but 0 object"),
        (dict(text=["<obj>", "a"], objects=[torch.rand(0, 4), torch.rand(1, 4)]), r"Text 0 .* holds 1 object markers"),
        (dict(text=["<obj>"], objects=[torch.rand(1, 4), torch.rand(1, 4)]), "Got 2 groups of `objects` for 1 texts"),
        (
            dict(text="<state>", states=torch.rand(1, 2, 6)),
            r"`states` must be state vectors of one width.*\(1, 2, 6\)",
        ),
        (dict(images=PIL.Image.new("RGB", (8, 8)), states=torch.rand(1, 6)), "`states` were given without `text`"),
    ],
)
def test_the_processor_refuses_values_that_do_not_fit_the_markers(embodied_processor, inputs, message):
    with pytest.raises(ValueError, match=message):
        embodied_processor(**inputs)


def test_a_processor_without_state_vectors_refuses_them():
    tokenizer = build_tokenizer()
    processor = PalmEProcessor.from_model_config(captioner_config(len(tokenizer), cross_attend=False), tokenizer)
    assert processor.state_token is None and "<state>" not in tokenizer.get_vocab()
    with pytest.raises(ValueError, match=r"`states` were given, but this processor takes no state vectors"):
        processor(text="a", states=torch.rand(1, 6))
    with pytest.raises(TemplateError, match="This PalmE processor takes no object vectors, got a object item"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "object"}]}])


def test_the_chat_template_writes_state_and_object_items(embodied_processor, tmp_path):
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "state"},
                {"type": "text", "text": "a"},
                {"type": "object"},
                {"type": "text", "text": "red"},
                {"type": "object"},
            ],
        }
    ]
    prompt = embodied_processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "Q: <image> <state> a <obj> red <obj> A:"
    embodied_processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is PalmEProcessor
    assert (loaded.state_token_id, loaded.num_state_tokens, loaded.object_token_id) == (17, 2, 18)
    assert loaded.apply_chat_template(conversation, add_generation_prompt=True) == prompt
    inputs = dict(images=torch.rand(3, 32, 32), text=prompt, states=torch.rand(1, 6), objects=torch.rand(2, 4))
    expected, outputs = embodied_processor(**inputs), loaded(**inputs)
    assert outputs.keys() == expected.keys()
    for key in expected:
        assert torch.equal(outputs[key], expected[key]), key


def test_the_processor_feeds_forward_and_generate(embodied_processor):
    model = PalmEForConditionalGeneration(embodied_captioner_config(build_tokenizer())).eval()
    inputs = embodied_processor(
        images=[PIL.Image.new("RGB", (8, 8), "red")],
        text=["<state> a <obj>", "<image> <obj> <obj> red <state>"],
        states=torch.rand(2, 6),
        objects=torch.rand(3, 4),
        padding=True,
    )
    with torch.no_grad():
        assert model(**inputs).logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    texts = embodied_processor.post_process_image_text_to_text(generated)
    assert texts[1].startswith("red") and not any("<state>" in text or "<obj>" in text for text in texts)


def test_pretrained_towers_take_state_and_object_vectors(tmp_path):
    vision_dir, text_dir = save_tiny_towers(tmp_path, "vit", "llama")
    model = PalmEForConditionalGeneration.from_pretrained_towers(
        vision_dir, text_dir, state_dim=6, num_state_tokens=2, object_dim=4
    ).eval()
    processor = PalmEProcessor.from_pretrained_towers(vision_dir, text_dir, num_state_tokens=2, num_object_tokens=1)
    # the captioner's 16 words, then "<image>", "<state>" and "<obj>", in the model and in the processor
    ids = (model.config.image_token_id, model.config.state_token_id, model.config.object_token_id)
    assert ids == (processor.image_token_id, processor.state_token_id, processor.object_token_id) == (16, 17, 18)
    assert model.config.text_config.vocab_size == 19
    inputs = processor(
        images=[PIL.Image.new("RGB", (8, 8), "red")],
        text=["<image> <state> a <obj> <obj>", "<obj> red <state>"],
        states=[torch.rand(1, 6), torch.rand(1, 6)],
        objects=[torch.rand(2, 4), torch.rand(1, 4)],
        padding=True,
    )
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False))


@pytest.mark.slow
def test_compiled_static_cache_decoding_matches_eager():
    model = tiny_embodied_model("palme")
    batch, _ = texts_with_different_counts(model)
    kwargs = dict(**batch, do_sample=False, max_new_tokens=5, min_new_tokens=5, cache_implementation="static")
    eager = model.generate(**kwargs)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    model.forward = torch.compile(model.forward, fullgraph=True, backend=counter)
    compiled = model.generate(**kwargs)
    # one graph for the prefill (with the images, states and objects), one for the decoding steps
    assert counter.frame_count >= 2
    assert torch.equal(compiled, eager)
