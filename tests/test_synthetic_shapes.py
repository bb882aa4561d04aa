"""The synthetic shapes captioning data, its augmentation and corruptions, its tokenizer, the captioning metrics, and
the captioner's training and evaluation scripts."""

import importlib.util
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from palme_hf import PalmEForConditionalGeneration, PalmEImageProcessor, PalmEProcessor, captioning
from palme_hf.captioning import ROBUSTNESS_CONDITIONS, CaptioningCollator, corpus_bleu, exact_match
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
    ImageAugmentation,
    SyntheticShapesDataset,
    add_gaussian_noise,
    build_caption_tokenizer,
    jpeg_compress,
    resize_by,
    scale_brightness,
    with_transparent_background,
)

from helpers import tiny_config
from tiny_captioner import build_tokenizer

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


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_corruptions():
    render = SyntheticShapesDataset(1, seed=0)[0]["image"]
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    noisy = add_gaussian_noise(grey, 5 / 255, random.Random(0))
    assert noisy.mode == "RGB" and noisy.size == (64, 64)
    assert np.std(pixels(noisy) - 128) == pytest.approx(5, rel=0.1) and abs(np.mean(pixels(noisy) - 128)) < 0.3
    assert add_gaussian_noise(grey, 5 / 255, random.Random(0)).tobytes() == noisy.tobytes()  # drawn from the rng
    assert add_gaussian_noise(grey, 5 / 255, random.Random(1)).tobytes() != noisy.tobytes()
    assert pixels(add_gaussian_noise(render, 10 / 255, random.Random(0))).min() == 0  # clipped, not wrapped

    compressed = jpeg_compress(render, 50)
    assert compressed.mode == "RGB" and compressed.size == render.size
    difference = np.abs(pixels(compressed) - pixels(render))
    assert 0 < difference.mean() < 10
    assert np.abs(pixels(jpeg_compress(render, 95)) - pixels(render)).mean() < difference.mean()

    darker = scale_brightness(render, 0.9)
    np.testing.assert_array_equal(pixels(darker), np.rint(pixels(render) * 0.9))
    assert pixels(scale_brightness(render, 1.5)).max() == 255
    assert resize_by(render, 0.75).size == (48, 48) and resize_by(render, 1.5).size == (96, 96)

    transparent = with_transparent_background(render)
    assert transparent.mode == "RGBA"
    background = (pixels(render) == BACKGROUND).all(axis=-1)
    assert (pixels(transparent)[background] == (255, 255, 255, 0)).all()
    assert (pixels(transparent)[~background][:, 3] == 255).all()
    processor = PalmEImageProcessor(size={"height": 64, "width": 64})
    torch.testing.assert_close(processor(transparent)["pixel_values"], processor(render)["pixel_values"])

    for call, match in [
        (lambda: jpeg_compress(render, 100), "`quality` must be an integer from 1 to 95, got 100"),
        (lambda: jpeg_compress(render, 50.0), "`quality`"),
        (lambda: add_gaussian_noise(render, -0.1, random.Random(0)), "`sigma` must be a number in"),
        (lambda: scale_brightness(render, 0), "`factor` must be a positive number, got 0"),
        (lambda: resize_by(render, "2"), "`factor`"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_augmentation_is_drawn_from_the_item_and_keeps_the_caption_true():
    clean = SyntheticShapesDataset(60, seed=2)
    augmented = SyntheticShapesDataset(60, seed=2, augmentation=ImageAugmentation())
    again = SyntheticShapesDataset(60, seed=2, augmentation=ImageAugmentation())
    sizes, changed = set(), 0
    for index in range(60):
        item, render = augmented[index], clean[index]
        assert item["caption"] == render["caption"]
        assert item["image"].tobytes() == again[index]["image"].tobytes()
        sizes.add(item["image"].size)
        changed += item["image"].size != (64, 64) or item["image"].tobytes() != render["image"].tobytes()
        # Whatever was done to it, each shape's colour is still the one nearest to the centre of its bounding box.
        image = np.asarray(item["image"].resize((64, 64), resample=Image.Resampling.BILINEAR)).astype(float)
        for spec in clean.scene(index):
            scale_x, scale_y = 64 / render["image"].size[0], 64 / render["image"].size[1]
            centre = image[round(spec.center_y * scale_y), round(spec.center_x * scale_x)]
            nearest = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - centre).sum())
            if spec.side > 8:  # small shapes can move a pixel or two with the crop: skip them
                assert nearest == spec.colour, (index, spec, centre)
    assert len(sizes) > 10  # crops and resizes
    # Five changes at probability 0.5, of which a crop may round to no pixel: about 1 image in 10 is left as it is.
    assert changed >= 48, changed

    untouched = SyntheticShapesDataset(5, seed=2, augmentation=ImageAugmentation(probability=0.0))
    assert all(untouched[i]["image"].tobytes() == clean[i]["image"].tobytes() for i in range(5))
    only_noise = ImageAugmentation(
        probability=1.0, max_crop=0.0, scale=None, brightness=None, noise_sigma=(4 / 255, 4 / 255), jpeg_quality=None
    )
    grey = Image.new("RGB", (64, 64), (100, 100, 100))
    assert np.std(pixels(only_noise(grey, random.Random(0))) - 100) == pytest.approx(4, rel=0.1)
    only_crop = ImageAugmentation(probability=1.0, max_crop=0.25, scale=None, brightness=None, noise_sigma=None,
                                  jpeg_quality=None)  # fmt: skip
    crops = {only_crop(grey, random.Random(seed)).size for seed in range(20)}
    assert len(crops) > 5 and all(33 <= side <= 64 for size in crops for side in size)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(probability=1.5), "`probability` must be a number in \\[0, 1.0\\], got 1.5"),
        (dict(max_crop=0.5), "`max_crop`"),
        (dict(jpeg_quality=(30, 100)), "`jpeg_quality` must be None or a \\(min, max\\) tuple of integers"),
        (dict(jpeg_quality=(30.0, 90)), "`jpeg_quality`"),
        (dict(noise_sigma=(0.1, 0.0)), "`noise_sigma`"),
        (dict(scale=[0.5, 2.0]), "`scale`"),
        (dict(brightness=(0.0, 1.0)), "`brightness`"),
    ],
)
def test_augmentation_refuses_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        ImageAugmentation(**options)


def test_dataset_refuses_an_augmentation_that_is_not_one():
    with pytest.raises(ValueError, match="`augmentation` must be an ImageAugmentation or None, got 'jpeg'"):
        SyntheticShapesDataset(4, augmentation="jpeg")


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


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_captioner(directory) -> tuple[PalmEForConditionalGeneration, PalmEProcessor]:
    """An untrained tiny captioner of the renders' size (64x64 images in 16 patches) with its processor, saved in
    `directory`."""
    tokenizer = build_tokenizer(image_token=None)
    config = tiny_config(
        vision=dict(image_size=64, patch_size=16, num_hidden_layers=1),
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_attention_heads=2,
        alibi_num_heads=1,
        qk_norm=False,
    )
    torch.manual_seed(0)
    model = PalmEForConditionalGeneration(config).eval()
    processor = PalmEProcessor.from_model_config(model.config, tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def oracle_captions(model, processor, images, batch_size=64, max_new_tokens=32):
    """Stands in for `generate_captions`: reads the captions off what the processor makes of the images, right only
    where every shape still has exactly its colour (the clean renders, and their transparent versions)."""
    pixel_values = processor.image_processor(images, return_tensors="pt")
    captions = []
    for image in pixel_values["pixel_values"]:
        rgb = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        colours = {tuple(pixel) for pixel in rgb.reshape(-1, 3)} - {BACKGROUND}
        if not colours <= set(COLOURS.values()):
            captions.append("a small red circle")
            continue
        triples = read_scene(rgb)
        captions.append(" left of ".join(f"a {size} {colour} {shape}" for size, colour, shape in triples))
    return captions


def test_evaluation_script_scores_each_condition_on_the_held_out_renders(tmp_path, monkeypatch, capsys):
    evaluate_captioner = load_script("evaluate_captioner")
    save_tiny_captioner(tmp_path / "model")
    # With a captioner that reads exact colours, only the clean and the transparent renders are captioned right:
    # the images are the held-out renders of the seed, with their captions, each changed by its condition.
    monkeypatch.setattr(captioning, "generate_captions", oracle_captions)
    output = tmp_path / "results.json"
    arguments = ["--model", str(tmp_path / "model"), "--num-samples", "8", "--seed", "5", "--output", str(output)]
    report = evaluate_captioner.main(arguments)
    expected = {name: 0.0 for name in ROBUSTNESS_CONDITIONS} | {"clean": 1.0, "RGBA (transparent background)": 1.0}
    assert report["robustness"] == expected and list(report["robustness"]) == list(ROBUSTNESS_CONDITIONS)
    assert report["num_samples"] == 8 and report["seed"] == 5
    assert json.loads(output.read_text()) == report
    table = capsys.readouterr().out
    assert captioning.robustness_table(expected) in table and "| RGBA (transparent background) | 1.000 |" in table
    subset = evaluate_captioner.main([*arguments[:4], "--conditions", "JPEG q50", "clean"])["robustness"]
    assert subset == {"JPEG q50": 0.0, "clean": 1.0}


@pytest.mark.slow  # captions 3 images 11 times with a real (tiny) model
def test_evaluation_script_captions_with_the_model(tmp_path):
    evaluate_captioner = load_script("evaluate_captioner")
    model, processor = save_tiny_captioner(tmp_path / "model")
    report = evaluate_captioner.main(["--model", str(tmp_path / "model"), "--num-samples", "3", "--seed", "5"])
    assert list(report["robustness"]) == list(ROBUSTNESS_CONDITIONS)
    assert all(0.0 <= value <= 1.0 for value in report["robustness"].values())
    # The "clean" figure is the exact match of the model's captions of the held-out renders of that seed.
    held_out = SyntheticShapesDataset(3, "held_out", seed=5)
    items = [held_out[i] for i in range(3)]
    captions = captioning.generate_captions(model, processor, [item["image"] for item in items], max_new_tokens=16)
    assert report["robustness"]["clean"] == exact_match([item["caption"] for item in items], captions)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
        (["--batch-size", "-1"], "--batch-size must be a positive integer, got -1"),
        (["--conditions", "fog"], "invalid choice: 'fog'"),
    ],
)
def test_evaluation_script_refuses_bad_arguments(arguments, message, tmp_path, capsys):
    evaluate_captioner = load_script("evaluate_captioner")
    with pytest.raises(SystemExit) as error:
        evaluate_captioner.main(["--model", str(tmp_path), *arguments])
    assert error.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"error: {tmp_path} has no config.json"):
        evaluate_captioner.main(["--model", str(tmp_path)])


def test_training_script_runs_and_the_loss_falls(tmp_path):
    train_captioner = load_script("train_captioner")
    arguments = [
        "--output-dir", str(tmp_path), "--train-samples", "640", "--batch-size", "16", "--learning-rate", "3e-3",
        "--image-size", "32", "--patch-size", "8", "--hidden-size", "32", "--num-layers", "1",
        "--eval-samples", "8", "--logging-steps", "5", "--robustness-samples", "3",
    ]  # fmt: skip
    trainer = train_captioner.main(arguments)
    assert trainer.train_dataset.augmentation == ImageAugmentation()  # on by default
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    metrics = json.loads((tmp_path / "eval_results.json").read_text())
    assert metrics["num_samples"] == 8 and 0.0 <= metrics["bleu"] <= 1.0
    assert list(metrics["robustness"]) == list(ROBUSTNESS_CONDITIONS)
    assert metrics["robustness_samples"] == 3 and metrics["robustness_seed"] == 1
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert captioning.robustness_table(metrics["robustness"]) in card
    assert "JPEG at quality 30 to 95" in card and "The patch LayerNorm's epsilon is 0.1" in card
    model = PalmEForConditionalGeneration.from_pretrained(tmp_path)
    processor = PalmEProcessor.from_pretrained(tmp_path)
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert processor.image_processor.size == {"height": 32, "width": 32}
    assert model.config.vision_config.patch_norm_eps == 0.1


def test_training_script_without_augmentation_trains_on_the_renders(tmp_path):
    train_captioner = load_script("train_captioner")
    arguments = [
        "--output-dir", str(tmp_path), "--train-samples", "32", "--batch-size", "16", "--image-size", "32",
        "--hidden-size", "32", "--num-layers", "1", "--eval-samples", "2", "--robustness-samples", "0",
        "--no-augment", "--patch-norm-eps", "1e-5",
    ]  # fmt: skip
    trainer = train_captioner.main(arguments)
    assert trainer.train_dataset.augmentation is None
    metrics = json.loads((tmp_path / "eval_results.json").read_text())
    assert "robustness" not in metrics
    card = (tmp_path / "README.md").read_text()
    assert "were the clean renders (`--no-augment`)" in card and "Not measured (`--robustness-samples 0`)" in card
    assert PalmEForConditionalGeneration.from_pretrained(tmp_path).config.vision_config.patch_norm_eps == 1e-5
