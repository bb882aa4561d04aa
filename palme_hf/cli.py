"""`palme-hf`: the command line of palme_hf.

    palme-hf caption [--model DIR] [--max-new-tokens N] [--batch-size N] IMAGE [IMAGE ...]

prints `path<TAB>caption` for each image, captioned by a saved PalmE captioner (model, tokenizer and processor in
one folder, as `examples/train_captioner.py` writes them; by default the captioner committed in this repository).
"""

import argparse
import os
import sys

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging

DEFAULT_CAPTIONER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "captioner")


@torch.inference_mode()
def caption_images(
    model_path: str, images: list[str], max_new_tokens: int = 32, batch_size: int = 16
) -> list[str]:
    """Greedy captions of the image files `images` by the captioner saved in `model_path`."""
    if not os.path.isdir(model_path):
        raise ValueError(f"No captioner at {model_path!r}: give the folder a PalmE captioner was saved to.")
    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    # the captioner's prompt: the image marker with "prefix" integration, else nothing (the tokenizer adds <bos>)
    prompt = processor.image_token if processor.image_token is not None else ""
    captions = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        inputs = processor(images=batch, text=[prompt] * len(batch)).to(model.device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        captions.extend(text.strip() for text in processor.post_process_image_text_to_text(new_tokens))
    return captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="palme-hf", description="PaLM-E style models as Transformers models.")
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser("caption", help="caption images: prints path<TAB>caption per image")
    caption.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    caption.add_argument("--model", default=DEFAULT_CAPTIONER, help="folder of a saved captioner (default: %(default)s)")
    caption.add_argument("--max-new-tokens", type=int, default=32)
    caption.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    logging.disable_progress_bar()  # stdout is the captions; keep stderr for errors
    try:
        captions = caption_images(args.model, args.images, args.max_new_tokens, args.batch_size)
    except (ValueError, OSError) as error:
        print(f"palme-hf: error: {error}", file=sys.stderr)
        return 1
    for path, text in zip(args.images, captions):
        print(f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
