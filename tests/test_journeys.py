"""Users' journeys through the public API, end to end, from the captioner that ships with palme_hf: LoRA fine-tuning
with added words (save, reload, merge), instruction-style prompts through the processor's chat template, and
training in the PaLM-E paper's prefix mode with `CaptioningCollator`."""

import os

import peft
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.cli import DEFAULT_CAPTIONER

IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "images")


def sample_image() -> PIL.Image.Image:
    return PIL.Image.open(os.path.join(IMAGES, "held_out_00.png"))


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
