"""
Scores an embodied model (a folder as `examples/train_embodied.py` saves it) on held-out scenes and goals of the
embodied world by greedy `generate()`, from the observations it was trained on, and prints the table: question
accuracy (relation, size and referral questions), plan success (the scripted policy executes the generated plan; the
goal must then hold) and next-step accuracy (the step must be the first of a shortest plan).

    python examples/evaluate_embodied.py --model embodied-image-state
    python examples/evaluate_embodied.py --model embodied-image-state --num-samples 1000 --output results.json

The examples are the `"held_out"` split of `--seed` (0 by default, as `train_embodied.py` scores its model, so that the
defaults reproduce the table of its model card with `--num-samples 500`), every task of `--tasks` in turn (by default
all of them; the tasks a model was trained on reproduce its card). `--output` is checked
before the evaluation: an existing file is refused unless `--overwrite`.
"""

import argparse
import json
import time

import torch

from palme_hf.cli import positive_int
from palme_hf.embodied_tasks import evaluate_embodied, load_embodied_model, model_answerer, scores_table
from palme_hf.embodied_world import TASKS, EmbodiedTaskDataset
from palme_hf.io_palme import check_output_file, exit_with_error, write_text_file


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model folder (model, processor and eval_results.json)")
    parser.add_argument("--num-samples", type=positive_int, default=500, help="held-out examples, every task in turn")
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="the tasks scored (default: all of them)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out examples")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="examples answered at a time")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        if args.output is not None:
            check_output_file(args.output, args.overwrite)  # before the evaluation, which takes long
        held_out = EmbodiedTaskDataset(args.num_samples, "held_out", seed=args.seed, tasks=tuple(args.tasks))
        model, processor, inputs = load_embodied_model(args.model)
    except (ValueError, OSError) as error:
        exit_with_error(error)
    start = time.monotonic()
    examples = [held_out[index] for index in range(len(held_out))]
    scores = evaluate_embodied(model_answerer(model, processor, inputs, args.batch_size), examples)
    report = {"model": args.model, "inputs": "+".join(inputs), "seed": args.seed, **scores}
    print(
        f"{args.model}, from the {' and '.join(inputs)}: greedy answers to {len(examples)} held-out examples (seed "
        f"{args.seed}), {torch.get_num_threads()} thread(s), {time.monotonic() - start:.0f} s:\n"
    )
    print(scores_table(scores))
    if args.output is not None:
        write_text_file(args.output, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
