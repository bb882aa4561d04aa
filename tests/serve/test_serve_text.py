"""vLLM's OpenAI-compatible server on a `PalmEForCausalLM` (parallel blocks): plain completions equal `generate()`
token for token, one at a time and 16 at once; bad requests get a 4xx and the server keeps serving."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from palme_hf import PalmEForCausalLM

from serving import MAX_MODEL_LEN, SERVED_NAME, save_text_model, start_server, stop_server

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of", "three", "a small red", "blue"]
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = save_text_model(str(tmp_path_factory.mktemp("text") / "model"))
    process, base_url = start_server(folder, str(tmp_path_factory.mktemp("log") / "server.log"))
    yield folder, openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    stop_server(process)


@pytest.fixture(scope="module")
def model(served):
    folder, _ = served
    return PalmEForCausalLM.from_pretrained(folder).eval()


def complete(client, prompt: str) -> tuple[list[int], list[int]]:
    response = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=MAX_NEW_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    return choice.prompt_token_ids, choice.token_ids


def generated(model, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return output[0, len(prompt_ids) :].tolist()


def test_completion_equals_generate(served, model):
    folder, client = served
    from transformers import AutoTokenizer

    prompt_ids, output_ids = complete(client, PROMPTS[0])
    assert prompt_ids == AutoTokenizer.from_pretrained(folder)(PROMPTS[0])["input_ids"]
    assert len(output_ids) > 0
    assert output_ids == generated(model, prompt_ids)


def test_16_concurrent_completions_all_equal_generate(served, model):
    _, client = served
    prompts = [PROMPTS[index % len(PROMPTS)] + " red" * (index // len(PROMPTS)) for index in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda prompt: complete(client, prompt), prompts))
    for prompt_ids, output_ids in results:
        assert output_ids == generated(model, prompt_ids)


def test_prompt_over_the_model_length_is_refused_and_the_server_keeps_serving(served, model):
    _, client = served
    with pytest.raises(openai.BadRequestError, match=str(MAX_MODEL_LEN)):
        client.completions.create(model=SERVED_NAME, prompt="red " * (MAX_MODEL_LEN + 1), max_tokens=1)
    prompt_ids, output_ids = complete(client, PROMPTS[1])
    assert output_ids == generated(model, prompt_ids)


def test_unknown_model_name_is_refused_and_the_server_keeps_serving(served, model):
    _, client = served
    with pytest.raises(openai.NotFoundError, match="palme-unknown"):
        client.completions.create(model="palme-unknown", prompt=PROMPTS[0], max_tokens=1)
    prompt_ids, output_ids = complete(client, PROMPTS[2])
    assert output_ids == generated(model, prompt_ids)
