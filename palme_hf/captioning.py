"""Pieces for training and scoring a PalmE captioner: a folder of captioned images, a data collator, greedy
captioning, exact match and BLEU, and exact match under photo-like corruptions of the images."""

import collections
import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel
from transformers.image_utils import ImageInput

from .io_palme import DEFAULT_MAX_IMAGE_PIXELS, one_line, read_image_file
from .processing_palme import PalmEProcessor
from .synthetic_shapes import (
    add_gaussian_noise,
    jpeg_compress,
    resize_by,
    scale_brightness,
    with_transparent_background,
)

# How the robustness of a captioner is scored: name -> (image, rng) -> the image as a photo of it might be.
ROBUSTNESS_CONDITIONS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "clean": lambda image, rng: image,
    "JPEG q90": lambda image, rng: jpeg_compress(image, 90),
    "JPEG q75": lambda image, rng: jpeg_compress(image, 75),
    "JPEG q50": lambda image, rng: jpeg_compress(image, 50),
    "noise sigma=1/255": lambda image, rng: add_gaussian_noise(image, 1 / 255, rng),
    "noise sigma=5/255": lambda image, rng: add_gaussian_noise(image, 5 / 255, rng),
    "noise sigma=10/255": lambda image, rng: add_gaussian_noise(image, 10 / 255, rng),
    "resize 0.75x": lambda image, rng: resize_by(image, 0.75),
    "resize 1.5x": lambda image, rng: resize_by(image, 1.5),
    "RGBA (transparent background)": lambda image, rng: with_transparent_background(image),
    "brightness x0.9": lambda image, rng: scale_brightness(image, 0.9),
}


class ImageCaptionFolder(torch.utils.data.Dataset):
    """
    Captioned images in a folder, laid out as Hugging Face's `imagefolder`: the image files (in subfolders or not) and
    `metadata.jsonl`, one JSON object a line, `{"file_name": "cat.png", "text": "a cat on a mat"}` (`file_name`
    relative to the folder). Items are `{"image": PIL.Image, "caption": str}`, what [`CaptioningCollator`] batches.

    A missing or malformed `metadata.jsonl` (not UTF-8, not JSON, not such objects), or an entry whose image file is
    missing, or lies outside the folder (an absolute `file_name`, `..`, a link that leads out: a folder from someone
    else must not make a training run read other files of the disk), is a `ValueError` naming the line. Images of
    more than `max_image_pixels` pixels are refused when read; [`check_images`] reads every image up front.
    """

    METADATA_FILE = "metadata.jsonl"

    def __init__(self, folder: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        metadata = os.path.join(folder, self.METADATA_FILE)
        if not os.path.isfile(metadata):
            raise ValueError(
                f"{folder} has no {self.METADATA_FILE}: a captioned image folder holds the images and a "
                f'{self.METADATA_FILE} of one {{"file_name": ..., "text": ...}} object a line.'
            )
        self.folder = folder
        self.max_image_pixels = max_image_pixels
        resolved_folder = os.path.realpath(folder)
        self.files, self.captions = [], []
        with open(metadata, "rb") as handle:
            lines = handle.read().splitlines()
        for number, raw_line in enumerate(lines, start=1):
            where = f"{metadata}, line {number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{where}: not UTF-8 text (byte {raw_line[error.start]:#04x} at column {error.start + 1})."
                ) from error
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error}).") from error
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(key), str) for key in ("file_name", "text")
            ):
                raise ValueError(f'{where}: expected {{"file_name": str, "text": str}}, got {line.strip()[:200]}')
            file_name = entry["file_name"]
            if os.path.isabs(file_name):
                raise ValueError(
                    f"{where}: file_name {file_name!r} is an absolute path; give it relative to {folder}."
                )
            path = os.path.join(folder, file_name)
            if os.path.commonpath([os.path.realpath(path), resolved_folder]) != resolved_folder:
                raise ValueError(f"{where}: file_name {file_name!r} leads outside {folder}; the images must be in it.")
            if not os.path.isfile(path):
                raise ValueError(f"{where}: there is no image file {path}.")
            self.files.append(path)
            self.captions.append(entry["text"])
        if not self.files:
            raise ValueError(f"{metadata} lists no images.")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        try:
            image = read_image_file(self.files[index], self.max_image_pixels)
        except ValueError as error:
            raise ValueError(f"{self.files[index]}: {error}") from error
        return {"image": image, "caption": self.captions[index]}

    def check_images(self, image_processor):
        """
        Reads every image and runs `image_processor` on it, so that a file that cannot be used is found before
        training rather than in the middle of it: a `ValueError` naming each such file and why (empty, not an image,
        more than `max_image_pixels` pixels, values the image processor refuses).
        """
        problems = []
        for path in self.files:
            try:
                image_processor(read_image_file(path, self.max_image_pixels))
            except ValueError as error:
                problems.append(f"{path}: {one_line(error)}")
        if problems:
            count = f"{len(problems)} of the {len(self.files)} images of {self.folder}"
            raise ValueError(f"{count} cannot be used: {'; '.join(problems)}.")


def check_vocabulary(tokenizer, captions: Sequence[str]):
    """Raises a `ValueError` naming the words of `captions` that `tokenizer` encodes as its unknown token (a
    word-level tokenizer knows only its words), which a captioner could never learn to write."""
    if tokenizer.unk_token_id is None:
        return
    unknown = sorted(
        {
            word
            for caption in captions
            for word in caption.split()
            if tokenizer.unk_token_id in tokenizer.encode(word, add_special_tokens=False)
        }
    )
    if unknown:
        shown = ", ".join(repr(word) for word in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
        raise ValueError(
            f"The captions hold {len(unknown)} words the tokenizer does not know ({shown}); they would be "
            f"{tokenizer.unk_token!r}. Add them to the tokenizer (`tokenizer.add_tokens`, then "
            "`model.resize_token_embeddings(len(tokenizer))`) or change the captions."
        )


class CaptioningCollator:
    """
    Batches `{"image": PIL.Image, "caption": str}` items for captioning with the language-model loss: `pixel_values`
    from the processor's image processor, `input_ids` = the processor's encoding of the prompt and the caption (which
    starts with `<bos>`) and `eos_token_id`, right-padded with `pad_token_id`, `attention_mask`, and `labels` =
    `input_ids` with -100 on the padding and on the prompt. The prompt is the one [`generate_captions`] gives: with
    `"prefix"` integration the image marker, which the processor expands into the image placeholders (so the caption
    follows `<bos>` and the placeholders), with cross-attention nothing (the caption follows `<bos>`).

    With `word_dropout`, each caption token of `input_ids` (not of `labels`) is replaced by `unk_token_id` with that
    probability. A decoder that cannot count on the words before a word has to read it off the image: without it, a
    captioner learns that "small yellow" is never followed by "triangle" when training never shows one, and names a
    small yellow triangle a circle.

    Args:
        processor ([`PalmEProcessor`]): its tokenizer encodes captions, prepending its `bos_token`, and has
            `eos_token_id`, `pad_token_id` and `unk_token_id`.
        word_dropout (`float`, defaults to 0.0): probability of hiding each caption token from the decoder's input.
    """

    def __init__(self, processor: PalmEProcessor, word_dropout: float = 0.0):
        if not 0.0 <= word_dropout < 1.0:
            raise ValueError(f"`word_dropout` must be in [0, 1), got {word_dropout}.")
        self.processor = processor
        self.word_dropout = word_dropout

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        prompt = self.processor.image_token
        texts = [item["caption"] if prompt is None else f"{prompt} {item['caption']}" for item in items]
        encoded = self.processor(images=[item["image"] for item in items], text=texts, return_tensors=None)
        pixel_values = torch.from_numpy(np.stack(encoded["pixel_values"]))
        sequences = [ids + [tokenizer.eos_token_id] for ids in encoded["input_ids"]]
        length = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(items), length), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, 0] = -100  # the prompt is given, never predicted: <bos>, and the image placeholders
        if self.processor.image_token_id is not None:
            labels = labels.masked_fill(input_ids == self.processor.image_token_id, -100)
        if self.word_dropout:
            hidden = (torch.rand(input_ids.shape) < self.word_dropout) & (labels != -100)
            input_ids = input_ids.masked_fill(hidden, tokenizer.unk_token_id)
        return {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }


@torch.no_grad()
def generate_captions(
    model: PreTrainedModel,
    processor: PalmEProcessor,
    images: Sequence[ImageInput],
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> list[str]:
    """
    Greedy captions of `images` (anything the processor takes: PIL images, arrays, tensors, file paths) by a PalmE
    captioner, `batch_size` at a time, stripped of surrounding whitespace. The prompt is the image marker with
    `"prefix"` integration, else the empty text (its tokenizer's `<bos>`).
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
    prompt = processor.image_token or ""
    model.eval()
    captions = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        inputs = processor(images=batch, text=[prompt] * len(batch), return_tensors="pt").to(model.device)
        captions.extend(generate_greedy_texts(model, processor, inputs, max_new_tokens))
    return captions


def generate_greedy_texts(model: PreTrainedModel, processor: PalmEProcessor, inputs, max_new_tokens: int) -> list[str]:
    """The greedy continuations of the processor's batch `inputs`, decoded without their prompts and stripped of
    surrounding whitespace."""
    generated = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.post_process_image_text_to_text(new_tokens)]


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference, word for word (whitespace is not significant)."""
    _check_pairs(references, hypotheses)
    return sum(ref.split() == hyp.split() for ref, hyp in zip(references, hypotheses)) / len(references)


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str], max_order: int = 4) -> float:
    """
    Corpus BLEU (Papineni et al., 2002) of whitespace-tokenised hypotheses against one reference each: the geometric
    mean of the clipped n-gram precisions for n = 1..`max_order`, pooled over the corpus, times the brevity penalty
    `exp(1 - reference_length / hypothesis_length)` when the hypotheses are shorter. No smoothing: 0.0 when some
    order has no match. Between 0 and 1.
    """
    _check_pairs(references, hypotheses)
    matches = [0] * max_order
    totals = [0] * max_order
    reference_length = hypothesis_length = 0
    for reference, hypothesis in zip(references, hypotheses):
        reference_words, hypothesis_words = reference.split(), hypothesis.split()
        reference_length += len(reference_words)
        hypothesis_length += len(hypothesis_words)
        for order in range(1, max_order + 1):
            reference_counts = _ngram_counts(reference_words, order)
            hypothesis_counts = _ngram_counts(hypothesis_words, order)
            matches[order - 1] += sum((hypothesis_counts & reference_counts).values())
            totals[order - 1] += sum(hypothesis_counts.values())
    if hypothesis_length == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(match / total) for match, total in zip(matches, totals)) / max_order
    brevity_penalty = min(0.0, 1.0 - reference_length / hypothesis_length)
    return math.exp(log_precision + brevity_penalty)


def robustness_exact_match(
    model: PreTrainedModel,
    processor: PalmEProcessor,
    items: Sequence[dict],
    conditions: Mapping[str, Callable[[Image.Image, random.Random], Image.Image]] = ROBUSTNESS_CONDITIONS,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> dict[str, float]:
    """
    Exact match of the greedy captions (of at most `max_new_tokens` tokens) of `items` (`{"image": PIL.Image,
    "caption": str}`) with every image changed by each of `conditions` (name -> function of the image and a
    `random.Random`, seeded from `seed`, the condition and the item's index, so that a run is reproducible), in the
    order of `conditions`.
    """
    if not items:
        raise ValueError("`items` must hold at least one image to caption, got none.")
    references = [item["caption"] for item in items]
    results = {}
    for name, corrupt in conditions.items():
        images = [corrupt(item["image"], random.Random(f"{seed}/{name}/{index}")) for index, item in enumerate(items)]
        captions = generate_captions(model, processor, images, batch_size=batch_size, max_new_tokens=max_new_tokens)
        results[name] = exact_match(references, captions)
    return results


def robustness_table(results: Mapping[str, float]) -> str:
    """The results of [`robustness_exact_match`] as a Markdown table of condition and exact match."""
    rows = [f"| {name} | {value:.3f} |" for name, value in results.items()]
    return "\n".join(["| condition | exact match |", "| --- | --- |", *rows])


def _ngram_counts(words: list[str], order: int) -> collections.Counter:
    return collections.Counter(tuple(words[start : start + order]) for start in range(len(words) - order + 1))


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]):
    if len(references) != len(hypotheses) or not references:
        raise ValueError(
            f"Expected one hypothesis per reference and at least one pair; got {len(references)} references and "
            f"{len(hypotheses)} hypotheses."
        )


__all__ = [
    "CaptioningCollator",
    "ROBUSTNESS_CONDITIONS",
    "check_vocabulary",
    "corpus_bleu",
    "exact_match",
    "generate_captions",
    "ImageCaptionFolder",
    "robustness_exact_match",
    "robustness_table",
]
