"""What the tests share: the tiny PalmE configurations and inputs they build models from, and the loader of the
outputs recorded from the reference implementations (`tests/fixtures/`)."""

import contextlib
import json
import os

import torch
from safetensors.torch import load_file

from palme_hf import PalmEConfig, PalmEForConditionalGeneration

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# The sample images of examples/images, with their true captions (captions.json).
SAMPLE_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "images")

TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
TINY_TEXT = dict(vocab_size=97, max_position_embeddings=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4)
# Text decoders: the reference layer (ALiBi, rotary/xpos, query/key norm), with zeta's quirks, with absolute positions
# instead of rotary embeddings, and the reference layer with the image as a prefix (multimodal sentences).
VARIANTS = {
    "reference": dict(alibi_num_heads=2, qk_norm=True),
    "zeta_quirks": dict(alibi_num_heads=2, rotate_values=True),
    "abs_positions": dict(alibi_num_heads=0, use_rotary=False, use_xpos=False, use_absolute_position_embeddings=True),
    "prefix": dict(alibi_num_heads=2, qk_norm=True),
}
BLOCK_TYPES = ["standard", "parallel", "hierarchical"]
BLOCK_OPTIONS = {
    "standard": {},
    "parallel": dict(alibi_num_heads=0),
    "hierarchical": dict(alibi_num_heads=0, qk_norm=False, window_size=3, compress_factor=2),
}


def tiny_config(
    variant: str = "reference",
    block_type: str = "standard",
    num_latents: int | None = None,
    vision: dict | None = None,
    image_token_id: int | None = None,
    observations: dict | None = None,
    **text,
) -> PalmEConfig:
    """
    A PalmE small enough for CPU tests (32x32 images in 16 patches). With the `"prefix"` variant the image placeholder
    is `image_token_id`, by default a token added after the text vocabulary. `observations` are the PalmEConfig
    options of state and object vectors (`state_dim`, `state_token_id`, ...).
    """
    text = {**TINY_TEXT, **VARIANTS[variant], **BLOCK_OPTIONS[block_type], "block_type": block_type, **text}
    prefix = variant == "prefix"
    if prefix and image_token_id is None:
        image_token_id = text["vocab_size"]
        text["vocab_size"] += 1
    return PalmEConfig(
        vision_config={**TINY_VISION, **(vision or {})},
        text_config=text,
        vision_integration="prefix" if prefix else "cross_attention",
        image_token_id=image_token_id,
        num_latents=num_latents,
        **(observations or {}),
    )


def tiny_model(variant: str = "reference", **kwargs) -> PalmEForConditionalGeneration:
    return PalmEForConditionalGeneration(tiny_config(variant, **kwargs)).eval()


def combination_model(block_type: str, integration: str, num_latents: int | None) -> PalmEForConditionalGeneration:
    """A tiny model of `block_type`, with `integration` ("reference": cross-attention, or "prefix"), and with a
    Perceiver resampler of `num_latents` latents when given."""
    return tiny_model(integration, block_type=block_type, num_latents=num_latents)


def tiny_inputs(model, batch_size: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and token ids for `model`; with prefix integration the placeholders follow two text tokens."""
    config = model.config
    pixel_values = torch.rand(batch_size, 3, config.vision_config.image_size, config.vision_config.image_size)
    input_ids = torch.randint(0, config.text_config.vocab_size - 1, (batch_size, length))
    if config.vision_integration == "prefix":
        placeholders = torch.full((batch_size, config.num_image_tokens), config.image_token_id)
        input_ids = torch.cat([input_ids[:, :2], placeholders, input_ids[:, 2:]], dim=1)
    return pixel_values, input_ids


# State vectors of 6 values, each 2 placeholders, and object vectors of 4 values, each 1 placeholder: the embodied
# inputs of `tiny_embodied_model`, whose image, state and object placeholders are the vocabulary's last three tokens.
TINY_OBSERVATIONS = dict(state_dim=6, num_state_tokens=2, object_dim=4, num_object_tokens=1)


def tiny_embodied_model(text_tower: str = "palme", block_type: str = "standard", **options):
    """
    A tiny prefix-route PalmE that takes images, state vectors and object vectors (`TINY_OBSERVATIONS`, overridden by
    `options`), on PalmE's own decoder (`"palme"`, of `block_type`) or a Transformers Llama (`"llama"`).
    """
    vocab_size = TINY_TEXT["vocab_size"] if text_tower == "palme" else 20
    observations = {
        **TINY_OBSERVATIONS,
        "state_token_id": vocab_size + 1,
        "object_token_id": vocab_size + 2,
        **options,
    }
    if text_tower == "palme":
        config = tiny_config(
            "prefix",
            block_type=block_type,
            image_token_id=vocab_size,
            vocab_size=vocab_size + 3,
            observations=observations,
        )
    else:
        config = PalmEConfig(
            vision_config=tiny_vision_tower_config("vit"),
            text_config=tiny_text_tower_config(text_tower, vocab_size + 3),
            vision_integration="prefix",
            image_token_id=vocab_size,
            **observations,
        )
    return PalmEForConditionalGeneration(config).eval()


def fixture_path(case: str, name: str) -> str:
    return os.path.join(FIXTURES, case, name)


def load_reference_case(case: str) -> dict:
    """A case recorded from a reference implementation: its constructor `kwargs`, its `state_dict` (when the case has
    a checkpoint), the recorded tensors `io` and the `meta` data."""
    with open(fixture_path(case, "kwargs.json")) as handle:
        kwargs = json.load(handle)
    with open(fixture_path(case, "meta.json")) as handle:
        meta = json.load(handle)
    checkpoint = fixture_path(case, "checkpoint.pt")
    state_dict = torch.load(checkpoint, weights_only=True) if os.path.exists(checkpoint) else None
    return {
        "kwargs": kwargs,
        "state_dict": state_dict,
        "io": load_file(fixture_path(case, "io.safetensors")),
        "meta": meta,
    }


# Tiny Transformers towers for the PaLM-E recipe with pretrained parts: vision encoders of 32x32 images in 16 patches
# of 8x8 (ViT and CLIP add a class token), and causal language models of width 32.
def tiny_vision_tower_config(family: str):
    from transformers import CLIPVisionConfig, SiglipVisionConfig, ViTConfig

    from palme_hf import PalmEVisionConfig

    geometry = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    if family == "palme":
        return PalmEVisionConfig(**geometry, intermediate_size=64)
    classes = {"vit": ViTConfig, "clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}
    return classes[family](**geometry, intermediate_size=64)


def tiny_text_tower_config(
    family: str, vocab_size: int, pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim: int = 16
):
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

    from palme_hf import PalmETextConfig

    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128, **ids)
    if family == "palme":
        text = {**TINY_TEXT, "alibi_num_heads": 2, "vocab_size": vocab_size}
        return PalmETextConfig(**text, add_cross_attention=False, **ids)
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}
    return classes[family](
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=128,
        **ids,
    )


def save_tiny_towers(
    folder, vision_family: str, text_family: str, seed: int = 0, pretrain_steps: int = 0, head_dim: int = 16
) -> tuple[str, str]:
    """
    Saves a tiny random vision tower (with its image processor) and causal language model (with the captioner's
    word-level tokenizer, heads of `head_dim` for a Llama, Qwen2 or Gemma) as their own classes' `save_pretrained`
    writes them; returns the two folders. With `pretrain_steps`, the language model is first trained on the synthetic
    captions, text alone (a pretrained LM that knows the captions' language but not the images).
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        CLIPImageProcessorPil,
        SiglipImageProcessorPil,
        ViTImageProcessorPil,
    )

    from palme_hf import PalmEImageProcessor
    from palme_hf.synthetic_shapes import build_caption_tokenizer

    torch.manual_seed(seed)
    vision_folder, text_folder = os.path.join(folder, "vision"), os.path.join(folder, "text")
    AutoModel.from_config(tiny_vision_tower_config(vision_family)).save_pretrained(vision_folder)
    image_processors = {
        "vit": ViTImageProcessorPil,
        "clip": CLIPImageProcessorPil,
        "siglip": SiglipImageProcessorPil,
        "palme": PalmEImageProcessor,
    }
    size = {"height": 32, "width": 32}
    extra = {"crop_size": size} if vision_family == "clip" else {}
    image_processors[vision_family](size=size, **extra).save_pretrained(vision_folder)
    tokenizer = build_caption_tokenizer(padding_side="left")
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    text_config = tiny_text_tower_config(text_family, len(tokenizer), **ids, head_dim=head_dim)
    language_model = AutoModelForCausalLM.from_config(text_config)
    if pretrain_steps:
        pretrain_on_captions(language_model, tokenizer, pretrain_steps, seed)
    language_model.save_pretrained(text_folder)
    tokenizer.save_pretrained(text_folder)
    return vision_folder, text_folder


def pretrain_on_captions(language_model, tokenizer, steps: int, seed: int = 0, batch_size: int = 32):
    """Trains a causal LM on synthetic captions (`<bos> caption <eos>`, right-padded), text alone, with AdamW."""
    import random

    from palme_hf.synthetic_shapes import caption_scene, sample_scene

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(language_model.parameters(), lr=1e-2)
    language_model.train()
    for _ in range(steps):
        captions = [caption_scene(sample_scene(rng, "train", 64)) for _ in range(batch_size)]
        sequences = [ids + [tokenizer.eos_token_id] for ids in tokenizer(captions)["input_ids"]]
        length = max(map(len, sequences))
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (length - len(ids)) for ids in sequences])
        labels = input_ids.masked_fill(input_ids == tokenizer.pad_token_id, -100)
        loss = language_model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    language_model.eval()


def sample_captions() -> dict[str, str]:
    """The true captions of the sample images in `SAMPLE_IMAGES`, by file name."""
    with open(os.path.join(SAMPLE_IMAGES, "captions.json")) as handle:
        return json.load(handle)


def sample_image(name: str = "held_out_00.png"):
    """One of the sample images, as a PIL image."""
    import PIL.Image

    return PIL.Image.open(os.path.join(SAMPLE_IMAGES, name))


def load_script(*path: str):
    """The script at `path` (parts relative to the repository root, e.g. `"examples", "train_captioner.py"`) as a
    module, to call its `main` or other functions in the test's process."""
    import importlib.util

    file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(path[-1])[0], file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def read_only_folder(folder):
    """
    While the block runs, `folder` is read-only for this process, even as root, where file modes do not bind (it is
    then made immutable, on file systems that allow it; the test is skipped where nothing makes it read-only).
    """
    import subprocess

    import pytest

    os.chmod(folder, 0o555)
    try:
        if os.access(folder, os.W_OK):
            subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if os.access(folder, os.W_OK):
            pytest.skip(f"nothing makes {folder} read-only here")
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        os.chmod(folder, 0o755)


# Ways a saved model folder can fail to load, with what the refusal says.
BROKEN_MODEL_FOLDERS = {
    "config.json is a JSON list": "config.json must hold a JSON object, got a JSON list",
    "config.json contradicts the weights": "do not fit the model its config.json describes: model.",
    "a malformed index": 'model.safetensors.index.json is malformed: expected {"weight_map"',
}


def break_model_folder(model_dir, case: str):
    """Breaks the saved model in `model_dir` as `case` (of `BROKEN_MODEL_FOLDERS`) says."""
    config_file = os.path.join(model_dir, "config.json")
    if case == "config.json is a JSON list":
        with open(config_file, "w") as handle:
            handle.write("[]")
    elif case == "config.json contradicts the weights":
        with open(config_file) as handle:
            config = json.load(handle)
        config["text_config"]["intermediate_size"] *= 2
        with open(config_file, "w") as handle:
            json.dump(config, handle)
    else:
        with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as handle:
            handle.write('{"weight_map": {"lm_head.weight": "../model.safetensors"}}')


# What makes the host wait for the device: reading a tensor's value into Python.
HOST_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__")


@contextlib.contextmanager
def count_host_syncs():
    """Counts the calls of `HOST_SYNC_METHODS` on tensors inside the block: yields a dict, method name to count."""
    counts = dict.fromkeys(HOST_SYNC_METHODS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in HOST_SYNC_METHODS}

    def counting(name):
        def method(tensor, *args, **kwargs):
            counts[name] += 1
            return originals[name](tensor, *args, **kwargs)

        return method

    for name in HOST_SYNC_METHODS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
