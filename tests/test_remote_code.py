"""A saved model loads with `trust_remote_code=True` in a Python that has Transformers but not palme_hf."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from palme_hf import PalmEForCausalLM, PalmEForConditionalGeneration

from conftest import WITHOUT_PALME_HF
from helpers import tiny_config

pytestmark = pytest.mark.slow  # each test starts a Python of its own

CODE = {
    "configuration_palme.py",
    "modeling_palme.py",
    "layers_palme.py",
    "blocks_palme.py",
    "hierarchical_palme.py",
    "compat_palme.py",
    "conversion_blocks.py",
}

LOADER = WITHOUT_PALME_HF + textwrap.dedent(
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = sys.argv[1]
    inputs = torch.load(folder + "/inputs.pt", weights_only=True)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    # keys palme-hf does not know (a tool's, a later version's) are kept, through a second save and load too
    model.save_pretrained(folder + "/resaved")
    for loaded in (config, AutoConfig.from_pretrained(folder + "/resaved", trust_remote_code=True)):
        foreign = [loaded.batch_norm_eps, loaded.text_config.tool_flag, loaded.vision_config.rms_norm_eps]
        assert foreign == [1.0, "t", 1.0], foreign
    assert type(model).__name__ == "PalmEForConditionalGeneration"
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    torch.save({"logits": logits, "generated": generated}, folder + "/outputs.pt")
    """
)


def small_config(variant="reference", **kwargs):
    return tiny_config(
        variant,
        vision=dict(patch_size=16, num_hidden_layers=1),
        vocab_size=50,
        hidden_size=32,
        num_attention_heads=2,
        **{"alibi_num_heads": 0 if kwargs.get("block_type") else 1, **kwargs},
    )


def run_without_palme_hf(program: str, folder, tmp_path):
    """Runs `program` on `folder` outside the checkout, with palme_hf blocked and an empty Hugging Face home (nothing
    cached, no network)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", program, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"variant": "prefix", "block_type": "hierarchical", "num_latents": 3, "window_size": 2},
        {
            "variant": "prefix",
            "observations": dict(
                state_dim=3, state_token_id=48, object_dim=2, num_object_tokens=2, object_token_id=49
            ),
        },
    ],
    ids=["standard", "hierarchical-resampler-prefix", "state-and-object-vectors"],
)
def test_saved_model_loads_with_remote_code_without_palme_hf(tmp_path, options):
    config = small_config(**options)
    config.batch_norm_eps = 1.0
    config.text_config.tool_flag = "t"
    config.vision_config.rms_norm_eps = 1.0
    model = PalmEForConditionalGeneration(config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    saved = set(os.listdir(folder))
    assert CODE | {"model.safetensors"} <= saved
    input_ids = torch.randint(0, 47, (2, 5))
    if config.vision_integration == "prefix":
        placeholders = torch.full((2, config.num_image_tokens), config.image_token_id)
        input_ids = torch.cat([input_ids[:, :1], placeholders, input_ids[:, 1:]], dim=1)
    inputs = {"pixel_values": torch.rand(2, 3, 32, 32), "input_ids": input_ids}
    if config.state_dim is not None:
        # each text a state, then its objects: one in the first, two in the second
        states = torch.full((2, 1), config.state_token_id)
        objects = torch.full((2, 2 * config.num_object_tokens), config.object_token_id)
        objects[0, : config.num_object_tokens] = 7
        input_ids = torch.cat([input_ids[:, :2], states, input_ids[:, 2:4], objects, input_ids[:, 4:]], dim=1)
        inputs.update(input_ids=input_ids, state_values=torch.rand(2, 3), object_values=torch.rand(3, 2))
    torch.save(inputs, folder / "inputs.pt")

    run_without_palme_hf(LOADER, folder, tmp_path)

    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(outputs["logits"], expected)
    assert torch.equal(outputs["generated"], model.generate(**inputs, do_sample=False, max_new_tokens=6))


CAUSAL_LM_LOADER = WITHOUT_PALME_HF + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = sys.argv[1]
    input_ids = torch.load(folder + "/inputs.pt", weights_only=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "PalmEForCausalLM"
    assert model.config.tool_flag == "t"  # a key palme-hf does not know, kept
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    generated = model.generate(input_ids=input_ids, do_sample=False, max_new_tokens=6)
    torch.save({"logits": logits, "generated": generated}, folder + "/outputs.pt")
    """
)


def test_saved_text_decoder_loads_with_remote_code_without_palme_hf(tmp_path):
    config = small_config()
    config.text_config.tool_flag = "t"
    full = PalmEForConditionalGeneration(config)
    full.save_pretrained(tmp_path / "full")
    model = PalmEForCausalLM.from_pretrained(tmp_path / "full").eval()
    folder = tmp_path / "text"
    model.save_pretrained(folder)
    assert CODE | {"model.safetensors"} <= set(os.listdir(folder))
    input_ids = torch.randint(0, 49, (2, 5))
    torch.save({"input_ids": input_ids}, folder / "inputs.pt")
    run_without_palme_hf(CAUSAL_LM_LOADER, folder, tmp_path)
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], model(input_ids=input_ids).logits)
    assert torch.equal(outputs["generated"], model.generate(input_ids=input_ids, do_sample=False, max_new_tokens=6))
