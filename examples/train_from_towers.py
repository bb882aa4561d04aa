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
"""

import argparse
import json
import os
import tempfile

import torch
from transformers import AutoConfig, Trainer, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import CaptioningCollator
from palme_hf.cli import positive_int
from palme_hf.io_palme import atomic_output_dir, check_output_dir, exit_on_sigterm, exit_with_error, one_line
from palme_hf.synthetic_shapes import SyntheticShapesDataset

FREEZE = {"both": (True, True), "vision": (True, False), "language": (False, True), "none": (False, False)}
# The language model's attention projections, by family (Llama/Qwen2/Gemma/PalmE, GPT-2).
LORA_TARGETS = r"model\.language_model\..*(self_attn\.(q_proj|k_proj|v_proj|o_proj)|attn\.(c_attn|c_proj))$"


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
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--logging-steps", type=positive_int, default=10)
    parser.add_argument("--image-size", type=int, default=64, help="side of the synthetic images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be 0 or positive, got {args.lora_rank}")
    if args.lora_rank and not FREEZE[args.freeze][1]:
        parser.error("--lora-rank adapts a frozen language model: use it with --freeze both or --freeze language")
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Before any work. The towers are inputs, which no output may replace.
    check_output_dir(
        args.output_dir, args.overwrite, {"--vision-model": args.vision_model, "--text-model": args.text_model}
    )
    check_towers(args)
    torch.manual_seed(args.seed)
    processor = PalmEProcessor.from_pretrained_towers(args.vision_model, args.text_model)
    model = PalmEForConditionalGeneration.from_pretrained_towers(
        args.vision_model, args.text_model, projector_type=args.projector_type
    )
    freeze_vision, freeze_language = FREEZE[args.freeze]
    model.freeze_towers(vision_model=freeze_vision, language_model=freeze_language)
    trained = add_lora(model, args.lora_rank) if args.lora_rank else model
    num_trainable = sum(parameter.numel() for parameter in trained.parameters() if parameter.requires_grad)

    train_dataset = SyntheticShapesDataset(
        args.train_samples, split="train", seed=args.seed, image_size=args.image_size
    )
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
        trainer = Trainer(
            model=trained, args=training_args, train_dataset=train_dataset, data_collator=CaptioningCollator(processor)
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

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
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as final_dir:
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
