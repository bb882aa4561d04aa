"""`GenerationMixin`'s decoding strategies on PalmE, for every block type and both image routes: each gives with the
cache what it gives by full recomputation (the assistant-based ones what greedy search gives), with and without an
image."""

import copy

import pytest
import torch
from transformers.cache_utils import Cache, EncoderDecoderCache, StaticCache, StaticLayer

from palme_hf import PalmEConfig, PalmEForConditionalGeneration
from palme_hf.compat_palme import CACHE_NAME

from helpers import (
    BLOCK_TYPES,
    combination_model,
    count_host_syncs,
    tiny_inputs,
    tiny_text_tower_config,
    tiny_vision_tower_config,
)

COMBINATIONS = [(block_type, integration) for block_type in BLOCK_TYPES for integration in ("reference", "prefix")]
STRATEGIES = {
    "greedy": {},
    "sample": dict(do_sample=True, top_k=5),
    "beam_search": dict(num_beams=3),
    "beam_sample": dict(num_beams=2, do_sample=True),
}


def generate(model, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model.generate(max_new_tokens=6, min_new_tokens=6, **kwargs)


@pytest.mark.parametrize("block_type, integration", COMBINATIONS)
def test_every_strategy_gives_with_the_cache_what_it_gives_without(block_type, integration):
    model = combination_model(block_type, integration, None)
    pixel_values, input_ids = tiny_inputs(model)
    for name, strategy in STRATEGIES.items():
        cached = generate(model, pixel_values=pixel_values, input_ids=input_ids, **strategy)
        uncached = generate(model, pixel_values=pixel_values, input_ids=input_ids, use_cache=False, **strategy)
        assert cached.shape == (2, input_ids.shape[1] + 6), name
        assert torch.equal(cached, uncached), name


@pytest.mark.parametrize("block_type, integration", COMBINATIONS)
def test_assisted_decoding_and_prompt_lookup_match_greedy(block_type, integration):
    model = combination_model(block_type, integration, None)
    pixel_values, input_ids = tiny_inputs(model, batch_size=1)
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids)
    greedy = generate(model, **inputs)
    # the model drafts for itself: generate() gives an assistant no image, PalmE passes it while its cache is empty
    assert torch.equal(generate(model, assistant_model=model, **inputs), greedy)
    assert torch.equal(generate(model, prompt_lookup_num_tokens=3, **inputs), greedy)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_text_only_generation(block_type):
    model = combination_model(block_type, "reference", None)
    _, input_ids = tiny_inputs(model)
    for strategy in STRATEGIES.values():
        cached = generate(model, input_ids=input_ids, **strategy)
        assert torch.equal(cached, generate(model, input_ids=input_ids, use_cache=False, **strategy))
    greedy = generate(model, input_ids=input_ids[:1])
    assert torch.equal(generate(model, input_ids=input_ids[:1], assistant_model=model), greedy)


@pytest.mark.parametrize("integration", ["reference", "prefix"])
def test_a_prefilled_prompt_cache_is_reused_for_several_continuations(integration):
    # Transformers' prompt-reuse recipe: prefill the shared prompt once, copy its cache for each continuation.
    model = combination_model("standard", integration, None)
    pixel_values, prompt = tiny_inputs(model, batch_size=1)
    with torch.no_grad():
        prompt_cache = getattr(model(pixel_values=pixel_values, input_ids=prompt, use_cache=True), CACHE_NAME)
    for suffix in ([5, 6], [7, 8, 9]):
        input_ids = torch.cat([prompt, torch.tensor([suffix])], dim=1)
        kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=5)
        reused = model.generate(**kwargs, **{CACHE_NAME: copy.deepcopy(prompt_cache)})
        assert torch.equal(reused, model.generate(**kwargs))


def prompt_cache_of(model, pixel_values, prompt):
    with torch.no_grad():
        return getattr(model(pixel_values=pixel_values, input_ids=prompt, use_cache=True), CACHE_NAME)


@pytest.mark.parametrize("integration", ["reference", "prefix"])
def test_a_cache_holding_one_image_refuses_another(integration):
    model = combination_model("standard", integration, None)
    (image_a, image_b), prompt = torch.rand(2, 1, 3, 32, 32), tiny_inputs(model, batch_size=1)[1]
    cache = prompt_cache_of(model, image_a, prompt)
    suffix = torch.tensor([[5, 6]])
    refused = "already holds .* tokens, computed with other images: .* start a new cache"
    with pytest.raises(ValueError, match=refused):
        model(pixel_values=image_b, input_ids=suffix, cache=copy.deepcopy(cache))
    with pytest.raises(ValueError, match=refused):
        model.generate(
            pixel_values=image_b,
            input_ids=torch.cat([prompt, suffix], dim=1),
            max_new_tokens=3,
            **{CACHE_NAME: copy.deepcopy(cache)},
        )
    # the whole prompt in the cache: generate() would feed it again after itself
    with pytest.raises(ValueError, match="already holds the whole prompt"):
        model.generate(pixel_values=image_b, input_ids=prompt, max_new_tokens=3, **{CACHE_NAME: copy.deepcopy(cache)})


@pytest.mark.parametrize("integration", ["reference", "prefix"])
def test_the_cached_image_given_again_continues_its_cache(integration):
    model = combination_model("standard", integration, None)
    pixel_values, prompt = tiny_inputs(model, batch_size=1)
    cache = prompt_cache_of(model, pixel_values, prompt)
    suffix = torch.tensor([[5, 6]])
    with torch.no_grad():
        continued = model(pixel_values=pixel_values, input_ids=suffix, cache=copy.deepcopy(cache)).logits
        without_image = model(input_ids=suffix, cache=copy.deepcopy(cache)).logits
        full = model(pixel_values=pixel_values, input_ids=torch.cat([prompt, suffix], dim=1)).logits[:, -2:]
    torch.testing.assert_close(continued, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(without_image, full, atol=1e-5, rtol=1e-5)


def test_a_cache_of_text_alone_refuses_an_image_for_cross_attention():
    # its tokens were computed without cross-attending to any image
    model = combination_model("standard", "reference", None)
    pixel_values, prompt = tiny_inputs(model, batch_size=1)
    with torch.no_grad():
        cache = getattr(model(input_ids=prompt, use_cache=True), CACHE_NAME)
    with pytest.raises(ValueError, match="computed with no image"):
        model(pixel_values=pixel_values, input_ids=prompt[:, :1], cache=cache)
    with pytest.raises(ValueError, match="`encoder_hidden_states` were given with a cache that already holds"):
        model.model.language_model(
            input_ids=prompt[:, :1], encoder_hidden_states=torch.rand(1, 16, 32), cache=cache, use_cache=True
        )


def test_a_later_turn_brings_a_new_image_with_its_placeholders():
    # the prefix route: images for placeholders among the new tokens are new images, after the cached ones
    model = combination_model("standard", "prefix", None)
    (image_a, image_b), first_turn = torch.rand(2, 1, 3, 32, 32), tiny_inputs(model, batch_size=1)[1]
    second_turn = tiny_inputs(model, batch_size=1, length=3)[1]
    cache = prompt_cache_of(model, image_a, first_turn)
    with torch.no_grad():
        continued = model(pixel_values=image_b, input_ids=second_turn, cache=cache).logits
        both_images = torch.cat([image_a, image_b])
        full = model(pixel_values=both_images, input_ids=torch.cat([first_turn, second_turn], dim=1)).logits
    torch.testing.assert_close(continued, full[:, -second_turn.shape[1] :], atol=1e-5, rtol=1e-5)
    # both images given again with that cache are the ones it holds
    with torch.no_grad():
        again = model(pixel_values=both_images, input_ids=torch.tensor([[5]]), cache=copy.deepcopy(cache)).logits
    with pytest.raises(ValueError, match="computed with other images"):
        model(pixel_values=image_b, input_ids=torch.tensor([[5]]), cache=copy.deepcopy(cache))
    assert again.shape == (1, 1, model.config.text_config.vocab_size)


@pytest.mark.parametrize("integration", ["reference", "prefix"])
def test_a_cache_emptied_and_refilled_holds_the_new_image_alone(integration):
    model = combination_model("standard", integration, None)
    (image_a, image_b), prompt = torch.rand(2, 1, 3, 32, 32), tiny_inputs(model, batch_size=1)[1]
    cache = prompt_cache_of(model, image_a, prompt)
    cache.reset()
    suffix = torch.tensor([[5, 6]])
    with torch.no_grad():
        model(pixel_values=image_b, input_ids=prompt, cache=cache)
        continued = model(pixel_values=image_b, input_ids=suffix, cache=cache).logits
        full = model(pixel_values=image_b, input_ids=torch.cat([prompt, suffix], dim=1)).logits[:, -2:]
    torch.testing.assert_close(continued, full, atol=1e-5, rtol=1e-5)


def prefix_model(text_tower: str) -> PalmEForConditionalGeneration:
    """A tiny prefix-route model: PalmE's own decoder (`"palme"`) or a Transformers Llama as the text tower."""
    if text_tower == "palme":
        return combination_model("standard", "prefix", None)
    vocab_size = 20
    config = PalmEConfig(
        vision_config=tiny_vision_tower_config("vit"),
        text_config=tiny_text_tower_config("llama", vocab_size + 1),
        vision_integration="prefix",
        image_token_id=vocab_size,
    )
    return PalmEForConditionalGeneration(config).eval()


def texts_with_one_and_two_images(model) -> tuple[dict, list[torch.Tensor]]:
    """
    A left-padded batch of two texts, the first with one image, the second with two (`generate()`'s inputs), and each
    text alone without its padding (its `input_ids` and its own images).
    """
    config = model.config
    placeholders = [config.image_token_id] * config.num_image_tokens
    texts = [[5, 6, *placeholders, 7, 8], [5, *placeholders, 9, *placeholders]]
    images = [torch.rand(1, 3, 32, 32), torch.rand(2, 3, 32, 32)]
    length = max(map(len, texts))
    input_ids = torch.tensor([[0] * (length - len(text)) + text for text in texts])
    attention_mask = torch.tensor([[0] * (length - len(text)) + [1] * len(text) for text in texts])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.cat(images))
    alone = [
        dict(input_ids=torch.tensor([text]), pixel_values=text_images) for text, text_images in zip(texts, images)
    ]
    return batch, alone


def recomputed_log_probability(model, text: dict, new_tokens: torch.Tensor) -> torch.Tensor:
    """The log-probability of `new_tokens` after `text` (one text with its own images), by one forward pass."""
    input_ids = torch.cat([text["input_ids"], new_tokens[None]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=text["pixel_values"]).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)[text["input_ids"].shape[1] - 1 : -1]
    return log_probs.gather(1, new_tokens[:, None]).sum()


@pytest.mark.parametrize("text_tower", ["palme", "llama"])
def test_beams_score_each_sequence_with_its_own_images(text_tower):
    model = prefix_model(text_tower)
    batch, alone = texts_with_one_and_two_images(model)
    # length_penalty=0: a beam's score is the sum of its tokens' log-probabilities
    kwargs = dict(num_beams=3, num_return_sequences=3, length_penalty=0.0, output_scores=True)
    cached = generate(model, **batch, **kwargs, return_dict_in_generate=True)
    uncached = generate(model, **batch, **kwargs, return_dict_in_generate=True, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)
    # with `inputs_embeds` the texts' images are found by their placeholders' embeddings
    embedded = {**batch, "inputs_embeds": model.get_input_embeddings()(batch.pop("input_ids"))}
    from_embeddings = generate(model, **embedded, **kwargs, return_dict_in_generate=True)
    torch.testing.assert_close(from_embeddings.sequences_scores, cached.sequences_scores)
    new_tokens = cached.sequences[:, embedded["inputs_embeds"].shape[1] :]
    for row, score in enumerate(cached.sequences_scores):
        expected = recomputed_log_probability(model, alone[row // 3], new_tokens[row])
        torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("text_tower", ["palme", "llama"])
def test_returned_samples_are_drawn_with_their_own_images(text_tower):
    model = prefix_model(text_tower)
    batch, alone = texts_with_one_and_two_images(model)
    kwargs = dict(do_sample=True, top_k=5, num_return_sequences=2, output_logits=True, return_dict_in_generate=True)
    cached = generate(model, **batch, **kwargs)
    uncached = generate(model, **batch, **kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    new_tokens = cached.sequences[:, batch["input_ids"].shape[1] :]
    for outputs in (cached, uncached):
        log_probs = torch.log_softmax(torch.stack(outputs.logits, dim=1).float(), dim=-1)
        scores = log_probs.gather(2, new_tokens[..., None]).sum(dim=(1, 2))
        for row, score in enumerate(scores):
            expected = recomputed_log_probability(model, alone[row // 2], new_tokens[row])
            torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("text_tower", ["palme", "llama"])
def test_a_separate_draft_model_assists_prompts_ending_in_text_and_in_an_image(text_tower):
    model = prefix_model(text_tower)
    torch.manual_seed(1)
    draft = prefix_model(text_tower)  # another model of the same vocabulary, whose drafts are mostly rejected
    placeholders = [model.config.image_token_id] * model.config.num_image_tokens
    for prompt in ([5, 6, *placeholders, 7], [5, 6, *placeholders]):
        inputs = dict(input_ids=torch.tensor([prompt]), pixel_values=torch.rand(1, 3, 32, 32))
        assert torch.equal(generate(model, assistant_model=draft, **inputs), generate(model, **inputs))


@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
@pytest.mark.parametrize("block_type, integration", COMBINATIONS)
def test_a_cached_decoding_step_never_waits_for_the_device(block_type, integration, cache_class):
    # A decoding step as generate() takes it (one token, the padding mask, the positions of its rows) reads no tensor
    # value on the host: on a GPU each read would stall the pipeline. The prompt is left-padded.
    model = combination_model(block_type, integration, None)
    pixel_values, input_ids = tiny_inputs(model)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    cache = None
    if cache_class == "static":
        cache = StaticCache(config=model.config.text_config, max_cache_len=input_ids.shape[1] + 4)
        if integration == "reference":
            cross_cache = Cache(layers=[StaticLayer(model.config.num_image_tokens) for _ in range(2)])
            cache = EncoderDecoderCache(cache, cross_cache)
    with torch.no_grad():
        prompt = model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, cache=cache, use_cache=True
        )
        next_tokens = prompt.logits[:, -1:].argmax(-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=1)
        position_ids = attention_mask.sum(dim=1, keepdim=True) - 1
        with count_host_syncs() as counts:
            step = model(
                input_ids=next_tokens,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=getattr(prompt, CACHE_NAME),
                use_cache=True,
            )
    assert counts == dict.fromkeys(counts, 0)
    assert torch.isfinite(step.logits).all()
