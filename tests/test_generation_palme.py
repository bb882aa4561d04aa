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


def test_a_new_image_replaces_the_cached_one():
    model = combination_model("standard", "reference", None)
    (image_a, image_b), input_ids = torch.rand(2, 1, 3, 32, 32), tiny_inputs(model, batch_size=1)[1]
    with torch.no_grad():
        cache = getattr(model(pixel_values=image_a, input_ids=input_ids, use_cache=True), CACHE_NAME)
        step = model(pixel_values=image_b, input_ids=input_ids[:, :1], cache=cache, use_cache=True)
        fresh = getattr(model(pixel_values=image_b, input_ids=input_ids, use_cache=True), CACHE_NAME)
    for layer, expected in zip(
        getattr(step, CACHE_NAME).cross_attention_cache.layers, fresh.cross_attention_cache.layers
    ):
        torch.testing.assert_close(layer.keys, expected.keys)  # image B's keys, not image A's
        torch.testing.assert_close(layer.values, expected.values)
