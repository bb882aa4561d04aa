"""The `palme-hf caption` command line: captions of the sample images with the committed captioner, per-file errors,
argument validation, `--json`; and `generate_captions`, which it shares with the training script. The captioner ships
with the package (`palme_hf/captioner`): a non-editable install captions without `--model`, and the folder loads with
`trust_remote_code=True` where palme_hf is not installed. `palme-hf plan`: the closed loop of the shipped embodied
model (`palme_hf/embodied`) toward a goal, its output, strip and errors."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
from transformers.dynamic_module_utils import get_relative_import_files

from palme_hf import PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.captioning import generate_captions
from palme_hf.cli import DEFAULT_CAPTIONER, EMBODIED_PLANNER, PAPER_CAPTIONER, main
from palme_hf.embodied_world import execute, goal_holds, parse_goal, scene_from_json

from conftest import WITHOUT_PALME_HF
from helpers import BROKEN_MODEL_FOLDERS, SAMPLE_IMAGES, break_model_folder, sample_captions, save_tiny_towers
from tiny_captioner import build_tokenizer, tiny_config

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = SAMPLE_IMAGES
SHIPPED_CAPTIONERS = [DEFAULT_CAPTIONER, PAPER_CAPTIONER]
SHIPPED_MODELS = [*SHIPPED_CAPTIONERS, EMBODIED_PLANNER]
SCENE = os.path.join(REPOSITORY, "examples", "scene.json")  # the README's `palme-hf plan` example
GOAL = "put the green triangle right of the blue square"


@pytest.fixture(scope="module")
def true_captions():
    return sample_captions()


def test_caption_prints_path_and_caption_per_image(capsys, true_captions):
    assert len(true_captions) >= 8
    paths = [os.path.join(IMAGES, name) for name in sorted(true_captions)]
    assert main(["caption", *paths]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == paths
    captions = {os.path.basename(path): caption for path, caption in (line.split("\t") for line in lines)}
    # the committed captioner names every held-out sample image correctly
    assert captions == true_captions


def test_caption_with_the_paper_captioner(capsys, true_captions):
    paths = [os.path.join(IMAGES, name) for name in sorted(true_captions)]
    assert main(["caption", "--model", PAPER_CAPTIONER, *paths]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    captions = {os.path.basename(path): caption for path, caption in (line.split("\t") for line in lines)}
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


def test_the_models_ship_with_the_package():
    package = os.path.dirname(os.path.abspath(sys.modules["palme_hf"].__file__))
    assert DEFAULT_CAPTIONER == os.path.join(package, "captioner")
    assert PAPER_CAPTIONER == os.path.join(package, "palme_paper")
    assert EMBODIED_PLANNER == os.path.join(package, "embodied")
    for folder in SHIPPED_MODELS:
        files = set(os.listdir(folder))
        assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    assert "chat_template.jinja" in os.listdir(PAPER_CAPTIONER)  # what vLLM's chat completions render


@pytest.mark.parametrize("folder", SHIPPED_MODELS)
def test_a_shipped_model_links_exactly_the_modules_its_auto_map_needs(folder):
    """The `*_palme.py` files of a shipped model are links to the package's modules (no copies to keep in
    step), and they are the modules its `auto_map` entries import, no more, no fewer."""
    package = os.path.dirname(folder)
    auto_map = {}
    for name in ("config.json", "processor_config.json"):
        with open(os.path.join(folder, name)) as handle:
            config = json.load(handle)
        auto_map.update(config["auto_map"])
        auto_map.update(config.get("image_processor", {}).get("auto_map", {}))
    needed = set()
    for reference in auto_map.values():
        module_file = os.path.join(package, reference.split(".")[0] + ".py")
        needed |= {module_file, *get_relative_import_files(module_file)}
    assert {os.path.basename(path) for path in needed} == {
        os.path.basename(path) for path in glob.glob(os.path.join(folder, "*.py"))
    }
    for path in needed:
        link = os.path.join(folder, os.path.basename(path))
        assert os.path.islink(link) and os.readlink(link) == os.path.join("..", os.path.basename(path)), link


REMOTE_CODE_CAPTIONER = WITHOUT_PALME_HF + textwrap.dedent(
    """
    import json
    import PIL.Image
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, image, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = processor(images=[PIL.Image.open(image)], text=[prompt])
    generated = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    print(json.dumps(processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])))
    """
)


@pytest.mark.slow  # a Python of its own
@pytest.mark.parametrize("folder, prompt", [(DEFAULT_CAPTIONER, ""), (PAPER_CAPTIONER, "<image>")])
def test_a_shipped_captioner_loads_with_remote_code_without_palme_hf(folder, prompt, tmp_path, true_captions):
    image = os.path.join(IMAGES, "held_out_00.png")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_CAPTIONER, folder, image, prompt],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert [caption.strip() for caption in json.loads(run.stdout)] == [true_captions["held_out_00.png"]]


@pytest.mark.slow  # builds and installs the package
def test_a_non_editable_install_captions_with_its_own_captioner(tmp_path, true_captions):
    """`pip install --target` of a copy of the checkout (what setuptools packs, links followed), then its
    `palme-hf caption IMAGE`, without `--model`, with nothing of the checkout on the path."""
    source = tmp_path / "source"  # building writes build/ and *.egg-info beside the sources: not in the checkout
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(REPOSITORY, "palme_hf"), source / "palme_hf", symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(os.path.join(REPOSITORY, name), source / name)
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    shipped = target / "palme_hf" / "captioner"
    for folder in (shipped, target / "palme_hf" / "palme_paper", target / "palme_hf" / "embodied"):
        assert (folder / "model.safetensors").is_file() and not (folder / "modeling_palme.py").is_symlink()
    assert (target / "palme_hf" / "palme_paper" / "chat_template.jinja").is_file()

    image = os.path.join(IMAGES, "held_out_00.png")
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [str(target / "bin" / "palme-hf"), "caption", image], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == f"{image}\t{true_captions['held_out_00.png']}\n"
    paper = subprocess.run(
        [str(target / "bin" / "palme-hf"), "caption", "--model", str(target / "palme_hf" / "palme_paper"), image],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert paper.returncode == 0, paper.stderr[-3000:]
    assert paper.stdout == f"{image}\t{true_captions['held_out_00.png']}\n"
    plan = subprocess.run(
        [str(target / "bin" / "palme-hf"), "plan", SCENE, GOAL], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert plan.returncode == 0 and plan.stdout.endswith("goal holds\n"), plan.stderr[-3000:]
    where = subprocess.run(
        [sys.executable, "-c", "import palme_hf.cli; print(palme_hf.cli.DEFAULT_CAPTIONER)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert where.stdout.strip() == str(shipped)


def test_captions_with_a_model_whose_image_processor_normalizes(tmp_path, capsys):
    """A model built from pretrained towers (as examples/train_from_towers.py saves it) has the vision tower's image
    processor, which normalizes to [-1, 1]; the command line once ran it twice and refused every image."""
    vision_dir, text_dir = save_tiny_towers(tmp_path / "towers", "vit", "llama")
    model = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir)
    processor = PalmEProcessor.from_pretrained_towers(vision_dir, text_dir)
    assert processor.image_processor.do_normalize
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    image = os.path.join(IMAGES, "held_out_00.png")
    expected = generate_captions(model, processor, [PIL.Image.open(image)], max_new_tokens=4)
    assert main(["caption", "--model", str(tmp_path / "model"), "--max-new-tokens", "4", image]) == 0
    assert capsys.readouterr().out == f"{image}\t{expected[0]}\n"


@pytest.mark.parametrize("case", BROKEN_MODEL_FOLDERS)
def test_a_captioner_folder_that_does_not_load_gets_one_line(case, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(DEFAULT_CAPTIONER, model_dir)
    break_model_folder(model_dir, case)
    assert main(["caption", "--model", str(model_dir), os.path.join(IMAGES, "held_out_00.png")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"palme-hf: error: No captioner at '{model_dir}': ")
    assert BROKEN_MODEL_FOLDERS[case] in err
    assert len(err.splitlines()) == 1


def test_images_too_large_or_empty_are_named(tmp_path, capsys, true_captions):
    image = os.path.join(IMAGES, "held_out_00.png")  # 64x64
    (tmp_path / "empty.png").write_bytes(b"")
    assert main(["caption", "--max-image-pixels", "4095", image, str(tmp_path / "empty.png")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"palme-hf: error: {image}: is 64x64 = 4,096 pixels, more than the limit of 4,095 (--max-image-pixels "
        "raises it)",
        f"palme-hf: error: {tmp_path / 'empty.png'}: is an empty file (0 bytes), not an image",
    ]
    assert main(["caption", "--max-image-pixels", "4096", image]) == 0
    assert capsys.readouterr().out == f"{image}\t{true_captions['held_out_00.png']}\n"


def test_a_path_with_a_line_break_keeps_one_line(tmp_path, capsys, true_captions):
    odd = tmp_path / 'two\nlines\t"quoted".png'
    shutil.copy(os.path.join(IMAGES, "held_out_00.png"), odd)
    plain = os.path.join(IMAGES, "held_out_01.png")
    assert main(["caption", str(odd), plain]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    path, caption = lines[0].rsplit("\t", 1)
    assert json.loads(path) == str(odd) and caption == true_captions["held_out_00.png"]
    assert lines[1] == f"{plain}\t{true_captions['held_out_01.png']}"


@pytest.mark.slow  # a Python of its own
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`palme-hf caption *.png | head -1` ended in a BrokenPipeError traceback."""
    paths = os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))
    images = sorted(glob.glob(os.path.join(IMAGES, "*.png")))
    process = subprocess.Popen(
        [sys.executable, "-m", "palme_hf.cli", "caption", *images],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": paths},
        cwd=tmp_path,
    )
    process.stdout.close()  # the reader is gone before the first caption
    assert process.wait(timeout=300) == 141
    assert process.stderr.read() == b""


def test_plan_reaches_the_goal_step_by_step_with_the_shipped_model(capsys):
    """The README's `palme-hf plan examples/scene.json "put the green triangle right of the blue square"`: a scene
    and a goal of the held-out split."""
    assert main(["plan", SCENE, GOAL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "goal holds" and len(lines) > 1
    with open(SCENE) as handle:
        scene = scene_from_json(json.load(handle))
    assert not goal_holds(scene, parse_goal(GOAL))
    for number, line in enumerate(lines[:-1], start=1):
        assert line.startswith(f"{number}. ")
        step = line.split(". ", 1)[1]
        if step.endswith(" - refused"):  # the policy refused it: the scene stays as it was
            with pytest.raises(ValueError, match="Cannot execute"):
                execute(scene, step.removesuffix(" - refused"))
        else:
            scene = execute(scene, step)
    assert goal_holds(scene, parse_goal(GOAL))


def test_plan_prints_json_saves_the_strip_and_keeps_an_existing_one(tmp_path, capsys):
    strip = tmp_path / "episode.png"
    assert main(["plan", SCENE, GOAL, "--json", "--strip", str(strip)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["goal"] == GOAL and result["success"] is True and len(result["steps"]) >= 1
    assert len(result["refused"]) == len(result["steps"]) and not result["refused"][-1]
    with PIL.Image.open(strip) as image:
        assert image.format == "PNG" and image.width > 128 * (len(result["steps"]) + 1)
    before = strip.read_bytes()
    assert main(["plan", SCENE, GOAL, "--strip", str(strip)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"palme-hf: error: {strip} exists; pass --overwrite to replace it.\n"
    assert strip.read_bytes() == before
    assert main(["plan", SCENE, GOAL, "--strip", str(strip), "--overwrite"]) == 0


def test_plan_says_when_the_budget_runs_out_or_the_goal_already_holds(tmp_path, capsys):
    assert main(["plan", SCENE, GOAL, "--max-steps", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("1. move obj_")
    assert lines[1] == "goal not reached within the budget of 1 steps"
    assert main(["plan", SCENE, "put the red circle right of the green triangle"]) == 0
    assert capsys.readouterr().out == "goal holds\n"


def test_plan_names_a_refused_step_and_asks_again_unless_told_not_to(tmp_path, capsys):
    """The blue square stands right beside the green triangle: the step right is refused, the model goes around."""
    path = tmp_path / "scene.json"
    path.write_text(
        json.dumps(
            [
                {"shape": "triangle", "colour": "green", "size": "small", "column": 0, "row": 1},
                {"shape": "square", "colour": "blue", "size": "large", "column": 1, "row": 1},
            ]
        )
    )
    assert main(["plan", str(path), GOAL, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"][0] == "move obj_1 right" and result["refused"][0] and result["success"]
    assert main(["plan", str(path), GOAL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "1. move obj_1 right - refused" and lines[-1] == "goal holds"
    assert main(["plan", str(path), GOAL, "--no-replan"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "1. move obj_1 right - refused",
        "goal not reached: step 1 was refused (--no-replan)",
    ]


@pytest.mark.parametrize(
    "scene, goal, message",
    [
        (None, GOAL, "No scene at"),
        ("{not json", GOAL, "is not valid JSON"),
        ('{"objects": []}', GOAL, "A scene is a JSON list of objects"),
        ('[{"shape": "circle", "colour": "red"}]', GOAL, "Object 1 of the scene must have exactly the keys"),
        (SCENE, "put the red circle next to the blue square", "Cannot read the goal 'put the red circle next to"),
        (SCENE, "put the red circle right of the green square", "The scene has no 'green square'"),
    ],
)
def test_plan_refuses_a_scene_or_goal_it_cannot_read_in_one_line(scene, goal, message, tmp_path, capsys):
    path = tmp_path / "scene.json"
    if scene == SCENE:
        path = SCENE
    elif scene is not None:
        path.write_text(scene)
    assert main(["plan", str(path), goal]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("palme-hf: error: ") and message in err and len(err.splitlines()) == 1


def test_plan_refuses_a_folder_that_is_not_an_embodied_model(tmp_path, capsys):
    for folder in (str(tmp_path / "nowhere"), DEFAULT_CAPTIONER):  # a captioner does not name its observations
        assert main(["plan", SCENE, GOAL, "--model", folder]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("palme-hf: error: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([SCENE], "the following arguments are required: GOAL"),
        ([SCENE, GOAL, "--max-steps", "0"], "argument --max-steps: must be a positive integer, got '0'"),
    ],
)
def test_plan_invalid_arguments_exit_2(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
