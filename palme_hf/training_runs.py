"""
Training runs that lose no work, shared by the training scripts (`examples/train_captioner.py`,
`examples/train_embodied.py`) around the Transformers `Trainer` (or sharded, `palme_hf.distributed_palme`): a run keeps
its checkpoints and the options it started with in `OUTPUT_DIR/checkpoints`, `--resume` continues from the last
complete checkpoint only with those options, and Ctrl-C or a time budget stops it after the current step with a
checkpoint.
"""

import argparse
import json
import os
import shutil
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .distributed_palme import StopOnInterrupt, last_checkpoint
from .io_palme import check_model_folder, check_torch_file, read_json_file, read_json_object

CHECKPOINTS_DIR = "checkpoints"  # inside --output-dir, while the run is not finished
OPTIONS_FILE = "training_options.json"  # in CHECKPOINTS_DIR: what --resume must match


def find_resume_checkpoint(
    args: argparse.Namespace,
    num_processes: int,
    resumable_changes: Collection[str],
    sharded: bool = False,
    added_options: Mapping[str, object] | None = None,
) -> str | None:
    """
    Returns the checkpoint to resume from (None for a new run). `--resume` needs a complete last checkpoint (the
    `Trainer`'s: see [`find_trainer_checkpoint`]; with `sharded`, torch distributed checkpoint's: see
    `distributed_palme.last_checkpoint`), and the options the run started with, but for those in `resumable_changes`
    (names of options of `args` that do not change the training) and, for a sharded checkpoint, which loads on any
    number of processes, `num_processes`: otherwise the data order would change. `added_options` maps each option a
    script gained after runs may have started to the value of a run that did not record it (what runs did before).
    """
    if not args.resume:
        return None
    checkpoints_dir = os.path.join(args.output_dir, CHECKPOINTS_DIR)
    if sharded:
        checkpoint = last_checkpoint(checkpoints_dir)
        resumable_changes = {*resumable_changes, "num_processes"}
    else:
        checkpoint = find_trainer_checkpoint(checkpoints_dir, num_processes)
    started_with = {**(added_options or {}), **read_json_file(os.path.join(checkpoints_dir, OPTIONS_FILE))}
    options = {**vars(args), "num_processes": num_processes}
    changed = sorted(
        name
        for name in options.keys() | started_with.keys()
        if name not in resumable_changes and options.get(name) != started_with.get(name)
    )
    if changed:
        differences = ", ".join(
            f"{'--' + name.replace('_', '-') if name in vars(args) else name} {options.get(name)} (started with "
            f"{started_with.get(name)})"
            for name in changed
        )
        raise ValueError(
            f"--resume: {differences}. Resume with the options the run in {args.output_dir} started with."
        )
    return checkpoint


def find_trainer_checkpoint(checkpoints_dir: str, num_processes: int) -> str:
    """The last checkpoint the `Trainer` wrote in `checkpoints_dir` on `num_processes` processes, refused when
    incomplete (model, trainer state, optimizer, schedule and random states, each readable)."""
    checkpoint = get_last_checkpoint(checkpoints_dir) if os.path.isdir(checkpoints_dir) else None
    if checkpoint is None:
        raise ValueError(f"--resume: {checkpoints_dir} holds no checkpoint to resume from.")
    try:
        check_model_folder(checkpoint)
        if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
            raise ValueError(f"{checkpoint} has no trainer_state.json.")
        read_json_object(os.path.join(checkpoint, "trainer_state.json"))
        # The optimizer, the schedule and each process's random states: without one, the run would go on, but not as
        # the uninterrupted run did.
        rng_states = ["rng_state.pth"] if num_processes == 1 else [f"rng_state_{i}.pth" for i in range(num_processes)]
        for name in ["optimizer.pt", "scheduler.pt", *rng_states]:
            check_torch_file(os.path.join(checkpoint, name))
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{error} The checkpoint is incomplete (was its saving cut short?): delete it to resume from the one "
            "before."
        ) from error
    return checkpoint


def start_checkpoints(args: argparse.Namespace, num_processes: int):
    """Records the options of a new run in its checkpoints folder (replacing an old run's, with --overwrite)."""
    checkpoints_dir = os.path.join(args.output_dir, CHECKPOINTS_DIR)
    shutil.rmtree(checkpoints_dir, ignore_errors=True)
    os.makedirs(checkpoints_dir)
    options = {**vars(args), "num_processes": num_processes}
    (Path(checkpoints_dir) / OPTIONS_FILE).write_text(json.dumps(options, indent=2) + "\n")


class StopCallback(StopOnInterrupt, TrainerCallback):
    """
    Stops training after the current step on Ctrl-C (SIGINT, while it is in use: `with stop_callback:` around
    `trainer.train`), saving a checkpoint first, or once `max_minutes` have passed. Under torch.distributed the
    processes agree, so that every process stops after the same step.
    """

    def __init__(self, max_minutes: float | None):
        super().__init__()
        self.max_seconds = None if max_minutes is None else 60 * max_minutes
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        """Starts the clock of `max_minutes`."""
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        """Stops the training after this step on Ctrl-C (saving a checkpoint) or once the time is out."""
        out_of_time = self.max_seconds is not None and time.monotonic() - self.start > self.max_seconds
        stop = torch.tensor([float(self.interrupted), float(out_of_time)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        self.interrupted = bool(stop[0])
        if self.interrupted:
            control.should_save = True
        if stop.any():
            control.should_training_stop = True
