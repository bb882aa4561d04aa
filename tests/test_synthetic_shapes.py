"""The synthetic shapes captioning data, its tokenizer, the captioning metrics, and the captioner training script."""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from palme_hf import PalmEForConditionalGeneration, PalmEImageProcessor, PalmEProcessor
from palme_hf.captioning import CaptioningCollator, corpus_bleu, exact_match
from palme_hf.synthetic_shapes import (
    ALL_COMBINATIONS,
    BACKGROUND,
    CAPTION_WORDS,
    COLOURS,
    HELD_OUT_COMBINATIONS,
    MAX_CAPTION_TOKENS,
    SHAPES,
    SIZES,
    TRAIN_COMBINATIONS,
    SyntheticShapesDataset,
    build_caption_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE_PATTERN = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
CAPTION_PATTERN = re.compile(rf"{SHAPE_PATTERN}( left of {SHAPE_PATTERN}){{0,2}}")


def parse_caption(caption: str) -> list[tuple[str, str, str]]:
    """The (size, colour, shape) triples of a caption, left to right; fails the test on a caption off the grammar."""
    assert CAPTION_PATTERN.fullmatch(caption), caption
    return [tuple(match) for match in re.findall(SHAPE_PATTERN, caption)]


def read_scene(image) -> list[tuple[str, str, str]]:
    """
    Reads the shapes off the pixels, left to right, one per third of the image: colour from the pixels, size from
    the bounding box, shape from how much of the bounding box is filled (square ~1, circle ~pi/4, triangle ~1/2).
    """
    pixels = np.asarray(image).astype(int)
    column_width = pixels.shape[1] / 3
    triples = []
    for column in range(3):
        region = pixels[:, round(column * column_width) : round((column + 1) * column_width)]
        filled = np.any(region != BACKGROUND, axis=-1)
        if not filled.any():
            continue
        rows, cols = np.nonzero(filled)
        colours = {tuple(pixel) for pixel in region[filled]}
        assert len(colours) == 1, f"column {column} holds several colours: {colours}"
        (rgb,) = colours
        colour = next(name for name, value in COLOURS.items() if value == rgb)
        width = cols.max() - cols.min() + 1
        height = rows.max() - rows.min() + 1
        size = "large" if width > 0.6 * column_width else "small"
        fill = filled.sum() / (width * height)
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        triples.append((size, colour, shape))
    return triples


def test_same_seed_same_data_and_other_seed_other_data():
    first, again = SyntheticShapesDataset(20, seed=3), SyntheticShapesDataset(20, seed=3)
    other = SyntheticShapesDataset(20, seed=4)
    for index in range(20):
        assert first[index]["caption"] == again[index]["caption"]
        assert first[index]["image"].tobytes() == again[index]["image"].tobytes()
    assert [first[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]


def test_held_out_combinations_never_appear_in_training():
    assert set(TRAIN_COMBINATIONS) | set(HELD_OUT_COMBINATIONS) == set(ALL_COMBINATIONS)
    assert not set(TRAIN_COMBINATIONS) & set(HELD_OUT_COMBINATIONS)
    for pair in [(0, 1), (0, 2), (1, 2)]:  # every pair of attributes of a held-out combination is seen in training
        training_pairs = {tuple(combination[i] for i in pair) for combination in TRAIN_COMBINATIONS}
        assert {tuple(combination[i] for i in pair) for combination in HELD_OUT_COMBINATIONS} <= training_pairs
    train = SyntheticShapesDataset(2000, "train", seed=0)
    seen = {(spec.size, spec.colour, spec.shape) for index in range(len(train)) for spec in train.scene(index)}
    assert seen == set(TRAIN_COMBINATIONS)
    held_out = SyntheticShapesDataset(300, "held_out", seed=0)
    for index in range(len(held_out)):
        assert set(parse_caption(held_out[index]["caption"])) & set(HELD_OUT_COMBINATIONS)


@pytest.mark.parametrize("split", ["train", "held_out"])
@pytest.mark.parametrize("image_size", [64, 96])
def test_caption_describes_the_drawn_scene(split, image_size):
    dataset = SyntheticShapesDataset(100, split, seed=1, image_size=image_size)
    counts = set()
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].mode == "RGB" and item["image"].size == (image_size, image_size)
        triples = parse_caption(item["caption"])
        assert read_scene(item["image"]) == triples
        counts.add(len(triples))
    assert counts == {1, 2, 3}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        SyntheticShapesDataset(4, "test")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapesDataset(4, image_size=16)
    with pytest.raises(IndexError):
        SyntheticShapesDataset(4)[4]


def test_bleu_and_exact_match_on_known_examples():
    reference = "a small red circle left of a large blue square"
    assert corpus_bleu([reference], [reference]) == pytest.approx(1.0)
    # one wrong last word: clipped precisions 9/10, 8/9, 7/8, 6/7
    assert corpus_bleu([reference], [reference.replace("square", "circle")]) == pytest.approx(0.6**0.25)
    # all n-grams match but the hypothesis is 4 words for 10: brevity penalty exp(1 - 10/4)
    assert corpus_bleu([reference], ["a small red circle"]) == pytest.approx(math.exp(-1.5))
    # counts are pooled over the corpus, not averaged per sentence: precisions 1, lengths 14 and 8
    references = ["a small red circle", "a large blue square left of a small green circle"]
    hypotheses = ["a small red circle", "a large blue square"]
    assert corpus_bleu(references, hypotheses) == pytest.approx(math.exp(1 - 14 / 8))
    assert corpus_bleu([reference], ["a blue circle"]) == 0.0  # no 4-gram in common
    assert exact_match(references, hypotheses) == 0.5
    assert exact_match([reference], [f" {reference} "]) == 1.0
    with pytest.raises(ValueError, match="2 references and 1 hypotheses"):
        corpus_bleu(references, hypotheses[:1])


def test_tokenizer_round_trip(tmp_path):
    tokenizer = build_caption_tokenizer()
    assert len(tokenizer) == 4 + len(CAPTION_WORDS)
    caption = "a large yellow triangle left of a small green square left of a small blue circle"
    ids = tokenizer(caption)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert len(ids) == MAX_CAPTION_TOKENS - 1  # the longest caption: <bos> and 14 words (the collator adds <eos>)
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    assert tokenizer("")["input_ids"] == [tokenizer.bos_token_id]
    assert tokenizer("a purple circle")["input_ids"][2] == tokenizer.unk_token_id
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(caption)["input_ids"] == ids
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)


def test_collator_builds_inputs_and_labels():
    tokenizer = build_caption_tokenizer()
    dataset = SyntheticShapesDataset(2, seed=0)
    items = [
        {"image": dataset[0]["image"], "caption": "a small red circle"},
        {"image": dataset[1]["image"], "caption": "a large blue square left of a small red circle"},
    ]
    processor = PalmEProcessor(PalmEImageProcessor(size={"height": 64, "width": 64}), tokenizer, image_token=None)
    batch = CaptioningCollator(processor)(items)
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert 0.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    shape = dataset.scene(0)[0]
    centre = batch["pixel_values"][0, :, round(shape.center_y), round(shape.center_x)]
    torch.testing.assert_close(centre, torch.tensor(COLOURS[shape.colour]) / 255.0)
    short = tokenizer(items[0]["caption"])["input_ids"] + [tokenizer.eos_token_id]
    long = tokenizer(items[1]["caption"])["input_ids"] + [tokenizer.eos_token_id]
    padding = [tokenizer.pad_token_id] * (len(long) - len(short))
    assert batch["input_ids"].tolist() == [short + padding, long]
    assert batch["attention_mask"].tolist() == [[1] * len(short) + [0] * len(padding), [1] * len(long)]
    assert batch["labels"].tolist() == [[-100] + short[1:] + [-100] * len(padding), [-100] + long[1:]]

    torch.manual_seed(0)
    dropped = CaptioningCollator(processor, word_dropout=0.5)(items)
    hidden = dropped["input_ids"] != batch["input_ids"]
    assert hidden.any() and (dropped["input_ids"][hidden] == tokenizer.unk_token_id).all()
    assert not (hidden & (batch["labels"] == -100)).any()  # <bos> and padding stay
    assert torch.equal(dropped["labels"], batch["labels"])


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_captioner", REPO_ROOT / "examples" / "train_captioner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_script_runs_and_the_loss_falls(tmp_path):
    train_captioner = load_training_script()
    arguments = [
        "--output-dir", str(tmp_path), "--train-samples", "640", "--batch-size", "16", "--learning-rate", "3e-3",
        "--image-size", "32", "--patch-size", "8", "--hidden-size", "32", "--num-layers", "1",
        "--eval-samples", "8", "--logging-steps", "5",
    ]  # fmt: skip
    trainer = train_captioner.main(arguments)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    metrics = json.loads((tmp_path / "eval_results.json").read_text())
    assert metrics["num_samples"] == 8 and 0.0 <= metrics["bleu"] <= 1.0
    assert (tmp_path / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")
    model = PalmEForConditionalGeneration.from_pretrained(tmp_path)
    processor = PalmEProcessor.from_pretrained(tmp_path)
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert processor.image_processor.size == {"height": 32, "width": 32}
