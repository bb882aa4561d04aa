"""
Scores a shapes captioner (a folder as `examples/train_captioner.py` saves it) on fresh held-out renders, clean and
changed as photos of them would be: JPEG at quality 90, 75 and 50, Gaussian noise of sigma 1, 5 and 10 (of 255),
resized by 0.75 and 1.5, RGBA with a transparent background, brightness x0.9 (`palme_hf.captioning
.ROBUSTNESS_CONDITIONS`). Prints the greedy exact match under each as a Markdown table.

    python examples/evaluate_captioner.py --model palme_hf/captioner
    python examples/evaluate_captioner.py --model palme_hf/captioner --num-samples 1000 --output results.json

`--output` is checked before the evaluation: an existing file is refused unless `--overwrite`, and a path that cannot
be written is refused (a missing parent folder is made).

The images are the `"held_out"` split of `--seed` (1 by default; `train_captioner.py` trains on the `"train"` split
of its `--seed`, 0 by default, and scores robustness on the held-out split of its seed + 1, so the defaults here
reproduce the table in the model card of a captioner trained with the default seed). No held-out image ever
appears in training: each holds a (size, colour, shape) combination the training split never shows.
"""

import argparse
import json
import time

import torch

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import ROBUSTNESS_CONDITIONS, robustness_exact_match, robustness_table
from palme_hf.io_palme import (
    check_output_file,
    exit_with_error,
    load_saved_model,
    load_saved_processor,
    write_text_file,
)
from palme_hf.synthetic_shapes import MAX_CAPTION_TOKENS, SyntheticShapesDataset


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the captioner folder (model and processor)")
    parser.add_argument("--num-samples", type=int, default=200, help="held-out images captioned under each condition")
    parser.add_argument("--seed", type=int, default=1, help="seed of the held-out renders")
    parser.add_argument("--batch-size", type=int, default=64, help="images captioned at a time")
    parser.add_argument(
        "--conditions",
        nargs="+",
        choices=list(ROBUSTNESS_CONDITIONS),
        default=list(ROBUSTNESS_CONDITIONS),
        metavar="CONDITION",
        help=f"conditions to score, of: {', '.join(repr(name) for name in ROBUSTNESS_CONDITIONS)} (all by default)",
    )
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples must be a positive integer, got {args.num_samples}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be a positive integer, got {args.batch_size}")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """The exact match of `args.model` under each of `args.conditions`, with what was measured."""
    model = load_saved_model(PalmEForConditionalGeneration, args.model)
    processor = load_saved_processor(PalmEProcessor, args.model)
    image_size = model.config.vision_config.image_size
    dataset = SyntheticShapesDataset(args.num_samples, "held_out", seed=args.seed, image_size=image_size)
    conditions = {name: ROBUSTNESS_CONDITIONS[name] for name in args.conditions}
    start = time.monotonic()
    items = [dataset[i] for i in range(len(dataset))]
    results = robustness_exact_match(
        model, processor, items, conditions, batch_size=args.batch_size, max_new_tokens=MAX_CAPTION_TOKENS
    )
    return {
        "model": args.model,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "robustness": results,
        "seconds": time.monotonic() - start,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        if args.output is not None:
            check_output_file(args.output, args.overwrite)  # before the evaluation, which takes long
        report = evaluate(args)
    except (ValueError, OSError) as error:
        exit_with_error(error)
    print(
        f"Greedy exact match of {args.model} on {report['num_samples']} held-out images (seed {report['seed']}), "
        f"{torch.get_num_threads()} thread(s), {report['seconds']:.0f} s:\n"
    )
    print(robustness_table(report["robustness"]))
    if args.output is not None:
        write_text_file(args.output, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
