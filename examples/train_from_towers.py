"""Fine-tune a PaLM-E built from two pretrained towers on the synthetic captioning data, the PaLM-E way.

A pretrained vision encoder (`--vision-model`: a folder or Hub id written by `save_pretrained` of ViTModel,
SiglipVisionModel, CLIPVisionModel, PalmEVisionModel, ...) and a pretrained causal language model (`--text-model`:
LlamaForCausalLM, GPT2LMHeadModel, Qwen2ForCausalLM, ..., with its tokenizer) are joined by a fresh projector; the
image goes into the text as a prefix (`<image> a small red circle ...`). By default only the projector trains
(`--freeze both`, the paper's frozen-LM variant); `--freeze vision` trains the projector and the language model,
`--freeze none` everything, and `--lora-rank R` puts LoRA adapters (PEFT) on the language model's attention
projections, merged into the saved model. The model and its processor are written to `--output-dir` (refused when not
empty, unless `--overwrite`, which replaces its contents and nothing else: an empty path, the current folder, and a
folder that is, holds or lies inside a tower folder are refused), with `train_losses.json`: the logged training
losses and sample captions. The model is written into a temporary folder beside `--output-dir`, renamed into place
at the end, and deleted if the run fails or is stopped (Ctrl-C, SIGTERM).

    python examples/train_from_towers.py --vision-model VIT_DIR --text-model LLAMA_DIR --output-dir OUT \\
        --train-samples 2000 --max-steps 200

`--fsdp full` (or `partial`) shards the parameters, gradients and optimizer state over the processes a launcher
starts (torch's FSDP2, `palme_hf.distributed_palme`), each a slice of `--batch-size`, which is then the global batch:

    torchrun --nproc-per-node 2 examples/train_from_towers.py --fsdp full --batch-size 16 ... --output-dir OUT
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/train_from_towers.py --fsdp full ...

It saves sharded checkpoints (torch distributed checkpoint) to `OUT/checkpoints/checkpoint-N` every `--save-steps`
steps, at the end and on Ctrl-C (which stops after the current step, exit status 130); the same command with
`--resume`, on any number of processes, continues with the same data order and losses. The end of training writes
the ordinary `save_pretrained` folder, which replaces `OUT` (checkpoints included).
"""

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoConfig, Trainer, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import CaptioningCollator
from palme_hf.cli import positive_int
from palme_hf.distributed_palme import (
    add_fsdp_argument,
    check_global_batch_size,
    checkpoint_steps,
    exit_interrupted,
    full_state_dict,
    init_process_group,
    last_checkpoint,
    logged_losses,
    rank_and_world_size,
    shard_model,
    train_sharded,
)
from palme_hf.io_palme import (
    atomic_output_dir,
    check_output_dir,
    exit_on_sigterm,
    exit_with_error,
    one_line,
    read_json_object,
)
from palme_hf.synthetic_shapes import SyntheticShapesDataset

FREEZE = {"both": (True, True), "vision": (True, False), "language": (False, True), "none": (False, False)}
# The language model's attention projections, by family (Llama/Qwen2/Gemma/PalmE, GPT-2).
LORA_TARGETS = r"model\.language_model\..*(self_attn\.(q_proj|k_proj|v_proj|o_proj)|attn\.(c_attn|c_proj))$"
CHECKPOINTS_DIR = "checkpoints"  # inside --output-dir while an --fsdp run is not finished
OPTIONS_FILE = "training_options.json"  # in CHECKPOINTS_DIR: what --resume must match
# Options that may differ between a run and its --resume: they do not change the data order or the training.
RESUMABLE_CHANGES = {"output_dir", "overwrite", "resume", "max_steps", "save_steps", "logging_steps"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vision-model", required=True, help="folder or Hub id of the pretrained vision encoder")
    parser.add_argument("--text-model", required=True, help="folder or Hub id of the causal LM and its tokenizer")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--freeze", choices=sorted(FREEZE), default="both", help="towers to freeze (both: projector)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the language model (0: no LoRA)")
    parser.add_argument("--projector-type", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--train-samples", type=positive_int, default=2000)
    parser.add_argument("--max-steps", type=positive_int, default=200)
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="per process; with --fsdp, the global batch they split"
    )
    add_fsdp_argument(parser)
    parser.add_argument("--save-steps", type=positive_int, default=500, help="with --fsdp: checkpoint interval")
    parser.add_argument("--resume", action="store_true", help="with --fsdp: continue from the last checkpoint")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--logging-steps", type=positive_int, default=10)
    parser.add_argument("--image-size", type=int, default=64, help="side of the synthetic images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be 0 or positive, got {args.lora_rank}")
    if args.lora_rank and not FREEZE[args.freeze][1]:
        parser.error("--lora-rank adapts a frozen language model: use it with --freeze both or --freeze language")
    if args.resume and not args.fsdp:
        parser.error("--resume continues an --fsdp run from its checkpoints: use it with --fsdp")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite starts a new one: pass one of them")
    return args


def check_towers(args: argparse.Namespace):
    """
    Refuses (`ValueError`, naming the option) a tower that is a local path but no folder, one that holds no model,
    a `--text-model` that is not a causal language model, and a `--vision-model` that is one (the two swapped).
    """
    for option, path in (("--vision-model", args.vision_model), ("--text-model", args.text_model)):
        if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(".") or path.count("/") > 1):
            raise ValueError(f"{option} {path}: no such folder (give a model folder or a Hub id).")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"{option} {path} holds no saved model: {one_line(error)}") from error
        is_language_model = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
        if option == "--text-model" and not is_language_model:
            raise ValueError(
                f"--text-model {path} holds a {config.model_type} model, not a causal language model (LLaMA, GPT-2, "
                "...); was it meant for --vision-model?"
            )
        if option == "--vision-model" and is_language_model:
            raise ValueError(
                f"--vision-model {path} holds a {config.model_type} language model, not a vision encoder (ViT, "
                "SigLIP, ...); was it meant for --text-model?"
            )


def add_lora(model: PalmEForConditionalGeneration, rank: int):
    """LoRA adapters on the language model's attention projections. What was trainable before (the projector, the
    resampler, and the vision tower unless frozen) stays trainable: PEFT freezes every parameter of the model."""
    from peft import LoraConfig, get_peft_model

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora_config)
    for parameter in trainable:
        parameter.requires_grad_(True)
    return peft_model


def build_model(args: argparse.Namespace) -> PalmEForConditionalGeneration:
    """The model to train: the towers joined by a fresh projector (seeded by `--seed`), frozen as `--freeze` says,
    with LoRA adapters when `--lora-rank` is given (a PEFT model)."""
    torch.manual_seed(args.seed)
    model = PalmEForConditionalGeneration.from_pretrained_towers(
        args.vision_model, args.text_model, projector_type=args.projector_type
    )
    freeze_vision, freeze_language = FREEZE[args.freeze]
    model.freeze_towers(vision_model=freeze_vision, language_model=freeze_language)
    return add_lora(model, args.lora_rank) if args.lora_rank else model


def train_with_trainer(args: argparse.Namespace, trained, train_dataset, collator) -> list[float]:
    """Trains with the Transformers `Trainer` (data-parallel under a launcher); returns the logged losses."""
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer's output folder; nothing is checkpointed
        training_args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            logging_steps=args.logging_steps,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = Trainer(model=trained, args=training_args, train_dataset=train_dataset, data_collator=collator)
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def find_resume_checkpoint(args: argparse.Namespace) -> str | None:
    """
    The checkpoint an `--fsdp --resume` run continues from (None for a new run), refused when incomplete or when the
    run started with other options than those of `RESUMABLE_CHANGES`. A new run refuses the checkpoints of an
    unfinished one in `--output-dir`, even with `--overwrite`: only `--resume` or the user deletes them (a folder
    without checkpoint, left by a run that failed before its first, is no such run).
    """
    checkpoints_dir = os.path.join(args.output_dir, CHECKPOINTS_DIR)
    if not args.resume:
        if checkpoint_steps(checkpoints_dir):
            raise ValueError(
                f"{checkpoints_dir} holds the checkpoints of an unfinished run: continue it with --resume, or delete "
                "that folder to start a new one."
            )
        return None
    checkpoint = last_checkpoint(checkpoints_dir)
    started_with = read_json_object(os.path.join(checkpoints_dir, OPTIONS_FILE))
    changed = sorted(
        name
        for name in vars(args).keys() | started_with.keys()
        if name not in RESUMABLE_CHANGES and vars(args).get(name) != started_with.get(name)
    )
    if changed:
        differences = ", ".join(
            f"--{name.replace('_', '-')} {vars(args).get(name)} (started with {started_with.get(name)})"
            for name in changed
        )
        raise ValueError(
            f"--resume: {differences}. Resume with the options the run in {args.output_dir} started with."
        )
    return checkpoint


def train_with_fsdp(args: argparse.Namespace, trained, train_dataset, collator, resume_from: str | None):
    """
    Shards `trained` with FSDP2 and trains it, checkpointing into `--output-dir/checkpoints`; returns the loss of
    every step and the trained weights (gathered in the first process; an empty dict in the others). Ctrl-C ends
    the process with status 130 once every process has saved its shards.
    """
    rank, _ = rank_and_world_size()
    checkpoints_dir = os.path.join(args.output_dir, CHECKPOINTS_DIR)
    if resume_from is None and rank == 0:
        os.makedirs(checkpoints_dir, exist_ok=True)
        with open(os.path.join(checkpoints_dir, OPTIONS_FILE), "w") as handle:
            json.dump(vars(args), handle, indent=2)
    shard_model(trained, reshard_after_forward=args.fsdp == "full")
    trainable = [parameter for parameter in trained.parameters() if parameter.requires_grad]
    # As the Trainer path trains: AdamW without weight decay at a constant learning rate, gradients clipped to norm 1.
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    losses, interrupted = train_sharded(
        trained,
        optimizer,
        train_dataset,
        collator,
        global_batch_size=args.batch_size,
        max_steps=args.max_steps,
        seed=args.seed,
        checkpoints_dir=checkpoints_dir,
        save_steps=args.save_steps,
        resume_from=resume_from,
    )
    if interrupted:
        exit_interrupted(checkpoints_dir, len(losses))
    return losses, full_state_dict(trained)


def main(argv=None) -> dict | None:
    """Trains, then writes the model (the first process of an --fsdp run; every process of the Trainer's); returns
    what `train_losses.json` holds (None in the other processes of an --fsdp run)."""
    args = parse_args(argv)
    if args.fsdp:
        init_process_group()
    rank, world_size = rank_and_world_size()
    # Before any work. The towers are inputs, which no output may replace; --resume continues what fills the folder.
    check_output_dir(
        args.output_dir,
        args.overwrite or args.resume,
        {"--vision-model": args.vision_model, "--text-model": args.text_model},
    )
    check_towers(args)
    resume_from = find_resume_checkpoint(args) if args.fsdp else None
    if args.fsdp:
        check_global_batch_size(args.batch_size, args.train_samples)
    if world_size > 1:  # every process has checked --output-dir before the first writes checkpoints into it
        dist.barrier()
    processor = PalmEProcessor.from_pretrained_towers(args.vision_model, args.text_model)
    trained = build_model(args)
    num_trainable = sum(parameter.numel() for parameter in trained.parameters() if parameter.requires_grad)
    train_dataset = SyntheticShapesDataset(
        args.train_samples, split="train", seed=args.seed, image_size=args.image_size
    )
    collator = CaptioningCollator(processor)
    if not args.fsdp:
        losses = train_with_trainer(args, trained, train_dataset, collator)
    else:
        step_losses, weights = train_with_fsdp(args, trained, train_dataset, collator, resume_from)
        losses = logged_losses(step_losses, args.logging_steps)
        if rank != 0:
            return None
        trained = build_model(args)  # unsharded, for generate() and save_pretrained
        trained.load_state_dict(weights)

    model = trained.merge_and_unload() if args.lora_rank else trained
    model.eval()
    samples = [
        SyntheticShapesDataset(4, split="held_out", seed=args.seed, image_size=args.image_size)[i] for i in range(4)
    ]
    prompts = ["<image>"] * len(samples)
    inputs = processor(images=[sample["image"] for sample in samples], text=prompts, return_tensors="pt")
    generated = model.generate(**inputs.to(model.device), max_new_tokens=12, do_sample=False)
    captions = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
    result = {
        "train_losses": losses,
        "trainable_parameters": num_trainable,
        "samples": [{"reference": s["caption"], "caption": c} for s, c in zip(samples, captions)],
    }
    # The finished model replaces --output-dir, and with it an --fsdp run's checkpoints.
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite or args.resume or bool(args.fsdp)) as final_dir:
        model.save_pretrained(final_dir)
        processor.save_pretrained(final_dir)
        with open(os.path.join(final_dir, "train_losses.json"), "w") as handle:
            json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    try:
        with exit_on_sigterm():
            main()
    except (ValueError, OSError) as error:
        exit_with_error(error)
    finally:
        # Every process leaves the group before exiting, so that none exits while another still talks to it.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
