"""examples/train_from_towers.py: `--lora-rank` with a trainable vision tower trains it, its counts must be positive,
and towers that are missing, not models, or swapped are refused in one line before any work."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel

from palme_hf import PalmEForConditionalGeneration

from helpers import load_script, save_tiny_towers

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_from_towers.py")
TINY_RUN = ["--train-samples", "8", "--batch-size", "4", "--max-steps", "2", "--logging-steps", "1"]


@pytest.fixture(scope="module")
def train_from_towers():
    return load_script("examples", "train_from_towers.py")


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """(vision folder, text folder) of a tiny ViT and a tiny Llama."""
    return save_tiny_towers(tmp_path_factory.mktemp("towers"), "vit", "llama")


@pytest.mark.slow  # trains
def test_lora_with_freeze_language_trains_the_vision_tower(tmp_path, train_from_towers, towers):
    vision_dir, text_dir = towers
    arguments = ["--vision-model", vision_dir, "--text-model", text_dir, *TINY_RUN, "--lora-rank", "2"]
    adapters_only = train_from_towers.main([*arguments, "--output-dir", str(tmp_path / "both"), "--freeze", "both"])
    result = train_from_towers.main([*arguments, "--output-dir", str(tmp_path / "out"), "--freeze", "language"])
    vision = AutoModel.from_pretrained(vision_dir)
    assert result["trainable_parameters"] == adapters_only["trainable_parameters"] + vision.num_parameters()
    trained = PalmEForConditionalGeneration.from_pretrained(tmp_path / "out").model.vision_model.state_dict()
    unchanged = [name for name, value in vision.state_dict().items() if torch.equal(trained[name], value)]
    assert all(name.startswith("pooler.") for name in unchanged), unchanged  # all trained but the unused pooler


@pytest.mark.parametrize("option", ["--max-steps", "--train-samples", "--batch-size", "--logging-steps"])
def test_counts_must_be_positive(option, train_from_towers, capsys):
    """`--max-steps 0` trained one step."""
    with pytest.raises(SystemExit) as refusal:
        train_from_towers.parse_args(["--vision-model", "v", "--text-model", "t", "--output-dir", "o", option, "0"])
    assert refusal.value.code == 2
    assert f"argument {option}: must be a positive integer, got '0'" in capsys.readouterr().err


def test_missing_or_swapped_towers_are_refused_before_any_work(tmp_path, train_from_towers, towers):
    vision_dir, text_dir = towers
    (tmp_path / "empty").mkdir()
    cases = [
        (vision_dir, str(tmp_path / "nowhere"), f"--text-model {tmp_path / 'nowhere'}: no such folder"),
        (str(tmp_path / "empty"), text_dir, f"--vision-model {tmp_path / 'empty'} holds no saved model"),
        (text_dir, text_dir, f"--vision-model {text_dir} holds a llama language model, not a vision encoder"),
        (vision_dir, vision_dir, f"--text-model {vision_dir} holds a vit model, not a causal language model"),
    ]
    for vision, text, message in cases:
        argv = ["--vision-model", vision, "--text-model", text, "--output-dir", str(tmp_path / "out"), *TINY_RUN]
        with pytest.raises(ValueError, match=message):
            train_from_towers.main(argv)
    assert sorted(os.listdir(tmp_path)) == ["empty"]


@pytest.mark.slow  # a Python of its own
def test_the_command_line_prints_one_line_errors(tmp_path, towers):
    vision_dir, text_dir = towers
    command = [EXAMPLE, "--vision-model", text_dir, "--text-model", vision_dir, "--output-dir", str(tmp_path / "out")]
    run = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.startswith(f"error: --vision-model {text_dir} holds a llama language model")
    assert len(run.stderr.splitlines()) == 1
