"""
The closed loop of PaLM-E at toy scale: an embodied model (a folder as `examples/train_embodied.py` saves it) is asked
for the next step toward a held-out goal from the current observation of the scene (`"Q: What is the next step to put
the red circle right of the blue square? A:"` after its image, state or object vectors); the scripted policy executes
the step (`palme_hf.embodied_world.execute`); the scene changes, its new observation goes into the next sentence, and
so on until the goal holds or `--max-steps` steps were taken. A step the policy refuses (off the grid, into a taken
cell) leaves the scene as it was and the next sentence names it (`move obj_2 right failed Q: ...`): the model plans
again, told what failed. With `--no-replan` a refused step ends the episode.
Prints the success rate over `--episodes` held-out scenes and goals, and saves one episode as a strip of images with
the step under each (`--strip`: the longest successful episode, else the first).

    python examples/embodied_loop.py --model embodied-image-state --strip docs/images/embodied_loop.png --overwrite

The episodes start from the scenes and goals of the `"plan"` examples of the `"held_out"` split of `--seed`: scenes
(sets of objects) and goals that training never showed. `--strip` and `--output` are checked before the loop: an
existing file is refused unless `--overwrite`.
"""

import argparse
import json
import time

from palme_hf.cli import positive_int
from palme_hf.embodied_tasks import load_embodied_model, model_next_step, run_episode, save_episode_strip
from palme_hf.embodied_world import EmbodiedTaskDataset, oracle_plan
from palme_hf.io_palme import check_output_file, exit_with_error, write_text_file


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model folder (model, processor and eval_results.json)")
    parser.add_argument("--episodes", type=positive_int, default=100, help="held-out scenes and goals to reach")
    parser.add_argument("--max-steps", type=positive_int, default=12, help="the step budget of an episode")
    parser.add_argument(
        "--no-replan", action="store_true", help="end an episode at a step the policy refuses, instead of asking again"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out scenes and goals")
    parser.add_argument("--strip", default=None, help="save one episode as a PNG strip here")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --strip or --output file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        for path in (args.strip, args.output):
            if path is not None:
                check_output_file(path, args.overwrite)  # before the loop, which takes long
        model, processor, inputs = load_embodied_model(args.model)
    except (ValueError, OSError) as error:
        exit_with_error(error)
    start = time.monotonic()
    goals = EmbodiedTaskDataset(args.episodes, "held_out", seed=args.seed, tasks=("plan",))
    next_step = model_next_step(model, processor, inputs)
    episodes, oracle_steps = [], []
    for index in range(len(goals)):
        example = goals[index]
        episodes.append(run_episode(next_step, example.scene, example.goal, args.max_steps, replan=not args.no_replan))
        oracle_steps.append(len(oracle_plan(example.scene, example.goal)))
    successes = [episode.success for episode in episodes]
    report = {
        "model": args.model,
        "inputs": "+".join(inputs),
        "seed": args.seed,
        "episodes": len(episodes),
        "max_steps": args.max_steps,
        "replan": not args.no_replan,
        "success_rate": sum(successes) / len(episodes),
        "refused_steps": sum(sum(episode.refused) for episode in episodes),
        # episodes that reached the goal after the policy refused one of their steps
        "successes_after_refusal": sum(episode.success and any(episode.refused) for episode in episodes),
        # steps of the successful episodes beyond the oracle's shortest plans
        "extra_steps": sum(
            len(episode.steps) - shortest for episode, shortest in zip(episodes, oracle_steps) if episode.success
        ),
        "seconds": time.monotonic() - start,
    }
    print(json.dumps(report, indent=2))
    if args.strip is not None:
        successful = [episode for episode in episodes if episode.success]
        shown = max(successful, key=lambda episode: len(episode.steps)) if successful else episodes[0]
        save_episode_strip(shown, args.strip)
    if args.output is not None:
        write_text_file(args.output, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
