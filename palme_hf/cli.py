"""`palme-hf`: the command line of palme_hf.

    palme-hf caption [--model DIR] [--max-new-tokens N] [--batch-size N] [--max-image-pixels N] [--json]
        IMAGE [IMAGE ...]

captions the image files with a saved PalmE captioner (model, tokenizer and processor in one folder, as
`examples/train_captioner.py` or `examples/train_from_towers.py` write them; by default the captioner shipped with
palme_hf, `palme_hf/captioner`) and prints `path<TAB>caption` for each image that could be read, in the order given; a
path or caption holding a tab or a line break is printed as a JSON string (in double quotes, escaped), so that each
image keeps one line. With `--json` it prints one JSON list instead, an object `{"path": ..., "caption": ...,
"error": ...}` per image (`caption` or `error` null). A file that is missing, is not an image, or has more than
`--max-image-pixels` pixels gets one line `palme-hf: error: PATH: reason` on stderr, and the other images are still
captioned. Exit status: 0 when every image was captioned, 1 when one was not or the captioner could not be loaded,
2 for invalid arguments, 141 when the reader of the output went away (`palme-hf caption *.png | head -1`), as for
Unix tools.
"""

import argparse
import json
import os
import sys
import warnings

import PIL.Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging

from .captioning import generate_captions
from .io_palme import DEFAULT_MAX_IMAGE_PIXELS, load_saved_model, load_saved_processor, one_line, read_image_file

# The captioners committed in the repository, shipped with the package (package data), so that they are there
# wherever palme_hf is installed: the default one (cross-attention), and the PaLM-E paper's layout (PaLM's parallel
# block, the image as prefix tokens), which `make serve` serves with vLLM.
DEFAULT_CAPTIONER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "captioner")
PAPER_CAPTIONER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "palme_paper")


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
        model = load_saved_model(AutoModelForImageTextToText, model_path)
        processor = load_saved_processor(AutoProcessor, model_path)
    except ValueError as error:
        raise ValueError(f"No captioner at {model_path!r}: {error}") from error
    return processor, model


def read_image(image_processor, path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """
    The image in the file `path`, once `image_processor` has taken it; a `ValueError` that says what is wrong (see
    [`~palme_hf.io_palme.read_image_file`], and the image processor's reasons, such as values out of range).
    """
    image = read_image_file(path, max_pixels)
    image_processor(image)
    return image


def caption_files(
    model,
    processor,
    paths: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[dict]:
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
                images.append(read_image(processor.image_processor, path, max_pixels))
            except ValueError as error:
                result["error"] = one_line(error)
        for warning in caught:
            print(f"palme-hf: warning: {path}: {one_line(warning.message)}", file=sys.stderr)
        results.append(result)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # given above, with the image's path
        captions = generate_captions(model, processor, images, batch_size=batch_size, max_new_tokens=max_new_tokens)
    captions = iter(captions)
    for result in results:
        if result["error"] is None:
            result["caption"] = next(captions)
    return results


def text_field(value: str) -> str:
    """`value` as it is, or as a JSON string when it holds what would break the `path<TAB>caption` line (a tab or a
    line break) or starts with a double quote (so that a quoted field always means an escaped one)."""
    if any(character in value for character in "\t\n\r") or value.startswith('"'):
        return json.dumps(value)
    return value


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
        "--model",
        default=DEFAULT_CAPTIONER,
        help=f"folder of a saved captioner (default: %(default)s; the PaLM-E paper's layout: {PAPER_CAPTIONER})",
    )
    caption.add_argument("--max-new-tokens", type=positive_int, default=32, help="longest caption, in tokens")
    caption.add_argument("--batch-size", type=positive_int, default=16, help="images captioned together")
    caption.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="refuse larger images, before decoding them (default: %(default)s)",
    )
    caption.add_argument(
        "--json", action="store_true", help='print a JSON list of {"path", "caption", "error"}, one per image'
    )
    args = parser.parse_args(argv)

    logging.disable_progress_bar()  # stdout is the captions; keep stderr for errors
    try:
        processor, model = load_captioner(args.model)
    except ValueError as error:
        print(f"palme-hf: error: {one_line(error)}", file=sys.stderr)
        return 1
    results = caption_files(model, processor, args.images, args.max_new_tokens, args.batch_size, args.max_image_pixels)
    for result in results:
        if result["error"] is not None:
            print(f"palme-hf: error: {result['path']}: {result['error']}", file=sys.stderr)
    try:
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for result in results:
                if result["error"] is None:
                    print(f"{text_field(result['path'])}\t{text_field(result['caption'])}")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, as Unix tools do. Python would flush stdout again at exit,
        # and fail again, so stdout now goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 1 if any(result["error"] is not None for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
