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

    palme-hf plan [--model DIR] [--max-steps N] [--no-replan] [--strip PNG] [--overwrite] [--json] SCENE GOAL

runs PaLM-E's closed loop in the toy embodied world (`palme_hf.embodied_world`) with a saved embodied model (as
`examples/train_embodied.py` writes it; by default the one shipped with palme_hf, `palme_hf/embodied`): SCENE is a JSON
file of the scene's objects, `obj_1` first (`[{"shape": "circle", "colour": "red", "size": "small", "column": 0,
"row": 1}, ...]`), GOAL the goal in words (`"put the red circle right of the blue square"`). The model is asked for the
next step from the scene's observations, the scripted policy executes it, and the loop asks again from the new scene
until the goal holds or `--max-steps` steps were taken. A step the policy refuses (off the grid, into a taken cell)
leaves the scene as it was, and the next question names it (`move obj_1 right failed Q: ...`); with `--no-replan` it
ends the episode. Prints each step taken (`1. move obj_1 right`, `- refused` after a refused one), then `goal holds`
or `goal not reached` and why; `--json` prints one object `{"goal", "steps", "refused", "success"}` instead, `--strip`
saves the episode as a PNG strip (an existing file is refused unless `--overwrite`). Exit status: 0 when the goal
holds, 1 when it was not reached or the scene, goal or model could not be read, 2 for invalid arguments.
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
from .embodied_tasks import Episode, load_embodied_model, model_next_step, run_episode, save_episode_strip
from .embodied_world import goal_holds, parse_goal, scene_from_json
from .io_palme import (
    DEFAULT_MAX_IMAGE_PIXELS,
    check_output_file,
    load_saved_model,
    load_saved_processor,
    one_line,
    read_image_file,
    read_json_file,
)

# The captioners committed in the repository, shipped with the package (package data), so that they are there
# wherever palme_hf is installed: the default one (cross-attention), and the PaLM-E paper's layout (PaLM's parallel
# block, the image as prefix tokens), which `make serve` serves with vLLM.
DEFAULT_CAPTIONER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "captioner")
PAPER_CAPTIONER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "palme_paper")
# The embodied model shipped with the package: it plans in the toy embodied world from the image and the state vector.
EMBODIED_PLANNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embodied")


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


def print_lines(lines: list[str]) -> int:
    """Prints `lines` to stdout; 0, or 141 when the reader of the output went away (`| head -1`), as for Unix tools."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would flush stdout again at exit, and fail again, so stdout now goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


def run_caption(args: argparse.Namespace) -> int:
    """`palme-hf caption`: see the module."""
    try:
        processor, model = load_captioner(args.model)
    except ValueError as error:
        print(f"palme-hf: error: {one_line(error)}", file=sys.stderr)
        return 1
    results = caption_files(model, processor, args.images, args.max_new_tokens, args.batch_size, args.max_image_pixels)
    for result in results:
        if result["error"] is not None:
            print(f"palme-hf: error: {result['path']}: {result['error']}", file=sys.stderr)
    if args.json:
        lines = [json.dumps(results, indent=2)]
    else:
        lines = [
            f"{text_field(result['path'])}\t{text_field(result['caption'])}"
            for result in results
            if result["error"] is None
        ]
    status = print_lines(lines)
    return status or (1 if any(result["error"] is not None for result in results) else 0)


def episode_lines(episode: Episode, replan: bool) -> list[str]:
    """The steps of a closed-loop episode, numbered (`- refused` after a step the policy refused), then whether the
    goal holds and, if not, why."""
    lines = [
        f"{number}. {step}" + (" - refused" if refused else "")
        for number, (step, refused) in enumerate(zip(episode.steps, episode.refused), start=1)
    ]
    if episode.success:
        lines.append("goal holds")
    elif episode.refused and episode.refused[-1] and not replan:
        lines.append(f"goal not reached: step {len(episode.steps)} was refused (--no-replan)")
    else:
        lines.append(f"goal not reached within the budget of {len(episode.steps)} steps")
    return lines


def read_scene(path: str):
    """The [`~palme_hf.embodied_world.Scene`] in the JSON file `path`; a `ValueError` naming the file says why not."""
    if not os.path.isfile(path):
        raise ValueError(f"No scene at {path!r}: give a JSON file of the scene's objects.")
    try:
        return scene_from_json(read_json_file(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def run_plan(args: argparse.Namespace) -> int:
    """`palme-hf plan`: see the module."""
    try:
        if args.strip is not None:
            check_output_file(args.strip, args.overwrite)
        scene = read_scene(args.scene)
        goal = parse_goal(args.goal)
        goal_holds(scene, goal)  # a goal naming an object the scene does not have is refused here
        model, processor, inputs = load_embodied_model(args.model)
    except ValueError as error:
        print(f"palme-hf: error: {one_line(error)}", file=sys.stderr)
        return 1
    next_step = model_next_step(model, processor, inputs)
    episode = run_episode(next_step, scene, goal, args.max_steps, replan=not args.no_replan)
    if args.strip is not None:
        save_episode_strip(episode, args.strip)
    if args.json:
        result = {
            "goal": goal.text,
            "steps": list(episode.steps),
            "refused": list(episode.refused),
            "success": episode.success,
        }
        lines = [json.dumps(result, indent=2)]
    else:
        lines = episode_lines(episode, replan=not args.no_replan)
    return print_lines(lines) or (0 if episode.success else 1)


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
    plan = commands.add_parser(
        "plan",
        help="plan toward a goal in the toy embodied world, step by step, in a closed loop",
        description="Asks an embodied model for the next step toward GOAL from the scene's observations, executes it "
        "with the scripted policy, and asks again from the new scene (naming a step the policy refused), until the "
        "goal holds: prints the steps taken, then whether the goal holds (exit status 0) or not (1).",
    )
    plan.add_argument("scene", metavar="SCENE", help="JSON file of the scene: a list of objects, obj_1 first")
    plan.add_argument("goal", metavar="GOAL", help='the goal, e.g. "put the red circle right of the blue square"')
    plan.add_argument(
        "--model", default=EMBODIED_PLANNER, help="folder of a saved embodied model (default: %(default)s)"
    )
    plan.add_argument("--max-steps", type=positive_int, default=12, help="the step budget (default: %(default)s)")
    plan.add_argument(
        "--no-replan",
        action="store_true",
        help="end the episode at a step the policy refuses, instead of asking again with the refused step named",
    )
    plan.add_argument("--strip", default=None, help="save the episode as a PNG strip of its scenes here")
    plan.add_argument("--overwrite", action="store_true", help="replace an existing --strip file")
    plan.add_argument(
        "--json", action="store_true", help='print one JSON object {"goal", "steps", "refused", "success"}'
    )
    args = parser.parse_args(argv)

    logging.disable_progress_bar()  # stdout is the answers; keep stderr for errors
    return run_caption(args) if args.command == "caption" else run_plan(args)


if __name__ == "__main__":
    sys.exit(main())
