"""Sharing a PalmE captioner: `push_to_hub` (captured offline, into a local folder) writes a complete Hub repo that
loads, model and processor, with `trust_remote_code=True` where palme_hf is not installed, with a model card built from
the configuration and the evaluation; the image-text-to-text pipeline captions."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import pipeline

from palme_hf import PalmEConfig, PalmEForConditionalGeneration, PalmEProcessor
from palme_hf.cli import DEFAULT_CAPTIONER

from conftest import WITHOUT_PALME_HF
from helpers import tiny_text_tower_config, tiny_vision_tower_config
from tiny_captioner import build_tokenizer, tiny_config

PROMPT = "<image> a"


@pytest.fixture
def captioner():
    """A tiny prefix-integration captioner (model and processor)."""
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), cross_attend=False)
    return PalmEForConditionalGeneration(config).eval(), PalmEProcessor.from_model_config(config, tokenizer)


def sample_images() -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Stands in for the Hugging Face Hub: records the commits `push_to_hub` sends (file contents included), writes
    them into a local folder per repository (`tmp_path/hub/<repo_id>`, later commits overwriting earlier files), serves
    a repository's README.md from there as the Hub would, and fails any attempt to open a network connection."""

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to open a network connection")

    commits = []
    folders = tmp_path / "hub"

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        files = {}
        for operation in operations:
            with operation.as_file() as file:
                files[operation.path_in_repo] = file.read()
        commits.append({"repo_id": repo_id, "message": commit_message, "files": files})
        for name, content in files.items():
            (folders / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            (folders / repo_id / name).write_bytes(content)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def hub_file(repo_id, filename, **kwargs):  # huggingface_hub's hf_hub_download, as ModelCard.load calls it
        if (folders / repo_id / filename).is_file():
            return str(folders / repo_id / filename)
        raise EntryNotFoundError(f"{filename} is not in {repo_id} (a new repository)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", hub_file)
    return commits


def test_push_to_hub_sends_a_complete_repo(captioner, hub, tmp_path):
    model, processor = captioner
    model.push_to_hub("someone/palme-tiny-captioner", tags=["image-captioning"])
    processor.push_to_hub("someone/palme-tiny-captioner")

    assert [commit["repo_id"] for commit in hub] == ["someone/palme-tiny-captioner"] * 2
    model_files, processor_files = hub[0]["files"], hub[1]["files"]
    expected_model_files = {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "README.md",
        "configuration_palme.py",
        "modeling_palme.py",
        "layers_palme.py",
        "blocks_palme.py",
        "hierarchical_palme.py",
    }
    assert expected_model_files <= set(model_files)
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "processing_palme.py"} <= set(
        processor_files
    )
    assert not [name for name in {**model_files, **processor_files} if name.endswith((".bin", ".pt", ".pth"))]
    assert json.loads(model_files["config.json"])["auto_map"] == {
        "AutoConfig": "configuration_palme.PalmEConfig",
        "AutoModel": "modeling_palme.PalmEModel",
        "AutoModelForImageTextToText": "modeling_palme.PalmEForConditionalGeneration",
    }
    processor_config = json.loads(processor_files["processor_config.json"])
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_palme.PalmEProcessor"}
    image_processor_auto_map = processor_config["image_processor"]["auto_map"]
    assert image_processor_auto_map["AutoImageProcessor"] == "processing_palme.PalmEImageProcessor"

    # the model card carries the Hub metadata
    card = model_files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers"
    assert "image-captioning" in metadata["tags"]

    # the repo as the Hub would hold it: later commits overwrite earlier files
    repo = tmp_path / "repo"
    repo.mkdir()
    for commit in hub:
        for name, content in commit["files"].items():
            (repo / name).write_bytes(content)
    check_loads_without_palme_hf(repo, model, processor, tmp_path)


LOADER = WITHOUT_PALME_HF + textwrap.dedent(
    """
    import PIL.Image
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    repo, inputs_folder = sys.argv[1], sys.argv[2]
    images = [PIL.Image.open(f"{inputs_folder}/image_{index}.png") for index in range(2)]
    texts = open(f"{inputs_folder}/texts.txt").read().split("\\n")
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
    for loaded in (processor, processor.image_processor, model):
        assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
    inputs = processor(images=images, text=texts, padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    captioner = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
    captions = captioner(images=images, text=texts, max_new_tokens=5, return_full_text=False)
    torch.save(
        {"inputs": dict(inputs), "logits": logits, "generated": generated,
         "captions": [caption["generated_text"].strip() for caption in captions]},
        f"{inputs_folder}/outputs.pt",
    )
    """
)


def check_loads_without_palme_hf(repo, model, processor, tmp_path):
    """Loads `repo` in a Python where palme_hf cannot be imported, offline, with an empty Hugging Face home, and
    compares its processor outputs, logits, generated ids and pipeline captions with `model` and `processor`."""
    inputs_folder = tmp_path / "inputs"
    inputs_folder.mkdir()
    images = sample_images()
    for index, image in enumerate(images):
        image.save(inputs_folder / f"image_{index}.png")
    texts = [PROMPT, "<image> a small red"]
    (inputs_folder / "texts.txt").write_text("\n".join(texts))

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(repo), str(inputs_folder)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    outputs = torch.load(inputs_folder / "outputs.pt", weights_only=True)
    inputs = processor(images=images, text=texts, padding=True)
    assert outputs["inputs"].keys() == inputs.keys()
    for key in inputs:
        assert torch.equal(outputs["inputs"][key], inputs[key]), key
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], model(**inputs).logits)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(outputs["generated"], generated)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    assert outputs["captions"] == processor.batch_decode(new_tokens, skip_special_tokens=True)


def expected_captions(model, processor, images, texts):
    inputs = processor(images=images, text=texts, padding=True)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    return processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("cross_attend", [True, False])
def test_pipeline_captions_with_model_and_processor(cross_attend):
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), cross_attend=cross_attend)
    model = PalmEForConditionalGeneration(config).eval()
    processor = PalmEProcessor.from_model_config(config, tokenizer)
    captioner = pipeline("image-text-to-text", model=model, processor=processor)
    images = sample_images()
    prompt = "" if cross_attend else PROMPT  # with cross-attention the image is not part of the text

    [caption] = captioner(images=images[0], text=prompt, max_new_tokens=5)
    [expected] = expected_captions(model, processor, images[:1], [prompt])
    assert caption["input_text"] == prompt
    # the prompt and its continuation, as Transformers pipelines return it
    assert (
        caption["generated_text"].startswith(prompt) and caption["generated_text"][len(prompt) :].strip() == expected
    )

    captions = captioner(images=images, text=[prompt, prompt], max_new_tokens=5, return_full_text=False)
    assert [output["generated_text"].strip() for output in captions] == expected_captions(
        model, processor, images, [prompt, prompt]
    )


def test_pipeline_from_a_saved_folder(captioner, tmp_path):
    model, processor = captioner
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    captions = pipeline("image-text-to-text", model=str(tmp_path))(
        images=sample_images(), text=[PROMPT, PROMPT], max_new_tokens=5, return_full_text=False
    )
    assert [output["generated_text"].strip() for output in captions] == expected_captions(
        model, processor, sample_images(), [PROMPT, PROMPT]
    )


def test_push_to_hub_writes_a_model_card_from_the_config_and_the_evaluation(hub, tmp_path):
    model = PalmEForConditionalGeneration.from_pretrained(DEFAULT_CAPTIONER)
    processor = PalmEProcessor.from_pretrained(DEFAULT_CAPTIONER)
    model.push_to_hub("someone/shapes", tags=["image-captioning"])
    processor.push_to_hub("someone/shapes")  # keeps the card the Hub holds
    repo = tmp_path / "hub" / "someone" / "shapes"
    with open(os.path.join(DEFAULT_CAPTIONER, "eval_results.json")) as handle:
        evaluation = json.load(handle)
    assert json.loads((repo / "eval_results.json").read_text()) == evaluation  # uploaded with the model

    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert {"image-captioning", "palme", "custom_code"} <= set(card.data.tags)
    for expected in [
        f"- parameters: {model.num_parameters() / 1e6:.2f} M (float32)",
        "a ViT on 64x64 images in [0, 1], 8x8 patches, 2 layers of width 128, 4 heads; 64 image features",
        "block type `standard` (the reference PalmE layer",
        "image route: `cross_attention`",
        f"Greedy decoding on {evaluation['num_samples']} held-out images:",
        f"| exact match | {evaluation['exact_match']:.4f} |",
        f"| corpus BLEU-4 | {evaluation['bleu']:.4f} |",
        f"Training: {evaluation['train_steps']} steps",
        "## Intended use",
        'The captioning prompt is the empty text `""`',
        "## Limits",
        "Images are resized to 64x64",
        f"Its vocabulary has {model.config.text_config.vocab_size} tokens",
        'AutoModelForImageTextToText.from_pretrained("someone/shapes", trust_remote_code=True)',
    ]:
        assert expected in card.text, expected

    # a card someone wrote on the Hub keeps its text; the push adds its tags
    (repo / "README.md").write_text("---\nlicense: mit\n---\n\n# My captioner\n\nIt names shapes.\n")
    model.push_to_hub("someone/shapes", tags=["shapes"])
    card = ModelCard.load(repo / "README.md")
    assert card.text.strip() == "# My captioner\n\nIt names shapes."
    assert card.data.license == "mit" and {"shapes", "palme"} <= set(card.data.tags)


def test_model_card_of_a_new_prefix_model_without_evaluation(captioner, hub, tmp_path):
    model, _ = captioner
    model.push_to_hub("someone/new")
    repo = tmp_path / "hub" / "someone" / "new"
    assert not (repo / "eval_results.json").exists()
    card = (repo / "README.md").read_text()
    assert "image route: `prefix`" in card and "4 image features reach the text" in card
    assert "No evaluation was recorded with the model (`eval_results.json`)." in card
    assert "Training data\n\nNot recorded with the model." in card
    assert 'The captioning prompt is `"<image>"`' in card


def test_model_card_of_pretrained_towers_names_them(hub, tmp_path):
    config = PalmEConfig(
        vision_config=tiny_vision_tower_config("siglip"),
        text_config=tiny_text_tower_config("gpt2", vocab_size=40),
        vision_integration="prefix",
        image_token_id=39,
    )
    PalmEForConditionalGeneration(config).push_to_hub("someone/towers")
    card = (tmp_path / "hub" / "someone" / "towers" / "README.md").read_text()
    encoder = "image encoder: a pretrained `siglip_vision_model` vision encoder on 32x32 images, 1 layers of width 32"
    assert encoder in card
    assert "text decoder: a pretrained `gpt2` causal language model, 2 layers of width 32; a vocabulary of 40" in card
