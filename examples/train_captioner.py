"""
Trains a small PalmE captioner on the synthetic shapes dataset with the Transformers `Trainer`, scores it on the
held-out split (scenes with attribute combinations never seen in training) by greedy `generate()`, and saves model,
processor (image processor and word-level tokenizer), metrics and a model card to `--output-dir`.

    python examples/train_captioner.py --output-dir examples/captioner
    accelerate launch --multi_gpu --num_processes 2 examples/train_captioner.py --output-dir /tmp/captioner

Two processes train data-parallel (torch.distributed, gloo on a machine without CUDA): start them with
`accelerate launch --multi_gpu --num_processes 2` or `torchrun --nproc_per_node 2`. (`accelerate launch --cpu
--num_processes 2` starts a single process: accelerate's CPU launcher spawns several only through mpirun.) Only the
main process evaluates and saves. `--batch-size` is per process, as in `TrainingArguments`: with two processes the
global batch doubles.
"""

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GenerationConfig, Trainer, TrainerCallback, TrainingArguments, set_seed

from palme_hf import PalmEConfig, PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import CaptioningCollator, corpus_bleu, exact_match, generate_captions
from palme_hf.synthetic_shapes import (
    HELD_OUT_COMBINATIONS,
    MAX_CAPTION_TOKENS,
    SyntheticShapesDataset,
    build_caption_tokenizer,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="captioner", help="where the trained captioner is saved")
    parser.add_argument("--train-samples", type=int, default=160_000, help="length of the training split")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--word-dropout", type=float, default=0.8, help="probability of hiding a caption word from the decoder's input"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the data")
    parser.add_argument("--eval-samples", type=int, default=1000, help="held-out images to caption at the end")
    parser.add_argument(
        "--sample-images-dir", default=None, help="also save the first held-out images here, with captions.json"
    )
    parser.add_argument("--num-sample-images", type=int, default=12)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=128, help="width of the encoder and the decoder")
    parser.add_argument("--num-layers", type=int, default=2, help="layers of the encoder and of the decoder")
    parser.add_argument("--logging-steps", type=int, default=50)
    return parser.parse_args(argv)


def captioner_config(args: argparse.Namespace, vocab_size: int) -> PalmEConfig:
    """A small cross-attention PalmE: ViT encoder and standard decoder of the same width, heads of 32 features."""
    num_heads = args.hidden_size // 32
    return PalmEConfig(
        vision_config={
            "image_size": args.image_size,
            "patch_size": args.patch_size,
            "hidden_size": args.hidden_size,
            "num_hidden_layers": args.num_layers,
            "num_attention_heads": num_heads,
            "head_dim": 32,
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": args.hidden_size,
            "num_hidden_layers": args.num_layers,
            "num_attention_heads": num_heads,
            "head_dim": 32,
            "alibi_num_heads": num_heads // 2,
            "max_position_embeddings": 64,
        },
    )


class TimeBudgetCallback(TrainerCallback):
    """
    Stops training once `max_minutes` have passed. The main process decides and, under torch.distributed, tells the
    others, so that every process stops after the same step.
    """

    def __init__(self, max_minutes: float):
        self.max_seconds = 60 * max_minutes
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        stop = torch.tensor([float(time.monotonic() - self.start > self.max_seconds)])
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(stop, src=0)
        if stop.item():
            control.should_training_stop = True


def write_model_card(
    output_dir: Path, argv: list[str], args: argparse.Namespace, config: PalmEConfig, num_parameters: int, metrics
):
    """Writes `README.md`: Hub metadata, architecture, training data, metrics and the command that trained it."""
    combinations = ", ".join(" ".join(combination) for combination in HELD_OUT_COMBINATIONS)
    if metrics["num_processes"] > 1:
        launcher = f"accelerate launch --multi_gpu --num_processes {metrics['num_processes']}"
    elif "OMP_NUM_THREADS" in os.environ:
        launcher = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} python"
    else:
        launcher = "python"
    command = f"{launcher} examples/train_captioner.py {shlex.join(argv)}"
    vision, text = config.vision_config, config.text_config
    encoder = (
        f"a ViT on {vision.image_size}x{vision.image_size} RGB images in [0, 1] cut into {vision.patch_size}x"
        f"{vision.patch_size} patches ({vision.num_patches} patch features), {vision.num_hidden_layers} layers of "
        f"width {vision.hidden_size}, {vision.num_attention_heads} heads of {vision.head_dim}"
    )
    decoder = (
        f"{text.num_hidden_layers} standard PalmE layers of width {text.hidden_size}: self-attention with rotary/xpos "
        f"(ALiBi on {text.alibi_num_heads} of {text.num_attention_heads} heads), cross-attention to the patch "
        "features, GELU feed-forward"
    )
    processor = (
        f"`PalmEProcessor`: images resized to {vision.image_size}x{vision.image_size} and rescaled to [0, 1]; a "
        f"word-level tokenizer (`tokenizers` WordLevel) of {text.vocab_size} tokens: `<pad>`, `<bos>`, `<eos>`, "
        "`<unk>` and the caption words. Encoding prepends `<bos>`, so the captioning prompt is the empty text"
    )
    card = f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- palme
- image-captioning
- synthetic
- custom_code
---

# PalmE shapes captioner

A small PalmE (palme_hf) trained from scratch to caption synthetic images of one to three coloured shapes, such as
"a small red circle left of a large blue square".

## Architecture

`PalmEForConditionalGeneration` ({num_parameters / 1e6:.2f} M parameters, float32), image through \
`{config.vision_integration}`:
- image encoder: {encoder};
- text decoder: {decoder};
- processor: {processor}.

## Training data

`palme_hf.synthetic_shapes.SyntheticShapesDataset`: each image holds one to three shapes (circle, square,
triangle), each small or large, red, green, blue or yellow, in distinct thirds of the image at random heights. The
caption names them from left to right, joined by "left of". Training: {args.train_samples} images (seed
{args.seed}), {args.epochs:g} epoch(s), caption words hidden from the decoder's input with probability
{args.word_dropout:g} (`CaptioningCollator(word_dropout=...)`). The training split never shows these (size, colour,
shape) combinations: {combinations}; every held-out image holds at least one of them.

## Metrics

Greedy decoding on {metrics["num_samples"]} held-out images (every one with an unseen combination):

| metric | value |
| --- | --- |
| exact match | {metrics["exact_match"]:.4f} |
| corpus BLEU-4 | {metrics["bleu"]:.4f} |

Training took {metrics["train_minutes"]:.1f} minutes ({metrics["train_steps"]} steps, final training loss
{metrics["final_train_loss"]:.4f}) on {metrics["num_processes"]} process(es) of {torch.get_num_threads()} thread(s) on a
{metrics["cpu_count"]}-core CPU.

## Usage

```python
from PIL import Image
from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import generate_captions

model = PalmEForConditionalGeneration.from_pretrained("examples/captioner")
processor = PalmEProcessor.from_pretrained("examples/captioner")
print(generate_captions(model, processor, [Image.open("examples/images/held_out_00.png")]))
```

## How to reproduce

```bash
{command}
```
"""
    (output_dir / "README.md").write_text(card)


def write_sample_images(directory: Path, items: list[dict]):
    """Saves `items` as `held_out_NN.png` and their true captions as `captions.json` (file name -> caption)."""
    directory.mkdir(parents=True, exist_ok=True)
    captions = {}
    for index, item in enumerate(items):
        name = f"held_out_{index:02d}.png"
        item["image"].save(directory / name)
        captions[name] = item["caption"]
    (directory / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")


def main(argv: list[str] | None = None) -> Trainer:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    set_seed(args.seed)
    tokenizer = build_caption_tokenizer()
    config = captioner_config(args, vocab_size=len(tokenizer))
    processor = PalmEProcessor.from_model_config(config, tokenizer)
    model = PalmEForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_CAPTION_TOKENS,
        do_sample=False,
    )

    train_dataset = SyntheticShapesDataset(args.train_samples, "train", seed=args.seed, image_size=args.image_size)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.01,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the collator needs the raw "image" and "caption"
        dataloader_num_workers=0,
        # Without CUDA, a multi-process launch (torchrun, `accelerate launch --multi_gpu`) sets up gloo data
        # parallelism only when the arguments name the CPU; otherwise each process would train alone.
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        data_seed=args.seed,
    )
    callbacks = [TimeBudgetCallback(args.max_minutes)] if args.max_minutes is not None else []
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=CaptioningCollator(processor, word_dropout=args.word_dropout),
        callbacks=callbacks,
    )
    start = time.monotonic()
    train_output = trainer.train()
    train_minutes = (time.monotonic() - start) / 60
    if not trainer.is_world_process_zero():
        return trainer
    trainer.model.save_pretrained(args.output_dir)  # weights, config, generation config and the modelling code
    processor.save_pretrained(args.output_dir)  # image processor and tokenizer
    held_out = SyntheticShapesDataset(args.eval_samples, "held_out", seed=args.seed, image_size=args.image_size)
    items = [held_out[index] for index in range(len(held_out))]
    references = [item["caption"] for item in items]
    hypotheses = generate_captions(trainer.model, processor, [item["image"] for item in items])
    logged_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "exact_match": exact_match(references, hypotheses),
        "bleu": corpus_bleu(references, hypotheses),
        "num_samples": len(items),
        "train_minutes": train_minutes,
        "train_steps": train_output.global_step,
        "final_train_loss": logged_losses[-1] if logged_losses else train_output.training_loss,
        "train_losses": logged_losses,  # every `--logging-steps` steps, averaged over the processes
        "num_processes": training_args.world_size,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(metrics, indent=2))
    for reference, hypothesis in list(zip(references, hypotheses))[:5]:
        print(f"true: {reference}\n  generated: {hypothesis}")
    output_dir = Path(args.output_dir)
    (output_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(output_dir, argv, args, config, model.num_parameters(), metrics)
    if args.sample_images_dir is not None:
        write_sample_images(Path(args.sample_images_dir), items[: args.num_sample_images])
    return trainer


if __name__ == "__main__":
    main()
