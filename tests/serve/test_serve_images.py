"""vLLM's OpenAI-compatible server on the prefix-route PalmE of parallel blocks (images as placeholders in the text):
chat completions with one and several base64 images equal `generate()` token for token, one at a time and 16 at
once; bad images and image counts get a 4xx and the server keeps serving."""

import base64
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor

from serving import (
    CHAT_OPTIONS,
    MAX_IMAGES_PER_PROMPT,
    SERVED_NAME,
    greedy_generate,
    image_message,
    random_image,
    save_prefix_model,
    start_server,
    stop_server,
)

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = save_prefix_model(str(tmp_path_factory.mktemp("prefix") / "model"))
    log = str(tmp_path_factory.mktemp("log") / "server.log")
    limit = f'{{"image": {MAX_IMAGES_PER_PROMPT}}}'
    process, base_url = start_server(folder, log, "--limit-mm-per-prompt", limit)
    yield folder, openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    stop_server(process)


@pytest.fixture(scope="module")
def reference(served):
    folder, _ = served
    return PalmEForConditionalGeneration.from_pretrained(folder).eval(), PalmEProcessor.from_pretrained(folder)


def chat(client, images, text: str) -> tuple[list[int], list[int]]:
    response = client.chat.completions.create(
        model=SERVED_NAME,
        messages=image_message(images, text),
        max_tokens=MAX_NEW_TOKENS,
        temperature=0,
        extra_body=CHAT_OPTIONS,
    )
    return response.prompt_token_ids, response.choices[0].token_ids


@pytest.mark.parametrize("num_images", [1, 2])
def test_chat_with_images_equals_generate(served, reference, num_images):
    _, client = served
    images = [random_image(seed) for seed in range(num_images)]
    prompt_ids, output_ids = chat(client, images, "what is shown")
    expected_prompt_ids, expected_output_ids = greedy_generate(*reference, images, "what is shown", MAX_NEW_TOKENS)
    assert prompt_ids == expected_prompt_ids
    assert prompt_ids.count(reference[0].config.image_token_id) == num_images * reference[0].config.num_image_tokens
    assert len(output_ids) > 0
    assert output_ids == expected_output_ids


def test_16_concurrent_chats_with_images_all_equal_generate(served, reference):
    _, client = served
    requests = [([random_image(100 + index)], ["a red circle", "blue"][index % 2]) for index in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda request: chat(client, *request), requests))
    for (images, text), (prompt_ids, output_ids) in zip(requests, results):
        assert (prompt_ids, output_ids) == greedy_generate(*reference, images, text, MAX_NEW_TOKENS)


def assert_still_serving(client, reference):
    images = [random_image(7)]
    assert chat(client, images, "a red circle") == greedy_generate(*reference, images, "a red circle", MAX_NEW_TOKENS)


def test_non_image_payload_is_refused_and_the_server_keeps_serving(served, reference):
    _, client = served
    not_an_image = base64.b64encode(b"this is text, not a PNG").decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{not_an_image}"}},
                {"type": "text", "text": "what is shown"},
            ],
        }
    ]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=1)
    assert_still_serving(client, reference)


def test_more_images_than_a_prompt_takes_are_refused_and_the_server_keeps_serving(served, reference):
    _, client = served
    images = [random_image(seed) for seed in range(MAX_IMAGES_PER_PROMPT + 1)]
    with pytest.raises(openai.BadRequestError, match="image"):
        client.chat.completions.create(model=SERVED_NAME, messages=image_message(images, "what"), max_tokens=1)
    assert_still_serving(client, reference)


def test_a_requests_own_chat_template_is_refused_and_the_server_keeps_serving(served, reference):
    # The chat template puts one placeholder per image item, so images always have their placeholders; a request's
    # own template that leaves them out (more images than placeholders) makes vLLM 0.32 fail beyond a 4xx (a 500, or
    # a dropped connection), so the server takes no templates from requests (no `--trust-request-chat-template`).
    images = [random_image(seed) for seed in range(2)]
    _, client = served
    with pytest.raises(openai.BadRequestError, match="untrusted chat template"):
        client.chat.completions.create(
            model=SERVED_NAME,
            messages=image_message(images, "what is shown"),
            max_tokens=1,
            extra_body={"chat_template": "{{ messages[0]['content'][-1]['text'] }}"},
        )
    assert_still_serving(client, reference)
