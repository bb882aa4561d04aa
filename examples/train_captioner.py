"""
Trains a small PalmE captioner on the synthetic shapes dataset with the Transformers `Trainer`, scores it on the
held-out split (scenes with attribute combinations never seen in training) by greedy `generate()`, clean and under
photo-like corruptions (JPEG, noise, resizing, transparency, brightness: `palme_hf.captioning.ROBUSTNESS_CONDITIONS`),
and saves model, processor (image processor and word-level tokenizer), metrics and a model card to `--output-dir`.

The training images are augmented as photos of the scenes would differ from the renders (crops, rescaling,
brightness, Gaussian noise, JPEG: `palme_hf.synthetic_shapes.ImageAugmentation`; `--no-augment` trains on clean
renders), and the patch LayerNorm's epsilon is raised (`--patch-norm-eps`), so that noise on the black background
is not scaled up to the size of a shape.

    python examples/train_captioner.py --output-dir palme_hf/captioner --overwrite   # replaces the committed one
    python examples/train_captioner.py --block-type parallel --vision-integration prefix --head-dim 64 \
        --output-dir my_palme   # the PaLM-E paper's layout: PaLM's parallel block, the image as prefix tokens
    python examples/train_captioner.py --vision-from palme_hf/captioner --block-type parallel \
        --vision-integration prefix --head-dim 64 --output-dir my_palme   # ... reading the captioner's trained ViT
    accelerate launch --multi_gpu --num_processes 2 examples/train_captioner.py --output-dir /tmp/captioner

`--vision-from MODEL` starts the image encoder from a trained captioner's (its configuration and weights), as the
PaLM-E paper starts from a pretrained ViT: the projector and the decoder are new, and all of it trains.
`--hidden-size`, `--num-layers` and `--head-dim` are then the decoder's; the encoder's image and patch size are taken,
and other values are refused.

Two processes train data-parallel (torch.distributed, gloo on a machine without CUDA): start them with
`accelerate launch --multi_gpu --num_processes 2` or `torchrun --nproc_per_node 2`. (`accelerate launch --cpu
--num_processes 2` starts a single process: accelerate's CPU launcher spawns several only through mpirun.) Only the
main process evaluates and saves. `--batch-size` is per process, as in `TrainingArguments`: with two processes the
global batch doubles.

`--fsdp full` (or `partial`) shards the parameters, gradients and optimizer state over the processes instead (torch's
FSDP2, `palme_hf.distributed_palme`, as `examples/train_from_towers.py --fsdp`); `--batch-size` is then the global
batch, which the processes split, and any number of processes trains as one does:

    torchrun --nproc-per-node 2 examples/train_captioner.py --fsdp full --batch-size 64 --output-dir /tmp/captioner

Its checkpoints are sharded (torch distributed checkpoint) and `--resume` continues them on any number of processes;
the rules below hold for them as for the Trainer's (`--max-minutes` is the Trainer's alone).

No work is lost:
- A non-empty `--output-dir` is refused (and left as it was) unless `--overwrite` is given, which replaces it. Nothing
  else is ever deleted: an empty path, the current folder, and an `--output-dir` or `--sample-images-dir` that is,
  holds or lies inside an input (`--train-dir`, `--eval-dir`, `--init-from`) or the other output are refused before
  any work. `--sample-images-dir` may hold other files, but not the ones it writes unless `--overwrite`. A link to a
  folder stays a link: its target gets the captioner.
- While training, checkpoints (model, optimizer, scheduler, random states) go to `OUTPUT_DIR/checkpoints/checkpoint-N`
  every `--save-steps` steps, at the end of training, and on Ctrl-C, which stops after the current step (a second
  Ctrl-C aborts without saving). The last two are kept.
- `--resume`, with the options the run started with, continues from the last checkpoint: same data order, same
  random states, so the loss curve continues as if the run had not stopped.
- The finished captioner is written into a temporary folder beside `--output-dir`, which then replaces it
  (checkpoints included): a run that fails or is stopped leaves no half-written model.
- `--init-from MODEL` fine-tunes a captioner folder (model and processor, as this script saves them) instead of a new
  model; architecture options that contradict it are refused. `--patch-norm-eps` may differ from the model's: the
  model is then fine-tuned with that epsilon (to make a captioner trained with the reference's 1e-5 robust).

Your own images: `--train-dir DIR --eval-dir DIR` train and score on folders of captioned images laid out as Hugging
Face's `imagefolder` (the images and a `metadata.jsonl` of one `{"file_name": "cat.png", "text": "a cat"}` a line)
instead of the synthetic shapes, for instance to fine-tune the shipped captioner:

    python examples/train_captioner.py --init-from palme_hf/captioner --train-dir my_images/train \
        --eval-dir my_images/test --output-dir my_captioner
    palme-hf caption --model my_captioner my_images/test/*.png

Your images are used as they are: augmentation and the robustness evaluation, which render shapes, are for the
synthetic data (`--augment` and `--robustness-samples` are refused with `--train-dir`). Before the first step, every
image of `--train-dir` and `--eval-dir` is read through the image processor: a file that is empty, not an image, has
more than `--max-image-pixels` pixels, or that the processor refuses is named, with the others, and the run stops; so
does a `metadata.jsonl` entry whose `file_name` is absolute or leads outside its folder.
"""

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments, get_cosine_schedule_with_warmup, set_seed
from transformers.trainer_utils import get_last_checkpoint

from palme_hf import PalmEConfig, PalmEForConditionalGeneration, PalmEProcessor, PalmEVisionConfig, PalmEVisionModel
from palme_hf.captioning import (
    CaptioningCollator,
    ImageCaptionFolder,
    check_vocabulary,
    corpus_bleu,
    exact_match,
    generate_captions,
    robustness_exact_match,
    robustness_table,
)
from palme_hf.cli import positive_int
from palme_hf.distributed_palme import (
    add_fsdp_argument,
    check_global_batch_size,
    exit_interrupted,
    full_state_dict,
    init_process_group,
    logged_losses,
    rank_and_world_size,
    shard_model,
    train_sharded,
)
from palme_hf.io_palme import (
    DEFAULT_MAX_IMAGE_PIXELS,
    atomic_output_dir,
    check_model_folder,
    check_no_overlap,
    check_output_dir,
    check_path_given,
    check_writable,
    exit_on_sigterm,
    exit_with_error,
    load_saved_model,
    load_saved_processor,
    one_line,
    read_json_object,
)
from palme_hf.model_card_palme import build_model_card
from palme_hf.synthetic_shapes import (
    HELD_OUT_COMBINATIONS,
    MAX_CAPTION_TOKENS,
    ImageAugmentation,
    SyntheticShapesDataset,
    build_caption_tokenizer,
)
from palme_hf.towers_palme import IMAGE_TOKEN, add_image_token
from palme_hf.training_runs import (
    CHECKPOINTS_DIR,
    StopCallback,
    find_resume_checkpoint,
    start_checkpoints,
)

AUGMENTATION = ImageAugmentation()  # with --augment
SAMPLE_CAPTIONS_FILE = "captions.json"  # in --sample-images-dir, beside the images
# Options that may differ between a run and its --resume, since they do not change the training.
RESUMABLE_CHANGES = {
    "output_dir", "overwrite", "resume", "max_minutes", "save_steps", "logging_steps", "eval_samples",
    "sample_images_dir", "num_sample_images", "robustness_samples", "max_image_pixels",
}  # fmt: skip
# patch_norm_eps: about the variance of a [0, 1] patch holding part of a shape (PalmEVisionConfig.patch_norm_eps).
ARCHITECTURE_DEFAULTS = {
    "image_size": 64, "patch_size": 8, "hidden_size": 128, "num_layers": 2, "head_dim": 32, "patch_norm_eps": 0.1,
    "block_type": "standard", "vision_integration": "cross_attention",
}  # fmt: skip
# The options that --vision-from's encoder sets; --hidden-size, --num-layers and --head-dim are then the decoder's.
ENCODER_OPTIONS = ("image_size", "patch_size", "patch_norm_eps")
# How both routes train (the Trainer's defaults but these): AdamW, a cosine schedule after a linear warmup.
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir", default="captioner", help="where the captioner is saved; its checkpoints/ while it trains"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output-dir (everything in it is deleted)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the unfinished run in --output-dir from its last checkpoint"
    )
    parser.add_argument("--save-steps", type=int, default=500, help="save a checkpoint every this many steps")
    parser.add_argument(
        "--init-from", default=None, metavar="MODEL", help="fine-tune this captioner folder instead of a new model"
    )
    parser.add_argument(
        "--vision-from",
        default=None,
        metavar="MODEL",
        help="start a new captioner's image encoder from this captioner folder's (configuration and weights); the "
        "projector and the decoder are new",
    )
    parser.add_argument(
        "--train-dir",
        default=None,
        metavar="DIR",
        help='train on this folder of images and metadata.jsonl ({"file_name", "text"} a line), not synthetic shapes',
    )
    parser.add_argument(
        "--eval-dir",
        default=None,
        metavar="DIR",
        help="score on this folder (laid out as --train-dir) instead of the synthetic held-out split",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="refuse images of --train-dir and --eval-dir of more pixels (default: %(default)s)",
    )
    parser.add_argument("--train-samples", type=int, default=160_000, help="length of the synthetic training split")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="per process; with --fsdp, the global batch they split"
    )
    add_fsdp_argument(parser)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--word-dropout", type=float, default=0.8, help="probability of hiding a caption word from the decoder's input"
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="change the synthetic training images as photos would (ImageAugmentation: crop, scale, brightness, "
        "noise, JPEG); on by default without --train-dir",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the data")
    parser.add_argument("--eval-samples", type=int, default=1000, help="held-out images to caption at the end")
    parser.add_argument(
        "--robustness-samples",
        type=int,
        default=None,
        help="synthetic held-out images (of seed --seed + 1) captioned under each corruption at the end; 0 skips this "
        "(default 200; 0 with --train-dir)",
    )
    parser.add_argument(
        "--sample-images-dir", default=None, help="also save the first held-out images here, with captions.json"
    )
    parser.add_argument("--num-sample-images", type=int, default=12)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    # Architecture options default to None, so that one given with --init-from or --vision-from can be told from the
    # default.
    defaults = "default {}; with --init-from, the model's"
    encoder_defaults = "default {}; with --init-from or --vision-from, the model's"
    parser.add_argument("--image-size", type=int, help=encoder_defaults.format(ARCHITECTURE_DEFAULTS["image_size"]))
    parser.add_argument("--patch-size", type=int, help=encoder_defaults.format(ARCHITECTURE_DEFAULTS["patch_size"]))
    parser.add_argument(
        "--hidden-size",
        type=int,
        help="width of the encoder and the decoder, of the decoder alone with --vision-from "
        f"({defaults.format(ARCHITECTURE_DEFAULTS['hidden_size'])})",
    )
    parser.add_argument(
        "--num-layers",
        type=int,
        help="layers of the encoder and of the decoder, of the decoder alone with --vision-from "
        f"({defaults.format(ARCHITECTURE_DEFAULTS['num_layers'])})",
    )
    parser.add_argument(
        "--head-dim",
        type=int,
        help="features of an attention head, in the encoder and the decoder, in the decoder alone with --vision-from "
        f"({defaults.format(ARCHITECTURE_DEFAULTS['head_dim'])})",
    )
    parser.add_argument(
        "--block-type",
        choices=["standard", "parallel"],
        help="the decoder layer: standard (self-attention with ALiBi on half the heads, cross-attention, GELU) or "
        "parallel (PaLM's block: rotary, multi-query attention, SwiGLU, no ALiBi) "
        f"({defaults.format(ARCHITECTURE_DEFAULTS['block_type'])})",
    )
    parser.add_argument(
        "--vision-integration",
        choices=["cross_attention", "prefix"],
        help="how the image reaches the decoder: cross-attention to the patch features, or the PaLM-E paper's prefix "
        "(the patch features are placeholder tokens before the caption) "
        f"({defaults.format(ARCHITECTURE_DEFAULTS['vision_integration'])})",
    )
    parser.add_argument(
        "--patch-norm-eps",
        type=float,
        help=f"epsilon of the patch LayerNorm ({encoder_defaults.format(ARCHITECTURE_DEFAULTS['patch_norm_eps'])})",
    )
    parser.add_argument("--logging-steps", type=int, default=50)
    args = parser.parse_args(argv)
    if args.train_dir is not None and args.eval_dir is None:
        parser.error(
            "--train-dir needs --eval-dir: the synthetic held-out split does not score a captioner of your images"
        )
    for option, name in ((args.augment, "--augment"), (args.robustness_samples, "--robustness-samples")):
        if args.train_dir is not None and option:
            parser.error(f"{name} renders synthetic shapes: it does not apply to the images of --train-dir")
    if args.augment is None:
        args.augment = args.train_dir is None
    if args.robustness_samples is None:
        args.robustness_samples = 200 if args.train_dir is None else 0
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite starts a new one: pass one of them")
    if args.fsdp and args.max_minutes is not None:
        parser.error("--max-minutes stops the Trainer's run: it does not apply to --fsdp (give --epochs)")
    if args.robustness_samples < 0:
        parser.error(f"--robustness-samples must be 0 or more, got {args.robustness_samples}")
    if args.patch_norm_eps is not None and not args.patch_norm_eps > 0:
        parser.error(f"--patch-norm-eps must be a positive number, got {args.patch_norm_eps}")
    if args.head_dim is not None and not args.head_dim > 0:
        parser.error(f"--head-dim must be a positive number, got {args.head_dim}")
    if args.init_from is not None and args.vision_from is not None:
        parser.error("--init-from fine-tunes a whole captioner and --vision-from starts a new one: pass one of them")
    if args.init_from is None:
        for name, default in ARCHITECTURE_DEFAULTS.items():
            # with --vision-from, the encoder's options not given are the encoder's (load_vision_encoder)
            if getattr(args, name) is None and not (args.vision_from and name in ENCODER_OPTIONS):
                setattr(args, name, default)
        if args.hidden_size % args.head_dim:
            parser.error(f"--hidden-size {args.hidden_size} must be a multiple of --head-dim {args.head_dim}")
    return args


def captioner_config(
    args: argparse.Namespace, tokenizer, vision_config: PalmEVisionConfig | None = None
) -> PalmEConfig:
    """A small PalmE for `tokenizer`'s words: ViT encoder (`vision_config`, or one of the decoder's width and head
    size) and decoder (`--block-type`), the image through `--vision-integration` (with `"prefix"`, `tokenizer` holds
    the image token)."""
    num_heads = args.hidden_size // args.head_dim
    is_prefix = args.vision_integration == "prefix"
    num_patches = (args.image_size // args.patch_size) ** 2
    if vision_config is None:
        vision_config = PalmEVisionConfig(
            image_size=args.image_size,
            patch_size=args.patch_size,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=num_heads,
            head_dim=args.head_dim,
            patch_norm_eps=args.patch_norm_eps,
        )
    return PalmEConfig(
        vision_config=vision_config.to_dict(),
        text_config={
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "hidden_size": args.hidden_size,
            "num_hidden_layers": args.num_layers,
            "num_attention_heads": num_heads,
            "head_dim": args.head_dim,
            "block_type": args.block_type,
            "alibi_num_heads": num_heads // 2 if args.block_type == "standard" else 0,
            # <bos>, the image placeholders in the prefix route, and the caption
            "max_position_embeddings": max(64, 1 + num_patches * is_prefix + MAX_CAPTION_TOKENS),
        },
        vision_integration=args.vision_integration,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if is_prefix else None,
    )


def new_captioner(args: argparse.Namespace) -> tuple[PalmEForConditionalGeneration, PalmEProcessor]:
    """A new captioner of the architecture options, with the word-level caption tokenizer; with `--vision-from`, its
    image encoder is that captioner's."""
    tokenizer = build_caption_tokenizer()
    if args.vision_integration == "prefix":
        add_image_token(tokenizer)
    vision_model = None if args.vision_from is None else load_vision_encoder(args)
    config = captioner_config(args, tokenizer, None if vision_model is None else vision_model.config)
    model = PalmEForConditionalGeneration(config)  # its generation config takes the token ids from the text config
    if vision_model is not None:
        model.model.vision_model.load_state_dict(vision_model.state_dict())
    model.generation_config.max_new_tokens = MAX_CAPTION_TOKENS
    model.generation_config.do_sample = False
    return model, PalmEProcessor.from_model_config(config, tokenizer)


def load_captioner(args: argparse.Namespace) -> tuple[PalmEForConditionalGeneration, PalmEProcessor]:
    """
    The captioner in `--init-from` with its processor. Architecture options that contradict it are refused; the
    ones not given take its values. A `--patch-norm-eps` given replaces the model's.
    """
    model = load_saved_captioner("--init-from", args.init_from, args.patch_norm_eps)
    processor = load_saved_processor(PalmEProcessor, args.init_from)
    vision, text = model.config.vision_config, model.config.text_config
    model_values = {
        "image_size": {vision.image_size},
        "patch_size": {vision.patch_size},
        "hidden_size": {vision.hidden_size, text.hidden_size},
        "num_layers": {vision.num_hidden_layers, text.num_hidden_layers},
        "head_dim": {vision.head_dim, text.head_dim},
        "patch_norm_eps": {vision.patch_norm_eps},
        "block_type": {text.block_type},
        "vision_integration": {model.config.vision_integration},
    }
    take_model_values(args, model_values, f"--init-from {args.init_from}", "fine-tune the model as it is")
    return model, processor


def load_vision_encoder(args: argparse.Namespace) -> PalmEVisionModel:
    """
    The image encoder of the captioner in `--vision-from`, for a new projector and decoder to read (the PaLM-E
    paper's recipe: a pretrained ViT). `--image-size` and `--patch-size` that contradict it are refused; the encoder
    options not given take its values. A `--patch-norm-eps` given replaces the encoder's.
    """
    model = load_saved_captioner("--vision-from", args.vision_from, args.patch_norm_eps)
    vision = model.config.vision_config
    model_values = {
        "image_size": {vision.image_size},
        "patch_size": {vision.patch_size},
        "patch_norm_eps": {vision.patch_norm_eps},
    }
    take_model_values(args, model_values, f"--vision-from {args.vision_from}", "take the encoder as it is")
    return model.model.vision_model


def load_saved_captioner(option: str, folder: str, patch_norm_eps: float | None) -> PalmEForConditionalGeneration:
    """The captioner `folder` (given as `option`), refused unless it is one of palme_hf's own towers as this script
    saves them; a `patch_norm_eps` given replaces its vision configuration's."""
    check_model_folder(folder)
    saved = read_json_object(os.path.join(folder, "config.json"))
    model_types = [
        part.get("model_type") if isinstance(part, dict) else None
        for part in (saved, saved.get("vision_config"), saved.get("text_config"))
    ]
    if model_types != ["palme", "palme_vision", "palme_text"]:
        raise ValueError(
            f"{option} {folder} holds a model of type {model_types[0]} (vision {model_types[1]}, text "
            f"{model_types[2]}), not a captioner of palme_hf's own towers (palme, palme_vision, palme_text), as this "
            "script saves them. A PalmE of pretrained towers trains with examples/train_from_towers.py."
        )
    try:
        config = PalmEConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{folder}/config.json is not a PalmE configuration: {one_line(error)}") from error
    if patch_norm_eps is not None:
        config.vision_config.patch_norm_eps = patch_norm_eps  # checked positive by parse_args
    return load_saved_model(PalmEForConditionalGeneration, folder, config=config)


def take_model_values(args: argparse.Namespace, model_values: dict[str, set], source: str, advice: str):
    """Refuses the architecture options given that contradict `model_values` (option name -> the model's values) of
    `source`, naming them; the options not given take the model's value where it has one."""
    contradictions = [
        f"--{name.replace('_', '-')} {getattr(args, name)} (the model has {' and '.join(map(str, sorted(values)))})"
        for name, values in model_values.items()
        if getattr(args, name) is not None and values != {getattr(args, name)}
    ]
    if contradictions:
        raise ValueError(f"{source} contradicts {', '.join(contradictions)}; leave these options out to {advice}.")
    for name, values in model_values.items():
        if len(values) == 1:
            setattr(args, name, next(iter(values)))


def captioning_datasets(args: argparse.Namespace, processor: PalmEProcessor):
    """The training and held-out datasets: the folders of --train-dir and --eval-dir (their captions checked against
    the processor's tokenizer, every image read and checked by its image processor, so that a bad file stops the
    run before training), or the synthetic shapes."""
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    if args.train_dir is None:
        train = SyntheticShapesDataset(
            args.train_samples,
            "train",
            seed=args.seed,
            image_size=args.image_size,
            augmentation=AUGMENTATION if args.augment else None,
        )
    else:
        train = ImageCaptionFolder(args.train_dir, args.max_image_pixels)
    if args.eval_dir is None:
        held_out = SyntheticShapesDataset(args.eval_samples, "held_out", seed=args.seed, image_size=args.image_size)
    else:
        held_out = ImageCaptionFolder(args.eval_dir, args.max_image_pixels)
    for folder in (train, held_out):
        if isinstance(folder, ImageCaptionFolder):
            check_vocabulary(tokenizer, folder.captions)
            folder.check_images(image_processor)
    return train, held_out


def input_paths(args: argparse.Namespace) -> dict[str, str | None]:
    """The folders the run reads, by option: no output may be, hold or lie inside one of them."""
    return {
        "--train-dir": args.train_dir,
        "--eval-dir": args.eval_dir,
        "--init-from": args.init_from,
        "--vision-from": args.vision_from,
    }


def sample_image_names(args: argparse.Namespace) -> list[str]:
    """The names of the images `--sample-images-dir` gets (beside `SAMPLE_CAPTIONS_FILE`): `held_out_NN.png`."""
    return [f"held_out_{index:02d}.png" for index in range(args.num_sample_images)]


def check_output_paths(args: argparse.Namespace):
    """
    Checks the output paths before any work: `--output-dir` (see `check_output_dir`; `--resume` continues the run
    that fills it) and `--sample-images-dir`, which may hold other files but not those it would write, unless
    `--overwrite` (which replaces those files alone). Neither may be, hold or lie inside an input folder, nor the
    other output.
    """
    check_output_dir(
        args.output_dir,
        overwrite=args.overwrite or args.resume,
        inputs={**input_paths(args), "--sample-images-dir": args.sample_images_dir},
    )
    if args.sample_images_dir is None:
        return
    samples_dir = args.sample_images_dir
    check_path_given(samples_dir, "--sample-images-dir")
    if os.path.exists(samples_dir) and not os.path.isdir(samples_dir):
        raise ValueError(f"--sample-images-dir {samples_dir} exists and is not a folder.")
    check_no_overlap(samples_dir, {**input_paths(args), "--output-dir": args.output_dir})
    check_writable(samples_dir, "--sample-images-dir")
    written = [*sample_image_names(args), SAMPLE_CAPTIONS_FILE]
    existing = [name for name in written if os.path.lexists(os.path.join(samples_dir, name))]
    if existing and not args.overwrite:
        raise ValueError(
            f"--sample-images-dir {samples_dir} already holds {', '.join(existing)}; pass --overwrite to replace "
            "these files, or give another folder."
        )


class StepSeededCollator(TrainerCallback):
    """
    Calls `collator` with the torch random state seeded from (seed, process, batch number), so that a batch's word
    dropout depends on nothing that ran before it and a resumed run draws what the uninterrupted run drew. (The
    Trainer restores a checkpoint's random state only after the resumed run has collated its first batches:
    huggingface/transformers#39215.) As a callback, it learns the batch number a resumed run starts from.
    """

    def __init__(self, collator: CaptioningCollator, seed: int, process_index: int):
        self.collator = collator
        self.seed = seed
        self.process_index = process_index
        self.batch = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.batch = state.global_step  # one batch per step and process: there is no gradient accumulation

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random.Random(f"{self.seed}/{self.process_index}/{self.batch}").getrandbits(63))
            self.batch += 1
            return self.collator(items)


def write_model_card(
    output_dir: Path, argv: list[str], args: argparse.Namespace, config: PalmEConfig, num_parameters: int, metrics
):
    """Writes `README.md`: Hub metadata, architecture, training data, metrics and the command that trained it."""
    combinations = ", ".join(" ".join(combination) for combination in HELD_OUT_COMBINATIONS)
    if args.augment:
        augmentation = (
            "Each training image was changed as a photo of the scene might be, each change with probability "
            f"{AUGMENTATION.probability:g} (`palme_hf.synthetic_shapes.ImageAugmentation()`): up to "
            f"{AUGMENTATION.max_crop:.0%} of the side cropped off each edge, resized by {AUGMENTATION.scale[0]:g} to "
            f"{AUGMENTATION.scale[1]:g}x, brightness x{AUGMENTATION.brightness[0]:g} to "
            f"x{AUGMENTATION.brightness[1]:g}, Gaussian noise of sigma up to "
            f"{AUGMENTATION.noise_sigma[1] * 255:g}/255, JPEG at quality {AUGMENTATION.jpeg_quality[0]} to "
            f"{AUGMENTATION.jpeg_quality[1]}."
        )
    else:
        augmentation = "The training images were the clean renders (`--no-augment`)."
    if "robustness" in metrics:
        robustness = f"""
Greedy exact match on {metrics["robustness_samples"]} other held-out images (seed {metrics["robustness_seed"]}), \
each changed as named (`palme_hf.captioning.ROBUSTNESS_CONDITIONS`; noise on every pixel and channel, rounded to \
8 bits; resized images are resized back by the processor; RGBA: a PNG with a transparent, white background):

{robustness_table(metrics["robustness"])}

`python examples/evaluate_captioner.py --model MODEL --num-samples {metrics["robustness_samples"]} --seed \
{metrics["robustness_seed"]}` prints this table.
"""
    else:
        robustness = "\nNot measured (`--robustness-samples 0`).\n"
    if metrics["num_processes"] > 1:
        launcher = f"accelerate launch --multi_gpu --num_processes {metrics['num_processes']}"
    elif "OMP_NUM_THREADS" in os.environ:
        launcher = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} python"
    else:
        launcher = "python"
    # A resumed run trained as the command without --resume did.
    command = f"{launcher} examples/train_captioner.py {shlex.join(arg for arg in argv if arg != '--resume')}"
    if args.init_from is not None:
        origin = f"fine-tuned from `{args.init_from}`"
    elif args.vision_from is not None:
        origin = f"trained on the image encoder of `{args.vision_from}` (its projector and decoder from scratch)"
    else:
        origin = "trained from scratch"
    training = (
        f"{args.epochs:g} epoch(s), caption words hidden from the decoder's input with probability "
        f"{args.word_dropout:g} (`CaptioningCollator(word_dropout=...)`)"
    )
    if args.train_dir is None:
        training_data = (
            "`palme_hf.synthetic_shapes.SyntheticShapesDataset`: each image holds one to three shapes (circle, "
            "square, triangle), each small or large, red, green, blue or yellow, in distinct thirds of the image at "
            'random heights. The caption names them from left to right, joined by "left of". Training: '
            f"{args.train_samples} images (seed {args.seed}), {training}. {augmentation} The training split never "
            f"shows these (size, colour, shape) combinations: {combinations}; every held-out image holds at least one "
            "of them."
        )
    else:
        training_data = f"The captioned images of `{args.train_dir}` (`metadata.jsonl`), {training}."
    held_out = (
        "The held-out images each hold an unseen combination."
        if args.eval_dir is None
        else f"The held-out images are those of `{args.eval_dir}`."
    )
    vision, text = config.vision_config, config.text_config
    if config.vision_integration == "prefix":
        tokens = f"`<unk>`, the caption words and the image placeholder `{IMAGE_TOKEN}`"
        prompt = (
            f"the captioning prompt is `{IMAGE_TOKEN}`, which the processor expands into the image's "
            f"{config.num_image_tokens} placeholders"
        )
    else:
        tokens, prompt = "`<unk>` and the caption words", "the captioning prompt is the empty text"
    processor = (
        f"`PalmEProcessor`: images resized to {vision.image_size}x{vision.image_size} and rescaled to [0, 1]; a "
        f"word-level tokenizer (`tokenizers` WordLevel) of {text.vocab_size} tokens: `<pad>`, `<bos>`, `<eos>`, "
        f"{tokens}. Encoding prepends `<bos>`, and {prompt}."
    )
    robustness += f"""
The patch LayerNorm's epsilon is {vision.patch_norm_eps:g} (`vision_config.patch_norm_eps`; the reference's 1e-5 \
scales noise on a flat black patch up to unit size).
"""
    hardware = (
        f"{metrics['num_processes']} process(es) of {torch.get_num_threads()} thread(s) on a "
        f"{metrics['cpu_count']}-core CPU."
    )
    text_of_card = build_model_card(
        config,
        num_parameters,
        metrics,
        dataset=f"{training_data} {held_out}",
        repo_id=args.output_dir,
        title="PalmE shapes captioner",
        summary=f"A small PalmE (palme_hf) {origin} to caption synthetic images of one to three coloured shapes, "
        'such as "a small red circle left of a large blue square".',
        sections=[
            ("Processor", processor),
            ("Robustness to photo-like changes", robustness),
            ("Hardware", hardware),
            ("How to reproduce", f"```bash\n{command}\n```"),
        ],
        generated=False,
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

{text_of_card}"""
    (output_dir / "README.md").write_text(card)


def write_sample_images(directory: Path, names: list[str], items: list[dict]):
    """Saves `items` as `names` (`held_out_NN.png`) and their true captions as `captions.json` (file name ->
    caption)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, item in zip(names, items):
        item["image"].save(directory / name)
    captions = {name: item["caption"] for name, item in zip(names, items)}
    (directory / SAMPLE_CAPTIONS_FILE).write_text(json.dumps(captions, indent=2) + "\n")


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    """The `Trainer`'s arguments (without `--fsdp`)."""
    return TrainingArguments(
        output_dir=os.path.join(args.output_dir, CHECKPOINTS_DIR),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP_RATIO,
        weight_decay=WEIGHT_DECAY,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,  # the one before the last survives a save that is cut short
        report_to="none",
        remove_unused_columns=False,  # the collator needs the raw "image" and "caption"
        dataloader_num_workers=0,
        # Without CUDA, a multi-process launch (torchrun, `accelerate launch --multi_gpu`) sets up gloo data
        # parallelism only when the arguments name the CPU; otherwise each process would train alone.
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        data_seed=args.seed,
    )


def train_with_trainer(
    args: argparse.Namespace, training_args: TrainingArguments, model, processor, train_dataset, resume_from
) -> tuple[Trainer, dict]:
    """Trains `model` with the `Trainer` (data-parallel under a launcher); returns the trainer and what it logged.
    Ctrl-C ends the process with status 130 once the checkpoint is saved."""
    collator = StepSeededCollator(
        CaptioningCollator(processor, word_dropout=args.word_dropout), args.seed, training_args.process_index
    )
    stop_callback = StopCallback(args.max_minutes)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[collator, stop_callback],
    )
    with stop_callback:
        train_output = trainer.train(resume_from_checkpoint=resume_from)
    if stop_callback.interrupted:
        if trainer.is_world_process_zero():
            checkpoint = get_last_checkpoint(training_args.output_dir)
            print(
                f"Stopped after step {trainer.state.global_step}; the checkpoint is {checkpoint}. Continue with the "
                "same command and --resume.",
                file=sys.stderr,
            )
        sys.exit(130)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    training = {
        "train_steps": train_output.global_step,
        "final_train_loss": losses[-1] if losses else train_output.training_loss,
        "train_losses": losses,  # every `--logging-steps` steps, averaged over the processes
    }
    return trainer, training


def train_with_fsdp(
    args: argparse.Namespace, model: PalmEForConditionalGeneration, processor, train_dataset, resume_from
) -> tuple[PalmEForConditionalGeneration | None, dict]:
    """
    Shards `model` with FSDP2 and trains it as the `Trainer` route does (AdamW, weight decay but on biases and
    norms, cosine schedule after a warmup, gradients clipped to norm 1), for `--epochs` epochs of global batches
    (the last, partial batch of each dropped), checkpointing into `--output-dir/checkpoints`. Returns the trained
    model, whole and unsharded, in the first process (None in the others) and what was logged. Ctrl-C ends the
    process with status 130 once every process has saved its shards.
    """
    checkpoints_dir = os.path.join(args.output_dir, CHECKPOINTS_DIR)
    max_steps = max(1, math.ceil(args.epochs * (len(train_dataset) // args.batch_size)))
    # The Trainer's rule, which reads nothing of the Trainer: no weight decay on biases and normalization weights.
    decay_names = set(Trainer.get_decay_parameter_names(None, model))
    shard_model(model, reshard_after_forward=args.fsdp == "full")
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [parameters[name] for name in parameters if name in decay_names], "weight_decay": WEIGHT_DECAY},
            {"params": [parameters[name] for name in parameters if name not in decay_names], "weight_decay": 0.0},
        ],
        lr=args.learning_rate,
    )
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(WARMUP_RATIO * max_steps), max_steps)
    step_losses, interrupted = train_sharded(
        model,
        optimizer,
        train_dataset,
        CaptioningCollator(processor, word_dropout=args.word_dropout),
        global_batch_size=args.batch_size,
        max_steps=max_steps,
        seed=args.seed,
        lr_scheduler=lr_scheduler,
        checkpoints_dir=checkpoints_dir,
        save_steps=args.save_steps,
        resume_from=resume_from,
    )
    if interrupted:
        exit_interrupted(checkpoints_dir, len(step_losses))
    weights = full_state_dict(model)
    losses = logged_losses(step_losses, args.logging_steps)
    training = {"train_steps": len(step_losses), "final_train_loss": step_losses[-1], "train_losses": losses}
    if rank_and_world_size()[0] != 0:
        return None, training
    trained = PalmEForConditionalGeneration(model.config)
    trained.load_state_dict(weights)
    trained.generation_config = model.generation_config
    return trained, training


def main(argv: list[str] | None = None) -> Trainer | None:
    """Trains, then scores and writes the captioner (in the first process); returns the `Trainer` (None with
    `--fsdp`)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    set_seed(args.seed)
    if args.fsdp:
        init_process_group()
    try:
        check_output_paths(args)
        model, processor = new_captioner(args) if args.init_from is None else load_captioner(args)
        train_dataset, held_out = captioning_datasets(args, processor)
        if args.fsdp:
            check_global_batch_size(args.batch_size, len(train_dataset))
            training_args = None
            process_index, num_processes = rank_and_world_size()
        else:
            training_args = training_arguments(args)
            process_index, num_processes = training_args.process_index, training_args.world_size
        resume_from = find_resume_checkpoint(args, num_processes, RESUMABLE_CHANGES, sharded=args.fsdp)
    except (ValueError, OSError) as error:
        exit_with_error(error)
    # Every process has read --output-dir before the main process writes to it (and the Trainer creates it).
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if resume_from is None and process_index == 0:
        start_checkpoints(args, num_processes)

    start = time.monotonic()
    if args.fsdp:
        trainer = None
        model, training = train_with_fsdp(args, model, processor, train_dataset, resume_from)
    else:
        trainer, training = train_with_trainer(args, training_args, model, processor, train_dataset, resume_from)
        model = trainer.model
    train_minutes = (time.monotonic() - start) / 60
    if process_index != 0:
        return trainer
    items = [held_out[index] for index in range(len(held_out))]
    references = [item["caption"] for item in items]
    hypotheses = generate_captions(model, processor, [item["image"] for item in items])
    metrics = {
        "exact_match": exact_match(references, hypotheses),
        "bleu": corpus_bleu(references, hypotheses),
        "num_samples": len(items),
        "dataset": f"`{args.train_dir}`" if args.train_dir else "`palme_hf.synthetic_shapes.SyntheticShapesDataset`",
        "train_minutes": train_minutes,
        **training,
        "num_processes": num_processes,
        "cpu_count": os.cpu_count(),
    }
    if args.robustness_samples:
        # Other held-out scenes than the ones above, which --sample-images-dir shows.
        robustness_seed = args.seed + 1
        fresh = SyntheticShapesDataset(
            args.robustness_samples, "held_out", seed=robustness_seed, image_size=args.image_size
        )
        metrics["robustness"] = robustness_exact_match(
            model, processor, [fresh[i] for i in range(len(fresh))], max_new_tokens=MAX_CAPTION_TOKENS
        )
        metrics["robustness_samples"] = args.robustness_samples
        metrics["robustness_seed"] = robustness_seed
    print(json.dumps(metrics, indent=2))
    for reference, hypothesis in list(zip(references, hypotheses))[:5]:
        print(f"true: {reference}\n  generated: {hypothesis}")
    # The finished captioner replaces --output-dir, and with it the checkpoints.
    with atomic_output_dir(args.output_dir, overwrite=True) as final_dir:
        model.save_pretrained(final_dir)  # weights, config, generation config and the modelling code
        processor.save_pretrained(final_dir)  # image processor and tokenizer
        (Path(final_dir) / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_model_card(Path(final_dir), argv, args, model.config, model.num_parameters(), metrics)
    if args.sample_images_dir is not None:
        write_sample_images(Path(args.sample_images_dir), sample_image_names(args), items)
    return trainer


if __name__ == "__main__":
    try:
        with exit_on_sigterm():
            main()
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one outside it
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    finally:
        # A process that exits with its process group alive can abort in the group's threads ("terminate called
        # without an active exception"), and the launcher then fails the whole run.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
