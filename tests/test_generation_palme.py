"""`GenerationMixin`'s decoding strategies on PalmE, for every block type and both image routes: each gives with the
cache what it gives by full recomputation (the assistant-based ones what greedy search gives), with and without an
image."""

import copy

import pytest
import torch

from palme_hf.compat_palme import CACHE_NAME

from helpers import BLOCK_TYPES, combination_model, tiny_inputs

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
