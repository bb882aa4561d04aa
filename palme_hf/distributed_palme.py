"""
Sharded training (torch's FSDP2, `fully_shard`) of palme-hf models on any number of processes, with sharded
checkpoints that survive Ctrl-C and resume on any number of processes. Tooling, not a model file: what the training
examples share (`examples/train_from_towers.py --fsdp`, `examples/train_captioner.py --fsdp`).

Why not the `Trainer`'s FSDP (its `fsdp` arguments, or an FSDP config of `accelerate launch`): on a machine without
accelerators, accelerate 1.x switches FSDP (and DeepSpeed) on only for GPU-like process groups, so the `Trainer`
silently trains data-parallel (DDP) instead, every process holding the whole model. `train_sharded` drives
`fully_shard` itself, and works the same on GPUs; `accelerate launch` starts its processes as torchrun does.

Every process collates the whole global batch and keeps its own rows, so that the batch (padding and random draws
included) is the one a single process sees; the loss is the mean over the global batch's predicted tokens, so that
N processes train as one process does, and a run resumed on another number of processes continues the same curve.
"""

import argparse
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.optim.lr_scheduler import LRScheduler

CHECKPOINT_PREFIX = "checkpoint-"
# Written by the first process once every process has written its shards: a checkpoint without it is incomplete.
TRAINING_STATE_FILE = "training_state.json"
KEEP_CHECKPOINTS = 2  # the one before the last survives a save that is cut short


def add_fsdp_argument(parser: argparse.ArgumentParser):
    """The training scripts' `--fsdp full|partial` option (None without it): `shard_model`'s `reshard_after_forward`
    True or False."""
    parser.add_argument(
        "--fsdp",
        choices=["full", "partial"],
        default=None,
        help="shard over the launched processes with FSDP2: full (parameters gathered for each pass) or partial "
        "(kept gathered from forward to backward)",
    )


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group():
    """Joins the processes a launcher (`torchrun`, `accelerate launch`) started: nccl where each has a GPU, gloo
    otherwise. A process started without a launcher is a group of one (FSDP2 and its checkpoints need a group)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """
    The modules that `shard_model` shards one by one: those of the classes in `_no_split_modules` of the model (a
    PEFT model's base model), which Transformers gathers from its sub-models (a pretrained tower's layers
    included). Each is gathered whole for its forward and backward pass and freed after it.
    """
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    unit_classes = set(base_model._no_split_modules or [])
    return [module for module in model.modules() if module is not model and type(module).__name__ in unit_classes]


def shard_model(model: torch.nn.Module, reshard_after_forward: bool = True) -> torch.nn.Module:
    """
    Shards `model` in place over the processes of the default group with FSDP2 (`fully_shard`): each unit of
    [`fsdp_units`], then the root, which holds what is left (the embeddings tied to the head, the projector). With
    `reshard_after_forward=False` (partial sharding, ZeRO-2) the gathered parameters stay from the forward to the
    backward pass: less communication, more memory.
    """
    units = fsdp_units(model)
    if not units:
        raise ValueError(
            f"{type(model).__name__} names no module class in `_no_split_modules` that it holds: nothing to shard "
            "one by one."
        )
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def check_global_batch_size(global_batch_size: int, dataset_size: int):
    """Refuses a global batch that the processes cannot split evenly, or that the dataset cannot fill once."""
    world_size = rank_and_world_size()[1]
    if global_batch_size % world_size:
        raise ValueError(
            f"The global batch of {global_batch_size} items does not split over {world_size} processes: give a "
            "multiple of the number of processes."
        )
    if dataset_size < global_batch_size:
        raise ValueError(f"The dataset holds {dataset_size} items, fewer than a global batch of {global_batch_size}.")


def global_batch_indices(dataset_size: int, global_batch_size: int, seed: int, step: int) -> list[int]:
    """
    The dataset indices of the global batch of training step `step` (counted from 0): each epoch is a permutation
    of the dataset drawn from `seed` and the epoch, read in order; the last, partial batch of an epoch is dropped.
    The same on any number of processes. The dataset holds one global batch at least ([`check_global_batch_size`]).
    """
    epoch, batch = divmod(step, dataset_size // global_batch_size)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[batch * global_batch_size : (batch + 1) * global_batch_size].tolist()


def local_rows(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This process's rows of a collated global batch (whose size the number of processes divides)."""
    rows = next(iter(batch.values())).shape[0] // world_size
    return {name: value[rank * rows : (rank + 1) * rows] for name, value in batch.items()}


def checkpoint_steps(checkpoints_dir: str) -> list[int]:
    """The steps of the `checkpoint-N` folders in `checkpoints_dir`, in order."""
    if not os.path.isdir(checkpoints_dir):
        return []
    names = [name for name in os.listdir(checkpoints_dir) if name.startswith(CHECKPOINT_PREFIX)]
    return sorted(int(name[len(CHECKPOINT_PREFIX) :]) for name in names if name[len(CHECKPOINT_PREFIX) :].isdigit())


def last_checkpoint(checkpoints_dir: str) -> str:
    """
    The last checkpoint in `checkpoints_dir`. One that is incomplete (a save cut short: no `training_state.json`, or
    no `.metadata` of torch distributed checkpoint) is refused, naming it.
    """
    steps = checkpoint_steps(checkpoints_dir)
    if not steps:
        raise ValueError(f"--resume: {checkpoints_dir} holds no checkpoint to resume from.")
    checkpoint = os.path.join(checkpoints_dir, f"{CHECKPOINT_PREFIX}{steps[-1]}")
    for name in (TRAINING_STATE_FILE, ".metadata"):
        if not os.path.isfile(os.path.join(checkpoint, name)):
            raise ValueError(
                f"--resume: {checkpoint} has no {name}: the checkpoint is incomplete (was its saving cut short?). "
                "Delete it to resume from the one before."
            )
    return checkpoint


def checkpoint_state(model, optimizer, lr_scheduler: LRScheduler | None) -> dict:
    """What a checkpoint holds, as torch distributed checkpoint saves and loads it: this process's shards of the model
    and the optimizer, and the learning rate schedule (when there is one)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if lr_scheduler is not None:
        state["lr_scheduler"] = lr_scheduler
    return state


def save_checkpoint(
    checkpoints_dir: str, step: int, model, optimizer, losses: list[float], lr_scheduler: LRScheduler | None = None
):
    """
    Every process writes its shards of the model and the optimizer, and the learning rate schedule (torch distributed
    checkpoint), into `checkpoints_dir/checkpoint-STEP`; then the first process writes `training_state.json`, which
    marks the checkpoint complete, and deletes all but the last `KEEP_CHECKPOINTS` checkpoints.
    """
    rank, world_size = rank_and_world_size()
    checkpoint = os.path.join(checkpoints_dir, f"{CHECKPOINT_PREFIX}{step}")
    dcp.save(checkpoint_state(model, optimizer, lr_scheduler), checkpoint_id=checkpoint)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        state = {"step": step, "losses": losses, "num_processes": world_size}
        with open(os.path.join(checkpoint, TRAINING_STATE_FILE), "w") as handle:
            json.dump(state, handle, indent=2)
        for old_step in checkpoint_steps(checkpoints_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(os.path.join(checkpoints_dir, f"{CHECKPOINT_PREFIX}{old_step}"))
    if world_size > 1:
        dist.barrier()


def load_checkpoint(checkpoint: str, model, optimizer, lr_scheduler: LRScheduler | None = None) -> dict:
    """Loads the shards of `checkpoint` (written on any number of processes) into `model`, `optimizer` and
    `lr_scheduler`; returns its training state (`step`, `losses`)."""
    state = checkpoint_state(model, optimizer, lr_scheduler)
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    with open(os.path.join(checkpoint, TRAINING_STATE_FILE)) as handle:
        return json.load(handle)


class StopOnInterrupt:
    """
    While in use, Ctrl-C (SIGINT) asks training to stop after the current step; a second Ctrl-C aborts at once.
    `should_stop()` is agreed by all processes, so that they stop after the same step.
    """

    def __init__(self):
        self.interrupted = False
        self.previous_handler = None

    def interrupt(self, signum, frame):
        """The SIGINT handler: remembers the request and restores the default handler."""
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("Interrupted: saving a checkpoint after this step (Ctrl-C again aborts at once).", file=sys.stderr)

    def __enter__(self):
        self.previous_handler = signal.signal(signal.SIGINT, self.interrupt)
        return self

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGINT, self.previous_handler)

    def should_stop(self) -> bool:
        """Whether Ctrl-C reached any process (a collective: every process calls it after each step)."""
        stop = torch.tensor([float(self.interrupted)])
        if rank_and_world_size()[1] > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())


def train_sharded(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Sequence,
    collator: Callable[[list], dict[str, torch.Tensor]],
    *,
    global_batch_size: int,
    max_steps: int,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    lr_scheduler: LRScheduler | None = None,
    checkpoints_dir: str | None = None,
    save_steps: int = 500,
    resume_from: str | None = None,
) -> tuple[list[float], bool]:
    """
    Trains a model that [`shard_model`] sharded with `optimizer` (made after sharding, of its trainable parameters),
    for `max_steps` steps of `global_batch_size` items (a multiple of the number of processes), with gradients
    clipped to `max_grad_norm`; `lr_scheduler` (of `optimizer`), if given, steps after each step.
    With `checkpoints_dir`, saves a checkpoint every `save_steps` steps, at the end, and after the step Ctrl-C stops.
    `resume_from` (a checkpoint of [`last_checkpoint`]) continues a run: same data order and losses.

    Returns the loss of every step (the mean over the global batch's predicted tokens) and whether Ctrl-C stopped
    the run. The model stays sharded: [`full_state_dict`] gathers it.
    """
    rank, world_size = rank_and_world_size()
    check_global_batch_size(global_batch_size, len(dataset))
    trainable = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    losses, step = [], 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, lr_scheduler)
        losses, step = state["losses"], state["step"]
    model.train()
    with StopOnInterrupt() as stopper:
        while step < max_steps:
            indices = global_batch_indices(len(dataset), global_batch_size, seed, step)
            with torch.random.fork_rng(devices=[]):  # the collator's random draws depend on the seed and step alone
                torch.manual_seed(seed * 1_000_003 + step)
                batch = collator([dataset[index] for index in indices])
            # The sum of the token losses over the processes' rows, divided by the global batch's predicted tokens
            # (FSDP averages the gradients over the processes: hence the per-process share of the count).
            num_items_in_batch = (batch["labels"][:, 1:] != -100).sum() / world_size
            outputs = model(**local_rows(batch, rank, world_size), num_items_in_batch=num_items_in_batch)
            outputs.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            if lr_scheduler is not None:
                lr_scheduler.step()
            loss = outputs.loss.detach()
            if world_size > 1:
                dist.all_reduce(loss)  # a sum: gloo has no average
                loss = loss / world_size
            losses.append(loss.item())
            step += 1
            if rank == 0:
                print(f"step {step}/{max_steps}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
            interrupted = stopper.should_stop()
            if checkpoints_dir is not None and (interrupted or step == max_steps or step % save_steps == 0):
                save_checkpoint(checkpoints_dir, step, model, optimizer, losses, lr_scheduler)
            if interrupted:
                return losses, True
    return losses, False


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, gathered on CPU in the first process (empty in the others). Every
    process must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def exit_interrupted(checkpoints_dir: str, steps_done: int):
    """Ends a run that Ctrl-C stopped (`train_sharded` returned `True`) once its checkpoint is saved: the first process
    says where it is and how to continue; every process exits with status 130, as a shell's command does on Ctrl-C."""
    if rank_and_world_size()[0] == 0:
        print(
            f"Stopped after step {steps_done}; the checkpoints are in {checkpoints_dir}. Continue with the same "
            "command and --resume.",
            file=sys.stderr,
        )
    sys.exit(130)


def logged_losses(step_losses: list[float], logging_steps: int) -> list[float]:
    """The losses as the `Trainer` logs them: the mean of each `logging_steps` steps (a last, shorter window is left
    out)."""
    windows = range(0, len(step_losses) - logging_steps + 1, logging_steps)
    return [sum(step_losses[start : start + logging_steps]) / logging_steps for start in windows]
