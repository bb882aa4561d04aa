"""The `palme-hf caption` command line captions the sample images with the committed captioner."""

import json
import os

from palme_hf.cli import DEFAULT_CAPTIONER, main

IMAGES = os.path.join(os.path.dirname(DEFAULT_CAPTIONER), "images")


def test_caption_prints_path_and_caption_per_image(capsys):
    with open(os.path.join(IMAGES, "captions.json")) as handle:
        true_captions = json.load(handle)
    assert len(true_captions) >= 8
    paths = [os.path.join(IMAGES, name) for name in sorted(true_captions)]
    assert main(["caption", *paths]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == paths
    captions = {os.path.basename(path): caption for path, caption in (line.split("\t") for line in lines)}
    # the committed captioner names every held-out sample image correctly
    assert captions == true_captions


def test_caption_errors_name_the_problem(tmp_path, capsys):
    assert main(["caption", "--model", str(tmp_path / "nowhere"), os.path.join(IMAGES, "held_out_00.png")]) == 1
    assert "No captioner at" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err
