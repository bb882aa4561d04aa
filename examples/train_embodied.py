"""
Trains a small PalmE on the embodied world's tasks (`palme_hf.embodied_world.EmbodiedTaskDataset`: geometry
questions, plans toward a goal, next steps) with the Transformers `Trainer`, from the observations `--inputs` names,
which go into the multimodal sentence before the prompt (`palme_hf.embodied_tasks.encode_sentences`): the rendered
image (`<image>`), the state vector (`<state>`), the object vectors (`obj_1 : <obj> ...`), or the image and the state.
It then scores the model on held-out scenes and goals by greedy `generate()` (question accuracy, plan success,
next-step accuracy: `palme_hf.embodied_tasks.evaluate_embodied`) and saves model, processor (image processor and
word-level tokenizer), `eval_results.json` and a model card to `--output-dir`.

    OMP_NUM_THREADS=1 python examples/train_embodied.py --inputs image+state --output-dir embodied-image-state

The model is PalmE's own ViT and decoder on the prefix route, with a state encoder and an object encoder whatever
`--inputs` is, so that every run has the same architecture. `--init-from MODEL` starts from the weights of a model
this script saved, of the same architecture options (`--inputs` may differ), to train it further.

No work is lost, as with `examples/train_captioner.py`:
- A non-empty `--output-dir` is refused (and left as it was) unless `--overwrite` is given, which replaces it; one
  that is, holds or lies inside `--init-from` is refused.
- While training, checkpoints (model, optimizer, scheduler, random states) go to `OUTPUT_DIR/checkpoints/checkpoint-N`
  every `--save-steps` steps, at the end of training, and on Ctrl-C, which stops after the current step (a second
  Ctrl-C aborts without saving). The last two are kept.
- `--resume`, with the options the run started with, continues from the last checkpoint: same data order, same
  random states, so the loss curve continues as if the run had not stopped. A checkpoint of another model than the
  script builds now (its words changed since the run started) is refused, the difference named.
- The finished model is written into a temporary folder beside `--output-dir`, which then replaces it (checkpoints
  included): a run that fails or is stopped leaves no half-written model.
"""

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from palme_hf import PalmEConfig, PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.cli import positive_int
from palme_hf.embodied_tasks import (
    INPUT_CHOICES,
    MAX_ANSWER_TOKENS,
    EmbodiedCollator,
    build_embodied_tokenizer,
    evaluate_embodied,
    load_embodied_model,
    model_answerer,
    scores_table,
)
from palme_hf.embodied_world import MAX_OBJECTS, OBJECT_DIM, STATE_DIM, TASKS, EmbodiedTaskDataset
from palme_hf.io_palme import atomic_output_dir, check_output_dir, exit_on_sigterm, exit_with_error
from palme_hf.model_card_palme import build_model_card
from palme_hf.training_runs import CHECKPOINTS_DIR, StopCallback, find_resume_checkpoint, start_checkpoints

# Options that may differ between a run and its --resume, since they do not change the training.
RESUMABLE_CHANGES = {"output_dir", "overwrite", "resume", "max_minutes", "save_steps", "logging_steps", "eval_samples"}
# Options the script gained after its first runs, with what a run that started before each did.
ADDED_OPTIONS = {
    "block_type": "standard",
    "state_tokens": 2,
    "init_from": None,
    "tasks": list(TASKS),
    "qk_norm": False,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir", default="embodied", help="where the model is saved; its checkpoints/ meanwhile"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output-dir (everything in it is deleted)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the unfinished run in --output-dir from its last checkpoint"
    )
    parser.add_argument("--save-steps", type=positive_int, default=500, help="save a checkpoint every this many steps")
    parser.add_argument(
        "--inputs",
        choices=list(INPUT_CHOICES),
        default="image+state",
        help="the observations that go into the sentence (default: %(default)s)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="MODEL",
        help="start from the weights of this embodied model (a folder this script saved, trained with the same "
        "architecture options; --inputs may differ) instead of new ones",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=list(TASKS),
        help="the tasks trained on, in turn, and scored (default: all of them)",
    )
    parser.add_argument("--train-samples", type=positive_int, default=20_000, help="length of the training split")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument(
        "--max-steps", type=positive_int, default=None, help="train this many steps (repeating the data), not --epochs"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the model and the data (training and held-out examples)"
    )
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=500,
        help="held-out examples scored at the end (0: none), every task of --tasks in turn",
    )
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    parser.add_argument("--image-size", type=positive_int, default=64)
    parser.add_argument("--patch-size", type=positive_int, default=16)
    parser.add_argument("--hidden-size", type=positive_int, default=128, help="width of the encoders and the decoder")
    parser.add_argument("--num-layers", type=positive_int, default=2, help="layers of the encoder and of the decoder")
    parser.add_argument(
        "--block-type",
        choices=["standard", "parallel"],
        default="parallel",
        help="the decoder layer: standard (ALiBi on half the heads, GELU) or parallel (PaLM's block: rotary, "
        "multi-query attention, SwiGLU, no ALiBi) (default: %(default)s)",
    )
    parser.add_argument(
        "--state-tokens",
        type=positive_int,
        default=MAX_OBJECTS,
        help="embeddings the state encoder makes of the state vector (default: %(default)s, one per object slot)",
    )
    parser.add_argument(
        "--qk-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="l2-normalise the decoder's queries and keys, with a fixed attention scale: the attention is sharp from "
        "the start, which finding an object by its colour and shape needs (default: on)",
    )
    parser.add_argument("--logging-steps", type=positive_int, default=50)
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite starts a new one: pass one of them")
    if args.eval_samples < 0:
        parser.error(f"--eval-samples must be 0 or more, got {args.eval_samples}")
    if args.hidden_size % 32:
        parser.error(f"--hidden-size must be a multiple of 32 (heads of 32 features), got {args.hidden_size}")
    return args


def embodied_config(args: argparse.Namespace, tokenizer) -> PalmEConfig:
    """A small PalmE on the prefix route for `tokenizer`'s words, the image, state and object placeholders the
    tokenizer's next three tokens (as `PalmEProcessor.from_model_config` adds them): ViT encoder and decoder of
    `--block-type` of the same width, heads of 32 features (queries and keys l2-normalised with `--qk-norm`), the
    state vector as `--state-tokens` embeddings."""
    num_heads = args.hidden_size // 32
    image_token_id = len(tokenizer)
    return PalmEConfig(
        vision_config={
            "image_size": args.image_size,
            "patch_size": args.patch_size,
            "hidden_size": args.hidden_size,
            "num_hidden_layers": args.num_layers,
            "num_attention_heads": num_heads,
            "head_dim": 32,
            "patch_norm_eps": 0.1,  # as the captioner's: noise on the black background is not scaled up
        },
        text_config={
            "vocab_size": len(tokenizer) + 3,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "hidden_size": args.hidden_size,
            "num_hidden_layers": args.num_layers,
            "num_attention_heads": num_heads,
            "head_dim": 32,
            "block_type": args.block_type,
            "alibi_num_heads": num_heads // 2 if args.block_type == "standard" else 0,
            "qk_norm": args.qk_norm,
            "max_position_embeddings": 128,
        },
        vision_integration="prefix",
        image_token_id=image_token_id,
        state_dim=STATE_DIM,
        num_state_tokens=args.state_tokens,
        state_token_id=image_token_id + 1,
        object_dim=OBJECT_DIM,
        object_token_id=image_token_id + 2,
    )


# What a saved configuration holds beside the architecture.
NOT_ARCHITECTURE = {"_name_or_path", "architectures", "auto_map", "dtype", "transformers_version"}


def architecture_differences(saved: dict, built: dict, prefix: str = "") -> list[str]:
    """The keys of two configuration dicts (`to_dict()`) whose values differ, sub-configurations included, as
    `"text_config.hidden_size: 64 saved, 128 here"`."""
    differences = []
    for key in sorted(set(saved) | set(built)):
        if key in NOT_ARCHITECTURE:
            continue
        if isinstance(saved.get(key), dict) and isinstance(built.get(key), dict):
            differences += architecture_differences(saved[key], built[key], f"{prefix}{key}.")
        elif saved.get(key) != built.get(key):
            differences.append(f"{prefix}{key}: {saved.get(key)!r} saved, {built.get(key)!r} here")
    return differences


def new_model(args: argparse.Namespace) -> tuple[PalmEForConditionalGeneration, PalmEProcessor]:
    """A model of the architecture options, with the word-level tokenizer of the embodied world: new, or with the
    weights of `--init-from`, whose architecture must be that of the options (a `ValueError` names what differs)."""
    tokenizer = build_embodied_tokenizer()
    config = embodied_config(args, tokenizer)
    model = PalmEForConditionalGeneration(config)
    if args.init_from is not None:
        saved, _, _ = load_embodied_model(args.init_from)
        differences = architecture_differences(saved.config.to_dict(), config.to_dict())
        if differences:
            raise ValueError(
                f"--init-from {args.init_from} has another architecture than the options give "
                f"({'; '.join(differences)}): pass the architecture options it was trained with."
            )
        model.load_state_dict(saved.state_dict())
    model.generation_config.max_new_tokens = MAX_ANSWER_TOKENS
    model.generation_config.do_sample = False
    return model, PalmEProcessor.from_model_config(config, tokenizer)


def write_model_card(output_dir: Path, argv: list[str], args: argparse.Namespace, model, metrics: dict):
    """Writes `README.md`: Hub metadata, architecture, training data, held-out scores and the command."""
    launcher = (
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} python" if "OMP_NUM_THREADS" in os.environ else "python"
    )
    command = f"{launcher} examples/train_embodied.py {shlex.join(arg for arg in argv if arg != '--resume')}"
    observations = " and ".join(INPUT_CHOICES[args.inputs])
    origin = "from scratch" if args.init_from is None else f"from `{args.init_from}`"
    dataset = (
        f"`palme_hf.embodied_world.EmbodiedTaskDataset`: {args.train_samples} examples (seed {args.seed}) of the "
        f"tasks {', '.join(args.tasks)} in turn, on scenes of two to four coloured shapes on a 4x4 grid; "
        f"{metrics['train_steps']} steps of batch {args.batch_size}. The model sees the {observations} before each "
        "prompt. The held-out scenes (sets of objects) and goals never appear in training."
    )
    if "num_examples" in metrics:
        evaluation = (
            f"Greedy answers to {metrics['num_examples']} held-out examples (seed {args.seed}); a "
            "plan succeeds when the scripted policy, executing it, makes the goal hold; a next step is right when it "
            "is the first step of a shortest plan.\n\n" + scores_table(metrics)
        )
    else:
        evaluation = "Not measured (`--eval-samples 0`)."
    text = build_model_card(
        model.config,
        model.num_parameters(),
        metrics,
        dataset=dataset,
        repo_id=args.output_dir,
        title="PalmE embodied planner (toy world)",
        summary=f"A small PalmE (palme_hf) trained {origin} to answer geometry questions about a toy scene and "
        f"plan in a small action language (`move obj_N left`), from the scene's {observations} in a multimodal "
        "sentence.",
        sections=[("Embodied tasks", evaluation), ("How to reproduce", f"```bash\n{command}\n```")],
        intended_use="Research on PaLM-E style models at toy scale: questions and plans about scenes of "
        "`palme_hf.embodied_world`, put as `palme_hf.embodied_tasks.encode_sentences` writes them "
        f"(`inputs={INPUT_CHOICES[args.inputs]}`); `examples/embodied_loop.py` runs its closed loop.",
        limits=[
            "It knows only the toy world of its training data: scenes of `palme_hf.embodied_world`, its prompts and "
            f"its action language, and of its tasks only those it was trained on ({', '.join(args.tasks)})."
        ],
        generated=False,
    )
    card = f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- palme
- embodied
- synthetic
- custom_code
---

{text}"""
    (output_dir / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> Trainer:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    set_seed(args.seed)
    try:
        check_output_dir(
            args.output_dir, overwrite=args.overwrite or args.resume, inputs={"--init-from": args.init_from}
        )
        train_dataset = EmbodiedTaskDataset(args.train_samples, "train", seed=args.seed, tasks=tuple(args.tasks))
        model, processor = new_model(args)
        training_args = TrainingArguments(
            output_dir=os.path.join(args.output_dir, CHECKPOINTS_DIR),
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps or -1,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            weight_decay=0.01,
            logging_steps=args.logging_steps,
            save_strategy="steps",
            save_steps=args.save_steps,
            save_total_limit=2,  # the one before the last survives a save that is cut short
            report_to="none",
            remove_unused_columns=False,  # the collator takes the TaskExamples
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            seed=args.seed,
            data_seed=args.seed,
        )
        resume_from = find_resume_checkpoint(
            args, training_args.world_size, RESUMABLE_CHANGES, added_options=ADDED_OPTIONS
        )
        if resume_from is not None:
            saved = PalmEConfig.from_pretrained(resume_from).to_dict()
            differences = architecture_differences(saved, model.config.to_dict())
            if differences:
                raise ValueError(
                    f"--resume: the checkpoint {resume_from} holds another model than this script builds "
                    f"({'; '.join(differences)}): the script's model or words changed since the run started. Start "
                    "a new run in another --output-dir."
                )
    except (ValueError, OSError) as error:
        exit_with_error(error)
    if resume_from is None:
        start_checkpoints(args, training_args.world_size)

    inputs = INPUT_CHOICES[args.inputs]
    stop_callback = StopCallback(args.max_minutes)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=EmbodiedCollator(processor, inputs),
        callbacks=[stop_callback],
    )
    start = time.monotonic()
    with stop_callback:
        train_output = trainer.train(resume_from_checkpoint=resume_from)
    train_minutes = (time.monotonic() - start) / 60
    if stop_callback.interrupted:
        checkpoint = get_last_checkpoint(training_args.output_dir)
        print(
            f"Stopped after step {trainer.state.global_step}; the checkpoint is {checkpoint}. Continue with the same "
            "command and --resume.",
            file=sys.stderr,
        )
        sys.exit(130)
    logged_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "inputs": args.inputs,
        "tasks": args.tasks,
        "train_samples": args.train_samples,
        "train_minutes": train_minutes,
        "train_steps": train_output.global_step,
        "final_train_loss": logged_losses[-1] if logged_losses else train_output.training_loss,
        "train_losses": logged_losses,  # every --logging-steps steps
        "cpu_count": os.cpu_count(),
    }
    if args.eval_samples:
        held_out = EmbodiedTaskDataset(args.eval_samples, "held_out", seed=args.seed, tasks=tuple(args.tasks))
        examples = [held_out[index] for index in range(len(held_out))]
        metrics.update(evaluate_embodied(model_answerer(trainer.model, processor, inputs), examples))
        print(scores_table(metrics))
    print(json.dumps({key: value for key, value in metrics.items() if key != "train_losses"}, indent=2))
    # The finished model replaces --output-dir, and with it the checkpoints.
    with atomic_output_dir(args.output_dir, overwrite=True) as final_dir:
        trainer.model.save_pretrained(final_dir)  # weights, config, generation config and the modelling code
        processor.save_pretrained(final_dir)  # image processor and tokenizer
        (Path(final_dir) / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_model_card(Path(final_dir), argv, args, trainer.model, metrics)
    return trainer


if __name__ == "__main__":
    try:
        with exit_on_sigterm():
            main()
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one outside it
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
