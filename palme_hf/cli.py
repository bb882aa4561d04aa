"""`palme-hf`: the command line of palme_hf.

    palme-hf caption [--model DIR] [--max-new-tokens N] [--batch-size N] [--json] IMAGE [IMAGE ...]

captions the image files with a saved PalmE captioner (model, tokenizer and processor in one folder, as
`examples/train_captioner.py` writes them; by default the captioner shipped with palme_hf, `palme_hf/captioner`) and
prints `path<TAB>caption` for each image that could be read, in the order given. With `--json` it prints one JSON list
instead, an object `{"path": ..., "caption": ..., "error": ...}` per image (`caption` or `error` null). A file that is
missing or is not an image gets one line `palme-hf: error: PATH: reason` on stderr, and the other images are still
captioned. Exit status: 0 when every image was captioned, 1 when one was not or the captioner could not be loaded,
2 for invalid arguments.
"""

import argparse
import json
import os
import sys
import warnings

import torch
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging

from .captioning import generate_captions

# The captioner committed in the repository, shipped with the package (package data), so that it is there wherever
# palme_hf is installed.
DEFAULT_CAPTIONER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "captioner")


def positive_int(value: str) -> int:
    """An argparse type: a positive integer."""
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return int(value)


def load_captioner(model_path: str):
    """The processor and model saved in `model_path`; a `ValueError` that says why not."""
    if not os.path.isdir(model_path):
        raise ValueError(f"No captioner at {model_path!r}: give the folder a PalmE captioner was saved to.")
    try:
        processor = AutoProcessor.from_pretrained(model_path)
        model = AutoModelForImageTextToText.from_pretrained(model_path)
    except (OSError, ValueError, SafetensorError) as error:
        raise ValueError(f"No captioner at {model_path!r}: {error}") from error
    return processor, model


def read_image(image_processor, path: str) -> torch.Tensor:
    """The `(3, height, width)` pixel values of the image file `path`; a `ValueError` that says what is wrong."""
    if os.path.isdir(path):
        raise ValueError("is a directory, not an image file")
    if not os.path.exists(path):
        raise ValueError("no such file")
    return image_processor(path, return_tensors="pt")["pixel_values"][0]


def caption_files(model, processor, paths: list[str], max_new_tokens: int = 32, batch_size: int = 16) -> list[dict]:
    """
    `{"path", "caption", "error"}` for each of `paths`: the greedy caption of each image that can be read, the reason
    for each that cannot. Warnings about an image (a float image clipped to [0, 1]) go to stderr, naming it.
    """
    results, images = [], []
    for path in paths:
        result = {"path": path, "caption": None, "error": None}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                images.append(read_image(processor.image_processor, path))
            except ValueError as error:
                result["error"] = _one_line(error)
        for warning in caught:
            print(f"palme-hf: warning: {path}: {_one_line(warning.message)}", file=sys.stderr)
        results.append(result)
    captions = iter(generate_captions(model, processor, images, batch_size=batch_size, max_new_tokens=max_new_tokens))
    for result in results:
        if result["error"] is None:
            result["caption"] = next(captions)
    return results


def _one_line(message) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="palme-hf", description="PaLM-E style models as Transformers models.")
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser(
        "caption",
        help="caption image files: prints path<TAB>caption per image",
        description="Captions image files; one line `palme-hf: error: PATH: reason` on stderr per file that is not "
        "an image, exit status 1 if there is one.",
    )
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF, ...)")
    caption.add_argument(
        "--model", default=DEFAULT_CAPTIONER, help="folder of a saved captioner (default: %(default)s)"
    )
    caption.add_argument("--max-new-tokens", type=positive_int, default=32, help="longest caption, in tokens")
    caption.add_argument("--batch-size", type=positive_int, default=16, help="images captioned together")
    caption.add_argument(
        "--json", action="store_true", help='print a JSON list of {"path", "caption", "error"}, one per image'
    )
    args = parser.parse_args(argv)

    logging.disable_progress_bar()  # stdout is the captions; keep stderr for errors
    try:
        processor, model = load_captioner(args.model)
    except ValueError as error:
        print(f"palme-hf: error: {_one_line(error)}", file=sys.stderr)
        return 1
    results = caption_files(model, processor, args.images, args.max_new_tokens, args.batch_size)
    for result in results:
        if result["error"] is not None:
            print(f"palme-hf: error: {result['path']}: {result['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if result["error"] is None:
                print(f"{result['path']}\t{result['caption']}")
    return 1 if any(result["error"] is not None for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
