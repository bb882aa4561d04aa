"""A saved model loads with `trust_remote_code=True` in a Python that has Transformers but not palme_hf."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from palme_hf import PalmEConfig, PalmEForConditionalGeneration
from conftest import WITHOUT_PALME_HF

LOADER = WITHOUT_PALME_HF + textwrap.dedent(
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = sys.argv[1]
    inputs = torch.load(folder + "/inputs.pt", weights_only=True)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "PalmEForConditionalGeneration"
    with torch.no_grad():
        logits = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits
    generated = model.generate(
        pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], do_sample=False, max_new_tokens=6
    )
    torch.save({"logits": logits, "generated": generated}, folder + "/outputs.pt")
    """
)


@pytest.mark.parametrize(
    "options",
    [
        {"alibi_num_heads": 1},
        {"block_type": "hierarchical", "num_latents": 3, "cross_attend": False, "text_config": {"window_size": 2}},
    ],
    ids=["standard", "hierarchical-resampler-prefix"],
)
def test_saved_model_loads_with_remote_code_without_palme_hf(tmp_path, options):
    config = PalmEConfig(
        image_size=32, patch_size=16, encoder_dim=32, encoder_depth=1, encoder_heads=2, num_tokens=50,
        max_seq_len=32, decoder_dim=32, decoder_depth=2, decoder_heads=2, **options,
    )
    model = PalmEForConditionalGeneration(config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    saved = set(os.listdir(folder))
    code = {"configuration_palme.py", "modeling_palme.py", "layers_palme.py", "blocks_palme.py", "hierarchical_palme.py"}
    assert code | {"model.safetensors"} <= saved
    input_ids = torch.randint(0, 49, (2, 5))
    if config.vision_integration == "prefix":
        placeholders = torch.full((2, config.num_image_tokens), config.image_token_id)
        input_ids = torch.cat([input_ids[:, :1], placeholders, input_ids[:, 1:]], dim=1)
    inputs = {"pixel_values": torch.rand(2, 3, 32, 32), "input_ids": input_ids}
    torch.save(inputs, folder / "inputs.pt")

    # Run outside the checkout, with palme_hf blocked, and an empty Hugging Face home (nothing cached, no network).
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]

    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(outputs["logits"], expected)
    assert torch.equal(outputs["generated"], model.generate(**inputs, do_sample=False, max_new_tokens=6))
