"""examples/train_captioner.py trains data-parallel in two processes (torch.distributed, gloo) exactly as one
process does with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_captioner.py")
TINY_RUN = [
    "--train-samples", "96", "--eval-samples", "4", "--image-size", "32", "--patch-size", "8", "--hidden-size", "32",
    "--num-layers", "1", "--logging-steps", "1", "--word-dropout", "0", "--learning-rate", "3e-3",
]  # fmt: skip


def train(tmp_path, name, launcher, batch_size):
    output_dir = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*launcher, SCRIPT, "--output-dir", str(output_dir), "--batch-size", str(batch_size), *TINY_RUN]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output_dir / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("train_captioner")
    one = train(tmp_path, "one_process", [sys.executable], batch_size=8)
    # accelerate's CPU launcher (`--cpu`) spawns several processes only through mpirun; `--multi_gpu` starts them
    # with torch.distributed, which uses gloo on a machine without CUDA.
    two = train(
        tmp_path,
        "two_processes",
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
        batch_size=4,
    )  # fmt: skip
    return one, two


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    one, two = runs
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert one["train_steps"] == two["train_steps"] == 12
    assert len(one["train_losses"]) == len(two["train_losses"]) == 12
    assert one["train_losses"][-1] < 0.8 * one["train_losses"][0]  # it learns
    for step, (single, distributed) in enumerate(zip(one["train_losses"], two["train_losses"])):
        assert abs(single - distributed) <= 1e-4 * max(1.0, abs(single)), (step, single, distributed)
