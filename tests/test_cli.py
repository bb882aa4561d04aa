"""The `palme-hf caption` command line: captions of the sample images with the committed captioner, per-file errors,
argument validation, `--json`; and `generate_captions`, which it shares with the training script."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import generate_captions
from palme_hf.cli import DEFAULT_CAPTIONER, main

from tiny_captioner import build_tokenizer, tiny_config

IMAGES = os.path.join(os.path.dirname(DEFAULT_CAPTIONER), "images")
REPOSITORY = os.path.dirname(os.path.dirname(DEFAULT_CAPTIONER))


@pytest.fixture(scope="module")
def true_captions():
    with open(os.path.join(IMAGES, "captions.json")) as handle:
        return json.load(handle)


def test_caption_prints_path_and_caption_per_image(capsys, true_captions):
    assert len(true_captions) >= 8
    paths = [os.path.join(IMAGES, name) for name in sorted(true_captions)]
    assert main(["caption", *paths]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == paths
    captions = {os.path.basename(path): caption for path, caption in (line.split("\t") for line in lines)}
    # the committed captioner names every held-out sample image correctly
    assert captions == true_captions


@pytest.fixture
def bad_files(tmp_path):
    """A file each for the ways an argument can fail to be an image, with the reason the CLI gives."""
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "folder").mkdir()
    PIL.Image.fromarray(np.full((8, 8), 2.0, np.float32)).save(tmp_path / "bright.tiff")
    PIL.Image.fromarray(np.full((8, 8), -1, np.int32)).save(tmp_path / "negative.tiff")
    return {
        str(tmp_path / "missing.png"): "no such file",
        str(tmp_path / "text.png"): "could not read an image from",
        str(tmp_path / "folder"): "is a directory",
        str(tmp_path / "bright.tiff"): r"values in [0, 1], got values in [2, 2]",
        str(tmp_path / "negative.tiff"): r"got values in [-1, -1]",
    }


def test_bad_files_get_one_line_each_and_the_rest_are_captioned(capsys, true_captions, bad_files):
    good = [os.path.join(IMAGES, name) for name in sorted(true_captions)[:3]]
    bad = list(bad_files)
    # good and bad interleaved, in batches of 2
    assert main(["caption", "--batch-size", "2", good[0], *bad[:3], good[1], *bad[3:], good[2]]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{path}\t{true_captions[os.path.basename(path)]}" for path in good]
    errors = err.splitlines()
    assert len(errors) == len(bad) and "Traceback" not in err
    for line, (path, reason) in zip(errors, bad_files.items()):
        assert line.startswith(f"palme-hf: error: {path}: ") and reason in line


def test_json_output(capsys, true_captions, bad_files, tmp_path):
    good = os.path.join(IMAGES, sorted(true_captions)[0])
    clipped = np.full((64, 64), 0.5, np.float32)
    clipped[0, 0] = 1.0005
    PIL.Image.fromarray(clipped).save(tmp_path / "clipped.tiff")
    missing = next(iter(bad_files))
    assert main(["caption", "--json", good, missing, str(tmp_path / "clipped.tiff")]) == 1
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert [result["path"] for result in results] == [good, missing, str(tmp_path / "clipped.tiff")]
    assert results[0] == {"path": good, "caption": true_captions[os.path.basename(good)], "error": None}
    assert results[1] == {"path": missing, "caption": None, "error": "no such file"}
    assert isinstance(results[2]["caption"], str) and results[2]["error"] is None
    assert err.splitlines() == [
        f"palme-hf: warning: {tmp_path / 'clipped.tiff'}: PalmEImageProcessor: clipped a floating-point image with "
        "values in [0.5, 1.0005] to [0, 1].",
        f"palme-hf: error: {missing}: no such file",
    ]
    assert main(["caption", "--json", good]) == 0
    assert json.loads(capsys.readouterr().out)[0]["error"] is None


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
        (["--batch-size", "-1"], "argument --batch-size: must be a positive integer, got '-1'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be a positive integer, got '0'"),
        (["--max-new-tokens", "two"], "argument --max-new-tokens: must be a positive integer, got 'two'"),
        ([], "the following arguments are required: IMAGE"),
    ],
)
def test_invalid_arguments_exit_2(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", *arguments, *([os.path.join(IMAGES, "held_out_00.png")] if arguments else [])])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_captioner_that_cannot_be_loaded(tmp_path, capsys):
    image = os.path.join(IMAGES, "held_out_00.png")
    assert main(["caption", "--model", str(tmp_path / "nowhere"), image]) == 1
    assert "No captioner at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for folder in ("empty", "broken"):
        assert main(["caption", "--model", str(tmp_path / folder), image]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"palme-hf: error: No captioner at '{tmp_path / folder}': ")
        assert len(err.splitlines()) == 1


def test_command_line_entry_point_has_no_traceback(tmp_path, true_captions):
    paths = os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))
    image = os.path.join(IMAGES, "held_out_00.png")
    run = subprocess.run(
        [sys.executable, "-m", "palme_hf.cli", "caption", image, "missing.png"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": paths},
        cwd=tmp_path,
    )
    assert run.returncode == 1
    assert run.stdout == f"{image}\t{true_captions['held_out_00.png']}\n"
    assert run.stderr == "palme-hf: error: missing.png: no such file\n"


@pytest.mark.parametrize("cross_attend", [True, False])
def test_generate_captions_prompts_each_integration(cross_attend):
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), cross_attend=cross_attend)
    model = PalmEForConditionalGeneration(config)
    processor = PalmEProcessor.from_model_config(config, tokenizer)
    images = [PIL.Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "green")]
    captions = generate_captions(model, processor, images, batch_size=2, max_new_tokens=3)
    assert len(captions) == 3 and all(caption == caption.strip() for caption in captions)
    assert captions == generate_captions(model, processor, images, batch_size=1, max_new_tokens=3)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        generate_captions(model, processor, images, batch_size=0)
