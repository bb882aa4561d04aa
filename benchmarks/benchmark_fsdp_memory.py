"""
What FSDP2 sharding buys: the memory per process of a PaLM-E of pretrained-tower shape (a ViT-Base vision encoder
and a Llama decoder of 1024 wide and 8 layers deep, about 250M parameters, random weights) trained for a few steps
with `palme_hf.distributed_palme` on 1 and on 2 processes (gloo on CPU), fully fine-tuned and with frozen towers.

    python benchmarks/benchmark_fsdp_memory.py            # launches the runs and prints the markdown table

Per process: the bytes of its parameters, gradients and AdamW state (its shards: DTensor local tensors), its
resident memory (RSS) once the model is built (every process builds the whole model) and once it is sharded, and
its peak RSS while training (the peak is reset after sharding). Time is not measured: the machine's cores are
shared.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
from transformers import LlamaConfig, ViTConfig

from palme_hf import PalmEConfig, PalmEForConditionalGeneration
from palme_hf.distributed_palme import init_process_group, rank_and_world_size, shard_model, train_sharded

SETTINGS = {"full fine-tuning": False, "frozen towers": True}
VOCAB_SIZE = 32_000
TEXT_LENGTH = 64


def towers_config() -> PalmEConfig:
    """ViT-Base (64x64 images: 16 patches) and a Llama of 1024 wide, 8 layers, joined by a linear projector."""
    vision = ViTConfig(image_size=64, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    text = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    return PalmEConfig(
        vision_config=vision, text_config=text, vision_integration="prefix", image_token_id=VOCAB_SIZE - 1
    )


def local_bytes(tensors) -> int:
    """The bytes this process holds of `tensors` (of a DTensor, its local shard)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def rss_bytes(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak) of this process, from /proc/self/status."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/self/status has no {field}.")


def synthetic_items(config: PalmEConfig, count: int) -> list[dict]:
    """Random images and texts: the image placeholders, then `TEXT_LENGTH` tokens that carry the loss."""
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    placeholders = torch.full((config.num_image_tokens,), config.image_token_id)
    items = []
    for _ in range(count):
        text = torch.randint(0, VOCAB_SIZE - 1, (TEXT_LENGTH,), generator=generator)
        input_ids = torch.cat([placeholders, text])
        labels = torch.cat([torch.full_like(placeholders, -100), text])
        pixel_values = torch.rand(3, size, size, generator=generator)
        items.append({"pixel_values": pixel_values, "input_ids": input_ids, "labels": labels})
    return items


def stack(items: list[dict]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([item[name] for item in items]) for name in items[0]}


def measure(frozen_towers: bool, steps: int, global_batch_size: int) -> dict:
    """Builds, shards and trains the model in this process; returns its measurements."""
    torch.manual_seed(0)
    config = towers_config()
    model = PalmEForConditionalGeneration(config)
    if frozen_towers:
        model.freeze_towers()
    built_rss = rss_bytes("VmRSS")
    shard_model(model)
    sharded_rss = rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS
        handle.write("5")
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-5)
    items = synthetic_items(config, global_batch_size * steps)
    train_sharded(model, optimizer, items, stack, global_batch_size=global_batch_size, max_steps=steps)
    optimizer_state = [value for state in optimizer.state.values() for value in state.values() if value.ndim > 0]
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return {
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "trainable": sum(parameter.numel() for parameter in trainable),
        "parameter_bytes": local_bytes(model.parameters()),
        # train_sharded frees the gradients after each step (zero_grad): they are as large as the trainable shards
        "gradient_bytes": local_bytes(trainable),
        "optimizer_bytes": local_bytes(optimizer_state),
        "built_rss": built_rss,
        "sharded_rss": sharded_rss,
        "training_peak_rss": rss_bytes("VmHWM"),
    }


def worker(output_dir: str, setting: str, steps: int, global_batch_size: int):
    init_process_group()
    rank, world_size = rank_and_world_size()
    try:
        result = measure(SETTINGS[setting], steps, global_batch_size)
        with open(os.path.join(output_dir, f"{setting}-{world_size}-{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def table(output_dir: str, process_counts: list[int]) -> str:
    gib = 1024**3
    lines = [
        "| setting | processes | parameters / process | gradients / process | AdamW state / process | RSS once built "
        "| RSS once sharded | peak RSS training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        for count in process_counts:
            runs = []
            for rank in range(count):
                with open(os.path.join(output_dir, f"{setting}-{count}-{rank}.json")) as handle:
                    runs.append(json.load(handle))
            first = runs[0]
            name = f"{setting} ({first['trainable'] / 1e6:.0f}M of {first['parameters'] / 1e6:.0f}M trained)"
            cells = [
                max(run[key] for run in runs) / gib
                for key in (
                    "parameter_bytes",
                    "gradient_bytes",
                    "optimizer_bytes",
                    "built_rss",
                    "sharded_rss",
                    "training_peak_rss",
                )
            ]
            lines.append(f"| {name} | {count} | " + " | ".join(f"{cell:.2f} GiB" for cell in cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    # A process of a launch: the folder its measurements go to, and the setting.
    parser.add_argument("--worker", nargs=2, metavar=("DIR", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.steps, args.global_batch_size)
        return
    # One launch per measurement. A fixed mmap threshold makes glibc hand every large tensor's memory back when it
    # is freed, so that the RSS once sharded shows what the process still holds.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}
    with tempfile.TemporaryDirectory() as output_dir:
        for setting in SETTINGS:
            for count in args.processes:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
                command += [str(count), __file__, "--worker", output_dir, setting, "--steps", str(args.steps)]
                command += ["--global-batch-size", str(args.global_batch_size)]
                subprocess.run(command, check=True, env=environment)
        print(table(output_dir, args.processes))


if __name__ == "__main__":
    main()
