"""examples/train_embodied.py, evaluate_embodied.py and embodied_loop.py, in tiny runs: the training saves model,
processor, scores and card; it loses no work (Ctrl-C saves a checkpoint, `--resume` continues the run exactly, a
non-empty output folder is refused); the saved model is scored on held-out examples and closes the loop, its episode
drawn as a strip."""

import json
import os
import signal

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from palme_hf.embodied_tasks import load_embodied_model
from palme_hf.embodied_world import TASKS
from palme_hf.training_runs import StopCallback

from helpers import load_script

TINY_RUN = [
    "--image-size", "32", "--patch-size", "16", "--hidden-size", "32", "--num-layers", "1", "--train-samples", "40",
    "--batch-size", "4", "--max-steps", "6", "--save-steps", "2", "--logging-steps", "1", "--eval-samples", "5",
    "--learning-rate", "3e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def train_embodied():
    return load_script("examples", "train_embodied.py")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, train_embodied):
    """A finished TINY_RUN on the image and the state: its output folder."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    train_embodied.main(["--output-dir", str(output_dir), "--inputs", "image+state", *TINY_RUN])
    return output_dir


def test_a_run_saves_model_processor_scores_and_card(finished):
    assert not (finished / "checkpoints").exists()
    results = json.loads((finished / "eval_results.json").read_text())
    assert results["inputs"] == "image+state" and results["train_steps"] == 6 and len(results["train_losses"]) == 6
    assert results["num_examples"] == 5
    for name in ("question_accuracy", "plan_success", "next_step_accuracy"):
        assert 0.0 <= results[name] <= 1.0
    card = (finished / "README.md").read_text()
    assert "| plan success |" in card and "--inputs image+state" in card
    assert "Captioning" not in card and "examples/embodied_loop.py" in card  # its own intended use
    for encoder in (
        "- state encoder: an MLP from each state vector (44 values) to 4 embedding(s), in place of its placeholder",
        "- object encoder: an MLP from each object vector (10 values) to 1 embedding(s), in place of its placeholder",
    ):
        assert encoder in card
    assert "queries and keys l2-normalised (attention scale 10)" in card
    assert "- It knows only the toy world of its training data" in card and "get captions" not in card
    model, processor, inputs = load_embodied_model(str(finished))
    assert inputs == ("image", "state") and model.config.state_dim == 44 and model.config.object_dim == 10
    assert model.config.num_state_tokens == 4 and model.config.text_config.block_type == "parallel"  # the defaults
    assert model.config.text_config.qk_norm
    assert processor.tokenizer.tokenize("obj_1? A:") == ["obj_1", "?", "A", ":"]


class StopAtStep3(StopCallback):
    """Ctrl-C, as the script's SIGINT handler gets it, during step 3."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            self.interrupt(signal.SIGINT, None)
        return super().on_step_end(args, state, control, **kwargs)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_the_run_exactly(
    finished, train_embodied, tmp_path, monkeypatch
):
    output_dir = tmp_path / "run"
    argv = ["--output-dir", str(output_dir), "--inputs", "image+state", *TINY_RUN]
    with monkeypatch.context() as patch:
        patch.setattr(train_embodied, "StopCallback", StopAtStep3)
        with pytest.raises(SystemExit) as stop:
            train_embodied.main(argv)
    assert stop.value.code == 130
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["checkpoint-2", "checkpoint-3", "training_options.json"]
    assert os.listdir(output_dir) == ["checkpoints"]  # no model until the run is finished

    with pytest.raises(SystemExit, match=r"--resume: --batch-size 2 \(started with 4\)"):
        train_embodied.main([*argv, "--batch-size", "2", "--resume"])
    train_embodied.main([*argv, "--resume"])
    losses = json.loads((output_dir / "eval_results.json").read_text())["train_losses"]
    expected = json.loads((finished / "eval_results.json").read_text())["train_losses"]
    assert len(losses) == len(expected) == 6
    for step, (loss, reference) in enumerate(zip(losses, expected), start=1):
        assert abs(loss - reference) <= 1e-6 * max(1.0, abs(reference)), (step, loss, reference)
    weights, expected_weights = load_file(output_dir / "model.safetensors"), load_file(finished / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected_weights[name], rtol=1e-6, atol=1e-7, msg=name)
    assert "--resume" not in (output_dir / "README.md").read_text()


def test_resume_continues_a_run_started_before_the_options_it_lacks(train_embodied, tmp_path, monkeypatch):
    """A run recorded by an earlier version of the script, without the options added since (`ADDED_OPTIONS`),
    resumes with the options that give what it did."""
    output_dir = tmp_path / "run"
    argv = ["--output-dir", str(output_dir), *TINY_RUN, "--block-type", "standard", "--state-tokens", "2"]
    argv += ["--no-qk-norm"]
    with monkeypatch.context() as patch:
        patch.setattr(train_embodied, "StopCallback", StopAtStep3)
        with pytest.raises(SystemExit):
            train_embodied.main(argv)
    options_file = output_dir / "checkpoints" / "training_options.json"
    options = json.loads(options_file.read_text())
    for name in ("block_type", "state_tokens", "init_from", "tasks", "qk_norm"):
        del options[name]
    options_file.write_text(json.dumps(options))
    with pytest.raises(SystemExit, match=r"--resume: --qk-norm True \(started with False\)"):
        train_embodied.main([*argv[:-1], "--resume"])
    train_embodied.main([*argv, "--resume"])
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["train_steps"] == 6 and len(results["train_losses"]) == 6


def test_resume_refuses_a_checkpoint_of_another_model(train_embodied, tmp_path, monkeypatch):
    """A run started when the script built another model (here: a word fewer, as before `failed` was added) cannot
    continue: the difference is named, and the checkpoint is left as it was."""
    output_dir = tmp_path / "run"
    argv = ["--output-dir", str(output_dir), *TINY_RUN]
    with monkeypatch.context() as patch:
        patch.setattr(train_embodied, "StopCallback", StopAtStep3)
        with pytest.raises(SystemExit):
            train_embodied.main(argv)
    config_file = output_dir / "checkpoints" / "checkpoint-3" / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["vocab_size"] -= 1
    for name in ("image_token_id", "state_token_id", "object_token_id"):
        config[name] -= 1  # the placeholders follow the words
    config_file.write_text(json.dumps(config))
    message = (
        r"holds another model than this script builds \(image_token_id: 58 saved, 59 here; .*vocab_size: 61 saved"
    )
    with pytest.raises(SystemExit, match=message):
        train_embodied.main([*argv, "--resume"])
    assert json.loads(config_file.read_text()) == config


def test_refuses_a_non_empty_output_dir_and_a_resume_without_checkpoints(tmp_path, train_embodied):
    output_dir = tmp_path / "taken"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not empty; pass --overwrite"):
        train_embodied.main(["--output-dir", str(output_dir), *TINY_RUN])
    assert os.listdir(output_dir) == ["notes.txt"]
    with pytest.raises(SystemExit, match="holds no checkpoint to resume from"):
        train_embodied.main(["--output-dir", str(output_dir), *TINY_RUN, "--resume"])
    with pytest.raises(SystemExit):  # argparse: one of them
        train_embodied.parse_args(["--resume", "--overwrite"])
    train_embodied.main(["--output-dir", str(output_dir), *TINY_RUN, "--max-steps", "1", "--overwrite"])
    assert not (output_dir / "notes.txt").exists() and (output_dir / "model.safetensors").exists()
    assert os.listdir(tmp_path) == ["taken"]  # no temporary folder left beside it


def test_init_from_starts_from_a_saved_model_of_the_same_architecture(finished, tmp_path, train_embodied):
    output_dir = tmp_path / "further"
    # learning rate 0: the weights stay those of --init-from, whatever the observations trained on
    argv = ["--output-dir", str(output_dir), *TINY_RUN, "--inputs", "state", "--init-from", str(finished)]
    train_embodied.main([*argv, "--learning-rate", "0", "--max-steps", "1"])
    weights, saved = load_file(output_dir / "model.safetensors"), load_file(finished / "model.safetensors")
    assert weights.keys() == saved.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)
    assert f"trained from `{finished}`" in (output_dir / "README.md").read_text()
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["tasks"] == list(TASKS) and results["inputs"] == "state"

    with pytest.raises(SystemExit, match=r"has another architecture than the options give \(text_config.block_type"):
        train_embodied.main([*argv, "--overwrite", "--block-type", "standard"])
    with pytest.raises(SystemExit, match=r"\(text_config.qk_norm: True saved, False here\)"):
        train_embodied.main([*argv, "--overwrite", "--no-qk-norm"])
    with pytest.raises(SystemExit, match="--init-from"):  # the output would replace its own input
        train_embodied.main(["--output-dir", str(finished), *TINY_RUN, "--init-from", str(finished), "--overwrite"])
    assert (finished / "model.safetensors").is_file()


def test_tasks_chooses_what_is_trained_and_scored(tmp_path, train_embodied, capsys):
    output_dir = tmp_path / "planner"
    train_embodied.main(["--output-dir", str(output_dir), *TINY_RUN, "--tasks", "next_step", "referral"])
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["tasks"] == ["next_step", "referral"] and results["num_examples"] == 5
    assert {"next_step_accuracy", "referral_accuracy", "question_accuracy"} <= set(results)
    assert not {"plan_success", "relation_accuracy", "size_accuracy"} & set(results)
    assert "the tasks next_step, referral in turn" in (output_dir / "README.md").read_text()
    evaluate = load_script("examples", "evaluate_embodied.py")
    report = evaluate.main(["--model", str(output_dir), "--num-samples", "5", "--tasks", "next_step", "referral"])
    assert report["next_step_accuracy"] == results["next_step_accuracy"]  # the examples the training scored
    twice = r"`tasks` must be distinct names of .*, got \('plan', 'plan'\)"
    with pytest.raises(SystemExit, match=twice):
        train_embodied.main(["--output-dir", str(tmp_path / "other"), *TINY_RUN, "--tasks", "plan", "plan"])
    assert not (tmp_path / "other").exists()
    with pytest.raises(SystemExit, match=twice):
        evaluate.main(["--model", str(output_dir), "--tasks", "plan", "plan"])
    with pytest.raises(SystemExit):
        train_embodied.main(["--output-dir", str(tmp_path / "other"), *TINY_RUN, "--tasks", "dance"])
    assert "invalid choice: 'dance'" in capsys.readouterr().err


def test_evaluate_prints_the_held_out_scores(finished, tmp_path, capsys):
    evaluate = load_script("examples", "evaluate_embodied.py")
    output = tmp_path / "scores.json"
    report = evaluate.main(["--model", str(finished), "--num-samples", "5", "--output", str(output)])
    assert json.loads(output.read_text()) == report and report["inputs"] == "image+state"
    # the examples the training scored: the same answers
    assert report["plan_success"] == json.loads((finished / "eval_results.json").read_text())["plan_success"]
    assert "| plan success |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        evaluate.main(["--model", str(finished), "--num-samples", "5", "--output", str(output)])


def test_the_loop_runs_to_the_goal_or_the_budget_and_draws_an_episode(finished, tmp_path):
    loop = load_script("examples", "embodied_loop.py")
    strip = tmp_path / "images" / "loop.png"
    report = loop.main(["--model", str(finished), "--episodes", "2", "--max-steps", "2", "--strip", str(strip)])
    assert report["episodes"] == 2 and 0.0 <= report["success_rate"] <= 1.0 and report["inputs"] == "image+state"
    assert report["replan"] and report["refused_steps"] >= 0
    strict = loop.main(["--model", str(finished), "--episodes", "2", "--max-steps", "2", "--no-replan"])
    assert not strict["replan"] and strict["refused_steps"] <= 2  # a refused step ends its episode
    image = Image.open(strip)
    assert image.width >= 128 and image.height > 128  # the start, and a scene per step executed
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        loop.main(["--model", str(finished), "--episodes", "1", "--strip", str(strip)])


def test_a_folder_without_its_inputs_is_refused(finished, tmp_path):
    (tmp_path / "model").mkdir()
    for name in os.listdir(finished):
        if name != "eval_results.json":
            (tmp_path / "model" / name).write_bytes((finished / name).read_bytes())
    with pytest.raises(
        ValueError, match='does not name the observations the model was trained on: expected an "inputs"'
    ):
        load_embodied_model(str(tmp_path / "model"))
