"""Users' journeys through the public API, end to end, from the captioner that ships with palme_hf: LoRA fine-tuning
with added words (save, reload, merge), instruction-style prompts through the processor's chat template, and
training in the PaLM-E paper's prefix mode with `CaptioningCollator`."""

import json
import os

import peft
import PIL.Image
import pytest
import torch
from jinja2.exceptions import TemplateError
from safetensors.torch import load_file

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import CaptioningCollator, generate_captions
from palme_hf.cli import DEFAULT_CAPTIONER
from palme_hf.synthetic_shapes import SyntheticShapesDataset

from tiny_captioner import build_tokenizer, tiny_config

IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "images")


def sample_image() -> PIL.Image.Image:
    return PIL.Image.open(os.path.join(IMAGES, "held_out_00.png"))


def true_captions() -> dict[str, str]:
    with open(os.path.join(IMAGES, "captions.json")) as handle:
        return json.load(handle)


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


QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is left of the circle?"}]}]


@pytest.mark.parametrize("cross_attend", [True, False])
def test_chat_template_writes_instruction_prompts(cross_attend, tmp_path):
    tokenizer = build_tokenizer()
    processor = PalmEProcessor.from_model_config(tiny_config(len(tokenizer), cross_attend=cross_attend), tokenizer)
    marker = "" if cross_attend else "<image> "
    assert processor.apply_chat_template(QUESTION) == f"Q: {marker}what is left of the circle?"
    assert processor.apply_chat_template(QUESTION, add_generation_prompt=True) == (
        f"Q: {marker}what is left of the circle? A:"
    )
    conversation = [
        {"role": "system", "content": "answer briefly"},
        *QUESTION,
        {"role": "assistant", "content": [{"type": "text", "text": "a square"}]},
        {"role": "user", "content": "and right of it?"},
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        f"answer briefly Q: {marker}what is left of the circle? A: a square Q: and right of it? A:"
    )
    # an image alone is the captioning prompt: the bare marker, or nothing with cross-attention
    caption = [{"role": "user", "content": [{"type": "image"}]}]
    assert processor.apply_chat_template(caption, add_generation_prompt=True) == marker.strip()

    processor.save_pretrained(tmp_path)
    reloaded = PalmEProcessor.from_pretrained(tmp_path)
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.apply_chat_template(QUESTION) == processor.apply_chat_template(QUESTION)


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([{"role": "robot", "content": "hello"}], 'roles are "system", "user" and "assistant", got robot'),
        (
            [{"role": "user", "content": [{"type": "video"}]}],
            'messages hold "image" and "text" items, got a video item',
        ),
    ],
)
def test_chat_template_refuses_what_it_cannot_write(conversation, message):
    processor = PalmEProcessor.from_pretrained(DEFAULT_CAPTIONER)
    with pytest.raises(TemplateError, match=message):
        processor.apply_chat_template(conversation)


def test_chat_template_prompts_the_shipped_captioner():
    processor = PalmEProcessor.from_pretrained(DEFAULT_CAPTIONER)
    model = PalmEForConditionalGeneration.from_pretrained(DEFAULT_CAPTIONER)
    path = os.path.join(IMAGES, "held_out_00.png")
    conversation = [{"role": "user", "content": [{"type": "image", "path": path}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert torch.equal(inputs["input_ids"], processor(images=[sample_image()], text=[""])["input_ids"])
    generated = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    [caption] = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
    assert caption.strip() == true_captions()["held_out_00.png"]


@pytest.mark.slow  # trains
def test_captioning_collator_trains_in_prefix_mode():
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), cross_attend=False)
    model = PalmEForConditionalGeneration(config)
    processor = PalmEProcessor.from_model_config(config, tokenizer)
    items = [SyntheticShapesDataset(8, "train", seed=0, image_size=32)[index] for index in range(8)]
    collator = CaptioningCollator(processor, word_dropout=0.25)

    batch = collator(items)
    prompt_length = 1 + config.num_image_tokens  # <bos> and the image placeholders, as generate_captions prompts
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert (batch["input_ids"][:, 1:prompt_length] == config.image_token_id).all()
    assert (batch["labels"][:, :prompt_length] == -100).all()
    targets = [[token for token in row if token != -100] for row in batch["labels"].tolist()]
    assert [tokenizer.decode(ids[:-1]) for ids in targets] == [item["caption"] for item in items]
    assert all(ids[-1] == tokenizer.eos_token_id for ids in targets)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**collator(items)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses  # it learns
    captions = generate_captions(model, processor, [item["image"] for item in items[:2]], max_new_tokens=4)
    assert len(captions) == 2 and all(processor.image_token not in caption for caption in captions)
