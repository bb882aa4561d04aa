"""`palme_hf.captioning`: the collator in both image routes."""

import pytest
import torch

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import CaptioningCollator, generate_captions
from palme_hf.synthetic_shapes import SyntheticShapesDataset

from tiny_captioner import build_tokenizer, tiny_config


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
