"""
Trains tiny palme-hf models with `palme_hf.distributed_palme` in each process that `torch.distributed.run` starts (or
alone), and writes the losses and the final weights of each case: `python fsdp_worker.py OUTPUT_DIR CASE...`.
tests/test_distributed_palme.py compares runs on one and two processes.
"""

import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from palme_hf.distributed_palme import (
    full_state_dict,
    init_process_group,
    rank_and_world_size,
    shard_model,
    train_sharded,
)

from helpers import tiny_inputs, tiny_model

# The tiny models of tests/helpers.py, by case.
CASES = {
    "cross_attention": dict(variant="reference"),
    "prefix_parallel": dict(variant="prefix", block_type="parallel"),
    "resampler": dict(variant="prefix", num_latents=4),
    "gradient_checkpointing": dict(variant="reference"),
}
STEPS = 3
GLOBAL_BATCH_SIZE = 4


def tiny_dataset(model, size: int = 8) -> list[dict]:
    """Random images and texts of varied length for `model`; padding is labelled -100."""
    pixel_values, input_ids = tiny_inputs(model, batch_size=size, length=9)
    items = []
    for row in range(size):
        labels = input_ids[row].clone()
        labels[-(row % 3) or len(labels) :] = -100  # 0, 2 or 1 padded positions
        items.append({"pixel_values": pixel_values[row], "input_ids": input_ids[row], "labels": labels})
    return items


def stack(items: list[dict]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([item[name] for item in items]) for name in items[0]}


def run_case(case: str, output_dir: str):
    options = dict(CASES[case])
    torch.manual_seed(0)
    model = tiny_model(options.pop("variant"), **options)
    if case == "gradient_checkpointing":
        model.gradient_checkpointing_enable()
    dataset = tiny_dataset(model)
    shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, _ = train_sharded(model, optimizer, dataset, stack, global_batch_size=GLOBAL_BATCH_SIZE, max_steps=STEPS)
    weights = full_state_dict(model)
    if rank_and_world_size()[0] == 0:
        save_file({name: value.contiguous() for name, value in weights.items()}, f"{output_dir}/{case}.safetensors")
        with open(f"{output_dir}/{case}.json", "w") as handle:
            json.dump(losses, handle)


if __name__ == "__main__":
    init_process_group()
    try:
        for case in sys.argv[2:]:
            run_case(case, sys.argv[1])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
