"""vLLM's OpenAI-compatible server on a PalmE built by `from_pretrained_towers` (a ViT and a Llama): a chat with an
image and a plain completion equal `generate()` token for token."""

import openai
import pytest
import torch

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor

from serving import (
    CHAT_OPTIONS,
    SERVED_NAME,
    greedy_generate,
    image_message,
    random_image,
    save_towers_model,
    start_server,
    stop_server,
)

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = save_towers_model(str(tmp_path_factory.mktemp("towers") / "model"))
    process, base_url = start_server(folder, str(tmp_path_factory.mktemp("log") / "server.log"))
    yield folder, openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    stop_server(process)


@pytest.fixture(scope="module")
def reference(served):
    folder, _ = served
    return PalmEForConditionalGeneration.from_pretrained(folder).eval(), PalmEProcessor.from_pretrained(folder)


def test_chat_with_an_image_equals_generate(served, reference):
    _, client = served
    images = [random_image(3)]
    response = client.chat.completions.create(
        model=SERVED_NAME,
        messages=image_message(images, "what is shown"),
        max_tokens=MAX_NEW_TOKENS,
        temperature=0,
        extra_body=CHAT_OPTIONS,
    )
    expected_prompt_ids, expected_output_ids = greedy_generate(*reference, images, "what is shown", MAX_NEW_TOKENS)
    assert response.prompt_token_ids == expected_prompt_ids
    assert len(expected_output_ids) > 0
    assert response.choices[0].token_ids == expected_output_ids


def test_completion_equals_generate(served, reference):
    _, client = served
    model, processor = reference
    response = client.completions.create(
        model=SERVED_NAME, prompt="a red circle", max_tokens=MAX_NEW_TOKENS, temperature=0, extra_body=CHAT_OPTIONS
    )
    prompt_ids = processor.tokenizer("a red circle")["input_ids"]
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert response.choices[0].prompt_token_ids == prompt_ids
    assert response.choices[0].token_ids == output[0, len(prompt_ids) :].tolist()
