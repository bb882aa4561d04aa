"""examples/train_captioner.py trains data-parallel in two processes (torch.distributed, gloo) exactly as one
process does with the same global batch; it loses no work: Ctrl-C saves a checkpoint and `--resume` continues the
run exactly, a non-empty output folder is refused, a failure leaves no half-written model, and `--init-from`
fine-tunes a saved captioner, the shipped one too, on a folder of one's own captioned images (`--train-dir`)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from palme_hf.cli import DEFAULT_CAPTIONER
from palme_hf.cli import main as cli_main
from palme_hf.synthetic_shapes import SyntheticShapesDataset

from helpers import BROKEN_MODEL_FOLDERS, break_model_folder, load_script, read_only_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_captioner.py")
TINY_RUN = [
    "--train-samples", "96", "--eval-samples", "4", "--image-size", "32", "--patch-size", "8", "--hidden-size", "32",
    "--num-layers", "1", "--logging-steps", "1", "--word-dropout", "0", "--learning-rate", "3e-3",
    "--robustness-samples", "2",
]  # fmt: skip
# 60 steps, so that the run is still training when the test's Ctrl-C arrives; with word dropout, whose random draws a
# resumed run must repeat as well as the data order.
RESUMABLE_RUN = [
    "--train-samples", "480", "--batch-size", "8", "--eval-samples", "2", "--image-size", "32", "--patch-size", "8",
    "--hidden-size", "32", "--num-layers", "1", "--logging-steps", "1", "--word-dropout", "0.5",
    "--learning-rate", "3e-3", "--robustness-samples", "2",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.slow  # runs the training script, in processes of its own


def run_script(cwd, *arguments):
    command = [sys.executable, SCRIPT, *arguments]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def train(tmp_path, name, launcher, batch_size):
    output_dir = tmp_path / name
    command = [*launcher, SCRIPT, "--output-dir", str(output_dir), "--batch-size", str(batch_size), *TINY_RUN]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
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


@pytest.fixture(scope="module")
def train_captioner():
    """The script as a module, to run `main` in-process where no subprocess is needed."""
    return load_script("examples", "train_captioner.py")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A finished RESUMABLE_RUN: its output folder."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    result = run_script(tmp_path, "--output-dir", str(tmp_path / "run"), *RESUMABLE_RUN)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path / "run"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """RESUMABLE_RUN (checkpoints every 2 steps) stopped by SIGINT once it has logged 3 steps: (output folder,
    exit code, stderr)."""
    tmp_path = tmp_path_factory.mktemp("interrupted")
    output_dir = tmp_path / "run"
    command = [sys.executable, SCRIPT, "--output-dir", str(output_dir), *RESUMABLE_RUN, "--save-steps", "2"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)
        logged_steps = 0
        for line in process.stdout:  # the Trainer prints the logs of every step (`--logging-steps 1`)
            logged_steps += "'loss'" in line
            if logged_steps == 3:
                process.send_signal(signal.SIGINT)  # what Ctrl-C sends
                break
        process.stdout.read()
        code = process.wait(timeout=600)
    return output_dir, code, (tmp_path / "stderr.txt").read_text()


def checkpoint_steps(output_dir):
    names = os.listdir(output_dir / "checkpoints")
    return sorted(int(name.split("-")[1]) for name in names if name.startswith("checkpoint-"))


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_the_run_exactly(interrupted, uninterrupted, tmp_path):
    output_dir, code, stderr = interrupted
    assert code == 130, stderr[-4000:]
    assert "Traceback" not in stderr
    steps = checkpoint_steps(output_dir)
    stopped = steps[-1]
    assert 3 <= stopped < 60, stopped
    assert f"Stopped after step {stopped}" in stderr and "--resume" in stderr
    assert len(steps) <= 2 and all(step % 2 == 0 for step in steps[:-1])  # every --save-steps, the last two kept
    assert os.listdir(output_dir) == ["checkpoints"]  # no model until the run is finished

    resumed = tmp_path / "moved"  # a folder may move between the interruption and the resumption
    shutil.copytree(output_dir, resumed)
    result = run_script(tmp_path, "--output-dir", str(resumed), *RESUMABLE_RUN, "--resume")
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (resumed / "checkpoints").exists()

    losses = json.loads((resumed / "eval_results.json").read_text())["train_losses"]
    expected = json.loads((uninterrupted / "eval_results.json").read_text())["train_losses"]
    assert len(losses) == len(expected) == 60
    for step, (loss, reference) in enumerate(zip(losses, expected), start=1):
        assert abs(loss - reference) <= 1e-6 * max(1.0, abs(reference)), (step, loss, reference)
    weights = load_file(resumed / "model.safetensors")
    expected_weights = load_file(uninterrupted / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected_weights[name], rtol=1e-6, atol=1e-7, msg=name)
    assert "--resume" not in (resumed / "README.md").read_text()  # the card gives the command to reproduce it


def test_refuses_a_non_empty_output_dir_and_leaves_it_as_it_was(tmp_path, train_captioner):
    output_dir = tmp_path / "taken"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    result = run_script(tmp_path, "--output-dir", str(output_dir), *TINY_RUN)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {output_dir} is not empty; pass --overwrite" in result.stderr
    assert os.listdir(output_dir) == ["notes.txt"] and (output_dir / "notes.txt").read_text() == "mine"

    train_captioner.main(["--output-dir", str(output_dir), *TINY_RUN, "--train-samples", "16", "--overwrite"])
    assert not (output_dir / "notes.txt").exists() and (output_dir / "model.safetensors").exists()
    assert os.listdir(tmp_path) == ["taken"]  # no temporary folder left beside it


def test_a_failure_at_the_end_leaves_the_checkpoints_to_resume_from(tmp_path, train_captioner, monkeypatch):
    output_dir = tmp_path / "run"
    argv = ["--output-dir", str(output_dir), *TINY_RUN, "--train-samples", "16", "--batch-size", "8"]

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(train_captioner, "write_model_card", fail)
        with pytest.raises(OSError, match="No space left"):
            train_captioner.main(argv)
    assert os.listdir(tmp_path) == ["run"] and os.listdir(output_dir) == ["checkpoints"]
    assert checkpoint_steps(output_dir) == [2]  # the end of training saves one
    trainer = train_captioner.main([*argv, "--resume"])
    assert trainer.state.global_step == 2 and (output_dir / "model.safetensors").exists()


INCOMPLETE = "The checkpoint is incomplete (was its saving cut short?)"


@pytest.mark.parametrize(
    "case",
    ["changed option", "truncated weights", "no config.json", "no checkpoint", "no optimizer.pt", "no scheduler.pt",
     "truncated trainer_state.json", "truncated optimizer.pt", "truncated scheduler.pt", "truncated rng_state.pth"],
)  # fmt: skip
def test_resume_refuses(case, interrupted, tmp_path, train_captioner):
    output_dir = tmp_path / "run"
    shutil.copytree(interrupted[0], output_dir)
    checkpoint = output_dir / "checkpoints" / f"checkpoint-{checkpoint_steps(output_dir)[-1]}"
    options = []
    if case == "changed option":
        options, message = ["--batch-size", "4"], "--resume: --batch-size 4 (started with 8)"
    elif case == "truncated weights":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        message = f"{weights} is not a readable safetensors file (truncated?)"
    elif case == "no config.json":
        (checkpoint / "config.json").unlink()
        message = f"{checkpoint} has no config.json"
    elif case == "no checkpoint":
        shutil.rmtree(output_dir / "checkpoints")
        message = f"--resume: {output_dir / 'checkpoints'} holds no checkpoint"
    elif case.startswith("no "):  # the optimizer and the schedule restarted silently
        (checkpoint / case[3:]).unlink()
        message = f"{checkpoint / case[3:]} is missing. {INCOMPLETE}"
    else:
        path = checkpoint / case.split()[1]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        message = f"{path} is not {'valid JSON' if path.suffix == '.json' else 'a readable torch.save file'}"
    with pytest.raises(SystemExit) as refusal:
        train_captioner.main(["--output-dir", str(output_dir), *RESUMABLE_RUN, *options, "--resume"])
    assert message in str(refusal.value.code)
    assert case in ("changed option", "no checkpoint") or INCOMPLETE in str(refusal.value.code)


def test_init_from_fine_tunes_a_saved_captioner(uninterrupted, tmp_path, train_captioner):
    output_dir = tmp_path / "fine_tuned"
    argv = ["--init-from", str(uninterrupted), "--output-dir", str(output_dir), "--image-size", "32"]  # as the model
    options = ["--train-samples", "16", "--batch-size", "8", "--logging-steps", "1", "--robustness-samples", "2"]
    trainer = train_captioner.main([*argv, *options])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trained = json.loads((uninterrupted / "eval_results.json").read_text())["train_losses"]
    assert losses[0] < 0.9 * trained[0]  # it starts from the trained weights, not from new ones
    config = json.loads((output_dir / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 32 and config["vision_config"]["image_size"] == 32
    assert config["vision_config"]["patch_norm_eps"] == 0.1  # the model's, as the script's default
    assert (output_dir / "tokenizer.json").read_text() == (uninterrupted / "tokenizer.json").read_text()
    assert f"fine-tuned from `{uninterrupted}`" in (output_dir / "README.md").read_text()


def test_init_from_takes_the_models_patch_norm_eps_or_a_new_one(uninterrupted, train_captioner, capsys):
    model, _ = train_captioner.load_captioner(train_captioner.parse_args(["--init-from", str(uninterrupted)]))
    assert model.config.vision_config.patch_norm_eps == 0.1  # what the run saved: the script's default
    args = train_captioner.parse_args(["--init-from", str(uninterrupted), "--patch-norm-eps", "0.02"])
    model, _ = train_captioner.load_captioner(args)
    assert model.config.vision_config.patch_norm_eps == 0.02 == args.patch_norm_eps
    assert model.model.vision_model.embeddings.patch_norm.eps == 0.02
    with pytest.raises(SystemExit):
        train_captioner.parse_args(["--init-from", str(uninterrupted), "--patch-norm-eps", "0"])
    assert "--patch-norm-eps must be a positive number, got 0.0" in capsys.readouterr().err


def test_init_from_refuses_a_truncated_model_naming_the_file(uninterrupted, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(uninterrupted, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = run_script(tmp_path, "--init-from", str(model_dir), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {weights} is not a readable safetensors file (truncated?)" in result.stderr
    assert not (tmp_path / "out").exists()


INIT_FROM_REFUSALS = {
    "no config.json": ([], "has no config.json, so it is not a saved model"),
    "no processor": ([], "has no processor"),
    "contradicting options": (["--hidden-size", "64", "--image-size", "32"], "contradicts --hidden-size 64 (the"),
    "a tower": ([], "holds a model of type vit (vision None, text None), not a captioner of palme_hf's own"),
    **{case: ([], message) for case, message in BROKEN_MODEL_FOLDERS.items()},
}


@pytest.mark.parametrize("case", INIT_FROM_REFUSALS)
def test_init_from_refuses(case, uninterrupted, tmp_path, train_captioner):
    options, message = INIT_FROM_REFUSALS[case]
    model_dir = tmp_path / "model"
    shutil.copytree(uninterrupted, model_dir)
    if case == "no config.json":
        (model_dir / "config.json").unlink()
    if case == "no processor":
        (model_dir / "processor_config.json").unlink()
    if case == "a tower":
        (model_dir / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    if case in BROKEN_MODEL_FOLDERS:
        break_model_folder(model_dir, case)
    with pytest.raises(SystemExit) as refusal:
        train_captioner.main(["--init-from", str(model_dir), "--output-dir", str(tmp_path / "out"), *options])
    assert message in str(refusal.value.code) and "\n" not in str(refusal.value.code)
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_is_refused_before_training(interrupted, tmp_path, train_captioner):
    """Once, a run trained fully and then failed at the final save, when the output folder could be written but not
    the folder holding it (where the finished captioner replaces it); so did every --resume."""
    read_only = tmp_path / "read_only"
    shutil.copytree(interrupted[0], read_only / "run")
    (read_only / "new").mkdir()
    with read_only_folder(read_only):
        for name, options in (("new", RESUMABLE_RUN), ("run", [*RESUMABLE_RUN, "--resume"])):
            with pytest.raises(SystemExit) as refusal:
                train_captioner.main(["--output-dir", str(read_only / name), *options])
            assert f"the folder {read_only} is not writable" in str(refusal.value.code)
            assert os.listdir(read_only / "new") == []


def captioned_folder(folder, items) -> list:
    """`items` ({"image", "caption"}) saved as Hugging Face's imagefolder layout: images/NN.png and metadata.jsonl."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for index, item in enumerate(items):
        item["image"].save(folder / "images" / f"{index:02d}.png")
        lines.append(json.dumps({"file_name": f"images/{index:02d}.png", "text": item["caption"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return [str(folder / "images" / f"{index:02d}.png") for index in range(len(items))]


def test_fine_tunes_the_shipped_captioner_on_a_folder_and_captions_with_it(tmp_path, train_captioner, capsys):
    items = [SyntheticShapesDataset(8, "held_out", seed=1, image_size=64)[index] for index in range(8)]
    images = captioned_folder(tmp_path / "mine", items)
    output_dir = tmp_path / "my_captioner"
    train_captioner.main(
        ["--init-from", DEFAULT_CAPTIONER, "--train-dir", str(tmp_path / "mine"), "--eval-dir", str(tmp_path / "mine"),
         "--output-dir", str(output_dir), "--batch-size", "4", "--epochs", "2", "--learning-rate", "1e-4",
         "--logging-steps", "1"]
    )  # fmt: skip
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["num_samples"] == 8
    assert metrics["dataset"] == f"`{tmp_path / 'mine'}`"  # what a later push_to_hub's model card names
    assert metrics["exact_match"] >= 0.75  # the shipped captioner, a little fine-tuned, still names the shapes
    card = (output_dir / "README.md").read_text()
    assert (
        f"The captioned images of `{tmp_path / 'mine'}`" in card and f"fine-tuned from `{DEFAULT_CAPTIONER}`" in card
    )
    capsys.readouterr()

    assert cli_main(["caption", "--model", str(output_dir), *images[:2]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == images[:2]
    assert all(line.split("\t")[1].startswith("a ") for line in lines)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no eval dir", "--train-dir needs --eval-dir"),
        ("not utf-8", "metadata.jsonl, line 1: not UTF-8 text (byte 0xe9"),
        ("outside", "metadata.jsonl, line 2: file_name '../secret.png' leads outside"),
        ("bad image", "1 of the 2 images of {folder} cannot be used: {folder}/images/01.png: could not read an image"),
        ("bad eval image", "1 of the 1 images of {eval} cannot be used: {eval}/00.png: is an empty file (0 bytes)"),
        ("no metadata", "has no metadata.jsonl"),
        ("not json", "metadata.jsonl, line 2: not JSON"),
        ("no text", 'metadata.jsonl, line 1: expected {"file_name": str, "text": str}'),
        ("missing image", "metadata.jsonl, line 1: there is no image file"),
        ("unknown words", "The captions hold 2 words the tokenizer does not know ('hexagon', 'purple')"),
        ("augment", "--augment renders synthetic shapes: it does not apply to the images of --train-dir"),
        ("robustness", "--robustness-samples renders synthetic shapes"),
    ],
)
def test_train_dir_refuses(case, message, tmp_path, train_captioner, capsys):
    folder = tmp_path / "mine"
    captioned_folder(folder, [SyntheticShapesDataset(2, "train", image_size=64)[index] for index in range(2)])
    metadata = folder / "metadata.jsonl"
    lines = metadata.read_text().splitlines()
    if case == "no metadata":
        metadata.unlink()
    elif case == "not json":
        metadata.write_text(lines[0] + "\n{not json\n")
    elif case == "no text":
        metadata.write_text(json.dumps({"file_name": "images/00.png"}) + "\n")
    elif case == "missing image":
        (folder / "images" / "00.png").unlink()
    elif case == "not utf-8":
        metadata.write_bytes(b'{"file_name": "images/00.png", "text": "caf\xe9"}\n')
    elif case == "outside":
        PIL.Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
        metadata.write_text(lines[0] + "\n" + json.dumps({"file_name": "../secret.png", "text": "a circle"}) + "\n")
    elif case == "bad image":
        (folder / "images" / "01.png").write_text("not an image")
    elif case == "bad eval image":
        (tmp_path / "eval").mkdir()
        (tmp_path / "eval" / "00.png").write_bytes(b"")
        (tmp_path / "eval" / "metadata.jsonl").write_text('{"file_name": "00.png", "text": "a small red circle"}\n')
    elif case == "unknown words":
        metadata.write_text(json.dumps({"file_name": "images/00.png", "text": "a small purple hexagon"}) + "\n")
    eval_folder = tmp_path / "eval" if case == "bad eval image" else folder
    eval_dir = [] if case == "no eval dir" else ["--eval-dir", str(eval_folder)]
    synthetic_only = {"augment": ["--augment"], "robustness": ["--robustness-samples", "10"]}.get(case, [])
    argv = [
        "--init-from",
        DEFAULT_CAPTIONER,
        "--train-dir",
        str(folder),
        *eval_dir,
        *synthetic_only,
        "--output-dir",
        str(tmp_path / "out"),
    ]
    with pytest.raises(SystemExit) as refusal:
        train_captioner.main(argv)
    message = message.replace("{folder}", str(folder)).replace("{eval}", str(eval_folder))
    assert message in (str(refusal.value.code) + capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_sample_images_dir_never_replaces_files_without_overwrite(tmp_path, train_captioner):
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "captions.json").write_text("mine")
    (samples / "held_out_00.png").write_text("mine too")
    (samples / "notes.txt").write_text("kept")
    argv = ["--output-dir", str(tmp_path / "out"), *TINY_RUN, "--train-samples", "16", "--eval-samples", "2"]
    with pytest.raises(SystemExit) as refusal:
        train_captioner.main([*argv, "--sample-images-dir", str(samples)])
    assert f"--sample-images-dir {samples} already holds held_out_00.png, captions.json; pass --overwrite" in str(
        refusal.value.code
    )
    assert not (tmp_path / "out").exists()  # refused before training
    with pytest.raises(SystemExit) as refusal:
        train_captioner.main([*argv, "--sample-images-dir", str(samples / "notes.txt")])
    assert f"--sample-images-dir {samples / 'notes.txt'} exists and is not a folder" in str(refusal.value.code)

    train_captioner.main([*argv, "--sample-images-dir", str(samples), "--overwrite"])
    assert sorted(os.listdir(samples)) == ["captions.json", "held_out_00.png", "held_out_01.png", "notes.txt"]
    assert (samples / "notes.txt").read_text() == "kept"  # --overwrite replaces the files it writes, no others
    assert json.loads((samples / "captions.json").read_text()).keys() == {"held_out_00.png", "held_out_01.png"}


def test_trains_the_paper_layout_parallel_block_with_the_image_as_prefix(tmp_path, train_captioner, capsys):
    output_dir = tmp_path / "paper"
    layout = ["--block-type", "parallel", "--vision-integration", "prefix", "--head-dim", "16"]
    train_captioner.main(["--output-dir", str(output_dir), *TINY_RUN, "--train-samples", "32", *layout])
    config = json.loads((output_dir / "config.json").read_text())
    text = config["text_config"]
    assert config["vision_integration"] == "prefix" and text["block_type"] == "parallel"
    assert (text["head_dim"], text["num_attention_heads"], text["num_key_value_heads"]) == (16, 2, 1)
    assert text["alibi_num_heads"] == 0 and text["hidden_act"] == "silu"  # PaLM's block: rotary only, SwiGLU
    added_tokens = json.loads((output_dir / "tokenizer.json").read_text())["added_tokens"]
    assert {"content": "<image>", "id": config["image_token_id"]}.items() <= added_tokens[-1].items()
    assert (
        "the captioning prompt is `<image>`, which the processor expands into the image's 16"
        in (output_dir / "README.md").read_text()
    )
    images = captioned_folder(tmp_path / "images", [SyntheticShapesDataset(2, "held_out", image_size=32)[0]])
    capsys.readouterr()
    assert cli_main(["caption", "--model", str(output_dir), *images]) == 0
    assert capsys.readouterr().out.startswith(f"{images[0]}\t")

    with pytest.raises(SystemExit) as refusal:
        train_captioner.main(
            ["--init-from", str(output_dir), "--output-dir", str(tmp_path / "out"), "--block-type", "standard"]
        )
    assert "contradicts --block-type standard (the model has parallel)" in str(refusal.value.code)
    with pytest.raises(SystemExit):
        train_captioner.parse_args(["--hidden-size", "32", "--head-dim", "12"])
    assert "--hidden-size 32 must be a multiple of --head-dim 12" in capsys.readouterr().err


def test_vision_from_starts_a_paper_layout_captioner_on_a_trained_encoder(uninterrupted, tmp_path, train_captioner):
    layout = ["--block-type", "parallel", "--vision-integration", "prefix", "--hidden-size", "64", "--head-dim", "32"]
    args = train_captioner.parse_args(["--vision-from", str(uninterrupted), *layout])
    model, processor = train_captioner.new_captioner(args)
    trained = load_file(uninterrupted / "model.safetensors")
    encoder = {name: value for name, value in trained.items() if name.startswith("model.vision_model.")}
    assert encoder and all(torch.equal(model.state_dict()[name], value) for name, value in encoder.items())
    assert (args.image_size, args.patch_size, args.patch_norm_eps) == (32, 8, 0.1)  # the encoder's
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.hidden_size, vision.head_dim, text.hidden_size, text.head_dim) == (32, 32, 64, 32)
    assert model.model.multi_modal_projector.weight.shape == (64, 32)  # a new projector between the widths
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id

    output_dir = tmp_path / "paper"
    options = ["--train-samples", "16", "--batch-size", "8", "--eval-samples", "2", "--robustness-samples", "0"]
    train_captioner.main(["--vision-from", str(uninterrupted), "--output-dir", str(output_dir), *layout, *options])
    card = (output_dir / "README.md").read_text()
    assert f"trained on the image encoder of `{uninterrupted}` (its projector and decoder from scratch)" in card
    assert f"--vision-from {uninterrupted}" in card  # in the command that reproduces it


VISION_FROM_REFUSALS = {
    "with --init-from": (["--init-from", "MODEL"], "--init-from fine-tunes a whole captioner and --vision-from"),
    "contradicting options": (["--image-size", "64"], "contradicts --image-size 64 (the model has 32); leave these"),
    "a tower": ([], "--vision-from MODEL holds a model of type vit (vision None, text None), not a captioner of"),
}


@pytest.mark.parametrize("case", VISION_FROM_REFUSALS)
def test_vision_from_refuses(case, uninterrupted, tmp_path, train_captioner, capsys):
    options, message = VISION_FROM_REFUSALS[case]
    model_dir = tmp_path / "model"
    shutil.copytree(uninterrupted, model_dir)
    if case == "a tower":
        (model_dir / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    argv = ["--vision-from", str(model_dir), "--output-dir", str(tmp_path / "out")]
    argv += [str(model_dir) if option == "MODEL" else option for option in options]
    with pytest.raises(SystemExit) as refusal:
        train_captioner.main(argv)
    refused = f"{refusal.value.code}{capsys.readouterr().err}".replace(str(model_dir), "MODEL")
    assert message in refused
    assert not (tmp_path / "out").exists()
