"""The PaLM-E recipe with pretrained parts: Transformers vision encoders and causal LMs as PalmE's towers, loading
their checkpoints, multimodal sentences with any number of images, and training the projector (or LoRA) only."""

import importlib.util
import json
import os
import textwrap

import PIL.Image
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    GPT2LMHeadModel,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    ViTConfig,
)

from palme_hf import (
    PalmEConfig,
    PalmEForCausalLM,
    PalmEForConditionalGeneration,
    PalmEProcessor,
    PalmETextConfig,
    PalmEVisionConfig,
)
from palme_hf.synthetic_shapes import build_caption_tokenizer

from conftest import WITHOUT_PALME_HF
from helpers import (
    TINY_TEXT,
    save_tiny_towers,
    tiny_inputs,
    tiny_model,
    tiny_text_tower_config,
    tiny_vision_tower_config,
)

VISION_FAMILIES = ["vit", "clip", "siglip", "palme"]
TEXT_FAMILIES = ["llama", "gpt2", "qwen2", "gemma", "palme"]
# every vision and every text family at least once
PAIRS = [("vit", "llama"), ("siglip", "gpt2"), ("clip", "qwen2"), ("palme", "gemma"), ("vit", "palme")]
EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_from_towers.py")
VOCAB = 16  # the captioner's tokenizer; `<image>` is added as token 16


def composite_config(vision_family, text_family, **kwargs):
    return PalmEConfig(
        vision_config=tiny_vision_tower_config(vision_family),
        text_config=tiny_text_tower_config(text_family, VOCAB + 1),
        vision_integration="prefix",
        image_token_id=VOCAB,
        **kwargs,
    )


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Tower folders of every pair, saved by the towers' own classes: {(vision, text): (vision_dir, text_dir)}."""
    root = tmp_path_factory.mktemp("towers")
    return {pair: save_tiny_towers(root / "-".join(pair), *pair) for pair in PAIRS}


def images(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (count, 3), generator=generator).tolist()
    return [PIL.Image.new("RGB", (24 + 4 * i, 20), tuple(colour)) for i, colour in enumerate(colours)]


@pytest.mark.parametrize("vision_family", VISION_FAMILIES)
@pytest.mark.parametrize("text_family", TEXT_FAMILIES)
def test_composite_config_round_trips_by_model_type(tmp_path, vision_family, text_family):
    config = composite_config(vision_family, text_family, projector_type="mlp")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_config"]["model_type"] == config.vision_config.model_type
    assert saved["text_config"]["model_type"] == config.text_config.model_type
    loaded = PalmEConfig.from_pretrained(tmp_path)
    assert type(loaded.vision_config) is type(config.vision_config)
    assert type(loaded.text_config) is type(config.text_config)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.num_image_tokens == 16  # 32x32 images in 8x8 patches; a class token is left out
    assert (loaded.projector_type, loaded.image_token_id) == ("mlp", VOCAB)


@pytest.mark.parametrize("vision_family, text_family", PAIRS)
def test_towers_are_the_auto_models_and_the_projector_maps_widths(vision_family, text_family):
    config = composite_config(vision_family, text_family)
    model = PalmEForConditionalGeneration(config).eval()
    expected_vision = type(AutoModel.from_config(config.vision_config))
    expected_text = type(AutoModelForCausalLM.from_config(config.text_config).base_model)
    assert type(model.model.vision_model) is expected_vision
    assert type(model.model.language_model) is expected_text
    projector = model.model.multi_modal_projector
    assert (projector.in_features, projector.out_features) == (32, config.text_config.hidden_size)
    mlp = PalmEForConditionalGeneration(composite_config(vision_family, text_family, projector_type="mlp"))
    assert [type(m).__name__ for m in mlp.model.multi_modal_projector.children()][::2] == ["Linear", "Linear"]
    features = model.get_image_features(torch.rand(3, 3, 32, 32)).pooler_output
    assert features.shape == (3, 16, config.text_config.hidden_size)


def test_perceiver_resampler_stays_available_with_foreign_towers():
    model = PalmEForConditionalGeneration(composite_config("siglip", "llama", num_latents=3)).eval()
    assert model.config.num_image_tokens == 3
    assert model.get_image_features(torch.rand(2, 3, 32, 32)).pooler_output.shape == (2, 3, 32)
    input_ids = torch.tensor([[1, *[VOCAB] * 3, 5, 6]])
    assert model(pixel_values=torch.rand(1, 3, 32, 32), input_ids=input_ids).logits.shape == (1, 6, VOCAB + 1)


def test_bad_towers_are_value_errors():
    llama = tiny_text_tower_config("llama", VOCAB + 1)
    with pytest.raises(ValueError, match="needs a decoder with cross-attention layers, which LlamaConfig does not"):
        PalmEConfig(vision_config=tiny_vision_tower_config("vit"), text_config=llama)
    with pytest.raises(ValueError, match=r"`vision_config` \(LlamaConfig\) has no \['image_size', 'patch_size'\]"):
        PalmEConfig(vision_config=llama, text_config=llama, vision_integration="prefix", image_token_id=1)
    with pytest.raises(ValueError, match=r"CLIPConfig\) has no \['hidden_size', 'image_size', 'patch_size'\]"):
        PalmEConfig(vision_config=CLIPConfig(), text_config=llama, vision_integration="prefix", image_token_id=1)
    with pytest.raises(ValueError, match="`text_config` must be the config of a Transformers causal language model"):
        PalmEConfig(vision_config=ViTConfig(), text_config=ViTConfig(), vision_integration="prefix", image_token_id=1)
    with pytest.raises(ValueError, match="`model_type='no_such_model'`, which Transformers does not know"):
        PalmEConfig(text_config={"model_type": "no_such_model"})
    with pytest.raises(ValueError, match="`projector_type` must be one of"):
        composite_config("vit", "llama", projector_type="affine")
    with pytest.raises(ValueError, match="`projector_type='mlp'` needs `vision_integration='prefix'`"):
        PalmEConfig(projector_type="mlp")
    with pytest.raises(ValueError, match=r"`image_token_id` \(17\) must be a token id in \[0, 17\)"):
        PalmEConfig(vision_config=ViTConfig(), text_config=llama, vision_integration="prefix", image_token_id=17)


def test_own_towers_keep_both_routes():
    # a dict without model_type is PalmE's own tower; PalmE's own decoder still cross-attends
    config = PalmEConfig(vision_config={"image_size": 32, "patch_size": 8}, text_config={"vocab_size": 20})
    assert isinstance(config.vision_config, PalmEVisionConfig) and isinstance(config.text_config, PalmETextConfig)
    assert config.text_config.add_cross_attention and config.vision_integration == "cross_attention"
    with pytest.raises(ValueError, match="PalmEForCausalLM is PalmE's own text decoder; .* LlamaConfig"):
        PalmEForCausalLM(composite_config("vit", "llama"))


@pytest.mark.parametrize("vision_family", ["vit", "siglip"])
def test_palme_decoder_cross_attends_to_a_transformers_vision_tower(vision_family):
    text = {**TINY_TEXT, "alibi_num_heads": 2, "vocab_size": VOCAB}  # a dict without model_type: PalmE's own
    config = PalmEConfig(vision_config=tiny_vision_tower_config(vision_family), text_config=text)
    assert config.text_config.cross_attention_hidden_size == 32 and config.num_image_tokens == 16
    model = PalmEForConditionalGeneration(config).eval()
    pixel_values, input_ids = torch.rand(2, 3, 32, 32), torch.randint(3, VOCAB, (2, 5))
    model.set_attn_implementation("eager")  # in both towers
    assert model.model.vision_model.config._attn_implementation == "eager"
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, input_ids=input_ids, output_attentions=True)
    assert outputs.cross_attentions[0].shape == (2, 4, 5, 16)  # the patches, without ViT's class token
    model.set_attn_implementation("sdpa")
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, do_sample=False, max_new_tokens=4)
    generated = model.generate(**kwargs)
    assert torch.equal(model.generate(**kwargs, use_cache=False), generated)
    assert torch.equal(model.generate(**kwargs, cache_implementation="static"), generated)


@pytest.mark.parametrize("vision_family, text_family", PAIRS)
def test_from_pretrained_towers_keeps_the_towers_weights(towers, vision_family, text_family):
    vision_dir, text_dir = towers[(vision_family, text_family)]
    model = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir).eval()
    assert model.config.vision_integration == "prefix" and model.config.image_token_id == VOCAB
    assert model.config.text_config.vocab_size == VOCAB + 1  # grown by the added `<image>`
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == VOCAB + 1

    vision = AutoModel.from_pretrained(vision_dir).eval()
    for name, value in vision.state_dict().items():
        assert torch.equal(model.model.vision_model.state_dict()[name], value), name
    pixel_values = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tower_features = vision(pixel_values).last_hidden_state[:, -16:]
        features = model.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(features, model.model.multi_modal_projector(tower_features))

    # without an image the model is the pretrained language model
    language_model = AutoModelForCausalLM.from_pretrained(text_dir).eval()
    input_ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = language_model(input_ids=input_ids).logits
        logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits[..., :VOCAB], expected)
    if language_model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_from_pretrained_towers_options_and_errors(towers, tmp_path):
    vision_dir, text_dir = towers[("vit", "llama")]
    model = PalmEForConditionalGeneration.from_pretrained_towers(
        vision_dir, text_dir, projector_type="mlp", num_latents=4
    )
    assert model.config.projector_type == "mlp" and model.config.num_image_tokens == 4
    explicit = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir, image_token_id=3)
    assert explicit.config.image_token_id == 3 and explicit.config.text_config.vocab_size == VOCAB
    half = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in half.parameters()} == {torch.bfloat16}
    vision = AutoModel.from_pretrained(vision_dir, dtype=torch.bfloat16)
    assert torch.equal(half.model.vision_model.embeddings.cls_token, vision.embeddings.cls_token)
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(text_dir).save_pretrained(bare)  # no tokenizer
    with pytest.raises(ValueError, match="holds no tokenizer to add the `<image>` token to: give `image_token_id`"):
        PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, bare)
    with pytest.raises(ValueError, match="needs a decoder with cross-attention layers"):
        PalmEForConditionalGeneration.from_pretrained_towers(
            vision_dir, text_dir, vision_integration="cross_attention"
        )


def test_processor_from_pretrained_towers_adds_a_real_image_token(towers):
    vision_dir, text_dir = towers[("siglip", "gpt2")]
    processor = PalmEProcessor.from_pretrained_towers(vision_dir, text_dir)
    model = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir)
    tokenizer = processor.tokenizer
    words = build_caption_tokenizer().get_vocab()
    assert processor.image_token_id == model.config.image_token_id == VOCAB
    assert processor.image_token_id not in words.values()  # it shadows no word
    assert "<image>" in tokenizer.all_special_tokens and processor.num_image_tokens == 16
    assert tokenizer.decode([processor.image_token_id]) == "<image>"
    assert type(processor.image_processor).__name__ == "SiglipImageProcessorPil"
    inputs = processor(images=images(1), text="a <image> red")
    assert inputs["input_ids"][0].tolist().count(VOCAB) == 16
    expected = processor.image_processor(images(1), return_tensors="pt")["pixel_values"]
    assert torch.equal(inputs["pixel_values"], expected)


@pytest.fixture(scope="module")
def vit_llama(towers):
    vision_dir, text_dir = towers[("vit", "llama")]
    model = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir).eval()
    return model, PalmEProcessor.from_pretrained_towers(vision_dir, text_dir)


def test_multimodal_sentences_place_images_in_order(vit_llama):
    model, processor = vit_llama
    texts = ["Q: a <image> and <image> ? A:", "<image> a"]
    first, second, third = images(3)
    batch = processor(images=[[first, second], [third]], text=texts, padding=True)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert (batch["input_ids"] == VOCAB).sum(dim=1).tolist() == [32, 16]
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (text, row_images) in enumerate(zip(texts, [[first, second], [third]])):
            alone = processor(images=row_images, text=text)
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(logits[row, -length:], model(**alone).logits[0], atol=1e-5, rtol=1e-4)
        swapped = processor(images=[second, first], text=texts[0])
        unswapped = processor(images=[first, second], text=texts[0])
        assert not torch.allclose(model(**swapped).logits, model(**unswapped).logits)


def test_placeholder_image_mismatch_names_both_counts(vit_llama):
    model, processor = vit_llama
    batch = processor(images=images(3), text=["<image> <image> a", "<image> b"], padding=True)
    with pytest.raises(ValueError, match=r"48 image placeholder tokens .*\[32, 16\] per sequence.*but 2 images"):
        model(pixel_values=batch["pixel_values"][:2], input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match=r"3 image markers '<image>' \(\[2, 1\] per text\) but 2 images"):
        processor(images=images(2), text=["<image> <image> a", "<image> b"])


@pytest.mark.parametrize("vision_family, text_family", PAIRS)
def test_batched_cached_generation_equals_one_by_one_and_uncached(towers, vision_family, text_family):
    vision_dir, text_dir = towers[(vision_family, text_family)]
    model = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir).eval()
    processor = PalmEProcessor.from_pretrained_towers(vision_dir, text_dir)
    texts, groups = ["<image> a small", "a <image> red <image>"], [images(1, seed=1), images(2, seed=2)]
    kwargs = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4)
    batch = processor(images=groups, text=texts, padding=True)
    assert batch["attention_mask"][0, 0] == 0  # left-padded
    generated = model.generate(**batch, **kwargs)
    assert torch.equal(model.generate(**batch, use_cache=False, **kwargs), generated)
    assert VOCAB not in generated[:, batch["input_ids"].shape[1] :]  # the placeholder is never generated
    for row, (text, row_images) in enumerate(zip(texts, groups)):
        alone = processor(images=row_images, text=text)
        expected = model.generate(**alone, **kwargs)
        assert torch.equal(generated[row, -expected.shape[1] :], expected[0])


def test_device_map_auto_over_the_two_towers(towers, tmp_path):
    vision_dir, text_dir = towers[("vit", "llama")]
    model = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir).eval()
    processor = PalmEProcessor.from_pretrained_towers(vision_dir, text_dir)
    inputs = processor(images=images(2), text=["<image> a", "a <image>"], padding=True)
    kwargs = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5)
    expected = model.generate(**inputs, **kwargs)
    model.save_pretrained(tmp_path / "model")
    size = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    split = PalmEForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tmp_path / "offload"
    )
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}, split.hf_device_map
    assert torch.equal(split.generate(**inputs, **kwargs), expected)


@pytest.mark.parametrize("vision_family, text_family", [("vit", "llama"), ("siglip", "gpt2")])
def test_saved_model_and_processor_load_back(towers, tmp_path, vision_family, text_family):
    vision_dir, text_dir = towers[(vision_family, text_family)]
    model = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir).eval()
    processor = PalmEProcessor.from_pretrained_towers(vision_dir, text_dir)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert "towers_palme.py" in os.listdir(tmp_path)
    loaded_processor = PalmEProcessor.from_pretrained(tmp_path)
    inputs = processor(images=images(2), text=["<image> a <image>"])
    loaded_inputs = loaded_processor(images=images(2), text=["<image> a <image>"])
    for key in inputs:
        assert torch.equal(inputs[key], loaded_inputs[key]), key
    loaded = PalmEForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_freeze_towers_switches():
    model = PalmEForConditionalGeneration(composite_config("vit", "gpt2", num_latents=2))

    def trainable(module):
        return {parameter.requires_grad for parameter in module.parameters()}

    assert model.freeze_towers() is model
    assert trainable(model.model.vision_model) == trainable(model.model.language_model) == {False}
    assert trainable(model.lm_head) == {False}
    assert trainable(model.model.multi_modal_projector) == trainable(model.model.resampler) == {True}
    model.freeze_towers(vision_model=False, language_model=True)
    assert trainable(model.model.vision_model) == {True} and trainable(model.model.language_model) == {False}
    model.freeze_towers(vision_model=True, language_model=False)
    assert trainable(model.model.vision_model) == {False} and trainable(model.model.language_model) == {True}


def test_only_the_projector_learns_when_both_towers_are_frozen(vit_llama):
    model, processor = vit_llama
    model = PalmEForConditionalGeneration(model.config)
    model.load_state_dict(vit_llama[0].state_dict())
    model.freeze_towers().train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    batch = processor(images=images(2), text=["<image> a red circle", "<image> a blue square"], padding=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed == {"model.multi_modal_projector.weight", "model.multi_modal_projector.bias"}


@pytest.mark.slow
def test_lora_on_the_language_model_with_peft(vit_llama):
    from peft import LoraConfig, get_peft_model

    model, processor = vit_llama
    model = PalmEForConditionalGeneration(model.config)
    model.load_state_dict(vit_llama[0].state_dict())
    model.freeze_towers()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.language_model\..*self_attn\.(q_proj|v_proj)$")
    peft_model = get_peft_model(model, lora)
    for name, parameter in peft_model.named_parameters():
        if "multi_modal_projector" in name:
            parameter.requires_grad_(True)
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or "multi_modal_projector" in name for name in trainable)
    assert any("language_model" in name and "lora_" in name for name in trainable)
    assert not any("vision_model" in name for name in trainable)
    batch = processor(images=images(2), text=["<image> a red circle", "<image> a blue square"], padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-5, rtol=1e-4)
    assert type(merged) is PalmEForConditionalGeneration


@pytest.fixture(scope="module")
def train_from_towers():
    spec = importlib.util.spec_from_file_location("train_from_towers", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("vision_family, text_family", [("vit", "llama"), ("siglip", "gpt2")])
def test_example_trains_the_projector_of_pretrained_towers(tmp_path, train_from_towers, vision_family, text_family):
    vision_dir, text_dir = save_tiny_towers(tmp_path / "towers", vision_family, text_family, pretrain_steps=150)
    output_dir = tmp_path / "out"
    arguments = ["--vision-model", vision_dir, "--text-model", text_dir, "--output-dir", str(output_dir)]
    arguments += ["--train-samples", "800", "--max-steps", "50", "--learning-rate", "1e-2", "--logging-steps", "10"]
    result = train_from_towers.main(arguments)
    losses = result["train_losses"]
    assert len(losses) == 5 and losses[-1] < 0.97 * losses[0], losses
    assert result["trainable_parameters"] == 32 * 32 + 32  # the affine projector alone
    model = PalmEForConditionalGeneration.from_pretrained(output_dir)
    vision = AutoModel.from_pretrained(vision_dir)
    for name, value in vision.state_dict().items():
        assert torch.equal(model.model.vision_model.state_dict()[name], value), name  # frozen
    language_model = AutoModelForCausalLM.from_pretrained(text_dir)
    text_state = model.model.language_model.state_dict()
    for name, value in language_model.base_model.state_dict().items():
        if text_state[name].shape == value.shape:
            assert torch.equal(text_state[name], value), name  # frozen (the embeddings grew by `<image>`)
    assert PalmEProcessor.from_pretrained(output_dir).image_token_id == model.config.image_token_id
    assert json.loads((output_dir / "train_losses.json").read_text())["train_losses"] == losses
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        train_from_towers.main(arguments)


@pytest.mark.slow
def test_example_with_lora_saves_a_merged_model(tmp_path, train_from_towers):
    vision_dir, text_dir = save_tiny_towers(tmp_path / "towers", "siglip", "gpt2")
    output_dir = tmp_path / "out"
    arguments = ["--vision-model", vision_dir, "--text-model", text_dir, "--output-dir", str(output_dir)]
    result = train_from_towers.main([*arguments, "--max-steps", "4", "--logging-steps", "2", "--lora-rank", "2"])
    assert len(result["train_losses"]) == 2 and result["trainable_parameters"] > 32 * 32 + 32
    model = PalmEForConditionalGeneration.from_pretrained(output_dir)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert isinstance(model.model.language_model, type(GPT2LMHeadModel(model.config.text_config).transformer))


REMOTE_LOADER = WITHOUT_PALME_HF + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = sys.argv[1]
    inputs = torch.load(folder + "/inputs.pt", weights_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(model.model.language_model).__name__ == "LlamaModel"
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert processor.image_token_id == model.config.image_token_id
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    torch.save({"logits": logits, "generated": generated}, folder + "/outputs.pt")
    """
)


@pytest.mark.slow
def test_saved_model_loads_with_remote_code_without_palme_hf(towers, tmp_path):
    from test_remote_code import run_without_palme_hf

    vision_dir, text_dir = towers[("vit", "llama")]
    model = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir).eval()
    processor = PalmEProcessor.from_pretrained_towers(vision_dir, text_dir)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = dict(processor(images=images(2), text=["<image> a <image>"]))
    torch.save(inputs, folder / "inputs.pt")
    run_without_palme_hf(REMOTE_LOADER, folder, tmp_path)
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], model(**inputs).logits)
    assert torch.equal(outputs["generated"], model.generate(**inputs, do_sample=False, max_new_tokens=4))


@pytest.mark.parametrize("vision_family, text_family", [("vit", "llama"), ("clip", "qwen2"), ("palme", "gemma")])
def test_bfloat16_towers_keep_float32_rotary_frequencies(towers, tmp_path, vision_family, text_family):
    vision_dir, text_dir = towers[(vision_family, text_family)]
    model = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir, dtype=torch.bfloat16).eval()
    tower = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.bfloat16).eval()
    assert model.model.multi_modal_projector.weight.dtype == torch.bfloat16
    assert model.model.language_model.rotary_emb.inv_freq.dtype == tower.model.rotary_emb.inv_freq.dtype
    assert tower.model.rotary_emb.inv_freq.dtype == torch.float32
    # far positions are where bfloat16 frequencies go wrong
    input_ids, position_ids = torch.tensor([[1, 5, 6, 7, 8]]), torch.arange(4000, 4005)[None]
    model.save_pretrained(tmp_path)
    reloaded = PalmEForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = tower(input_ids=input_ids, position_ids=position_ids).logits
        for loaded in (model, reloaded):
            logits = loaded(input_ids=input_ids, position_ids=position_ids).logits
            torch.testing.assert_close(logits[..., :VOCAB], expected, atol=0, rtol=0)


def test_from_pretrained_towers_takes_the_dtypes_from_pretrained_takes(towers, tmp_path):
    vision_dir, text_dir = towers[("vit", "llama")]
    by_name = PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir, dtype="bfloat16")
    assert by_name.dtype == torch.bfloat16 and by_name.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert (
        PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir, dtype="auto").dtype == torch.float32
    )
    AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "text")
    AutoTokenizer.from_pretrained(text_dir).save_pretrained(tmp_path / "text")
    AutoModel.from_pretrained(vision_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "vision")
    auto = PalmEForConditionalGeneration.from_pretrained_towers(tmp_path / "vision", tmp_path / "text", dtype="auto")
    assert auto.dtype == torch.bfloat16  # the checkpoints' own
    with pytest.raises(ValueError, match=r"vision tower loaded in torch.float32 and the language model in torch.bfl"):
        PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, tmp_path / "text", dtype="auto")
    with pytest.raises(ValueError, match="`dtype` provided as a `str` can only be"):
        PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir, dtype="bf16")


@pytest.mark.parametrize("dual_encoder", ["clip", "siglip"])
def test_the_vision_half_of_a_dual_encoder_is_the_vision_tower(towers, tmp_path, dual_encoder):
    vision_config = tiny_vision_tower_config(dual_encoder).to_dict()
    text_config = dict(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    if dual_encoder == "clip":
        dual = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=8))
        image_processor = CLIPImageProcessorPil(
            size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
        )
    else:
        dual = SiglipModel(SiglipConfig(text_config=text_config, vision_config=vision_config))
        image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    dual.save_pretrained(tmp_path / "dual")
    image_processor.save_pretrained(tmp_path / "dual")
    _, text_dir = towers[("vit", "llama")]
    model = PalmEForConditionalGeneration.from_pretrained_towers(tmp_path / "dual", text_dir).eval()
    processor = PalmEProcessor.from_pretrained_towers(tmp_path / "dual", text_dir)
    vision = AutoModel.from_config(dual.config.vision_config).from_pretrained(tmp_path / "dual").eval()
    assert type(model.model.vision_model) is type(vision) and processor.num_image_tokens == 16
    inputs = processor(images=images(1), text="a <image> red")
    with torch.no_grad():
        expected = vision(inputs["pixel_values"]).last_hidden_state
        torch.testing.assert_close(model(**inputs).image_outputs.last_hidden_state, expected)


def test_a_folder_without_its_vision_encoder_weights_is_refused(vit_llama, towers, tmp_path):
    vit_llama[0].save_pretrained(tmp_path / "palme")  # a composite whose vision half is not a checkpoint of its own
    _, text_dir = towers[("vit", "llama")]
    with pytest.raises(ValueError, match=r"does not hold the weights of its vision encoder \(ViTModel\)"):
        PalmEForConditionalGeneration.from_pretrained_towers(tmp_path / "palme", text_dir)


def test_loading_arguments_go_to_the_loaders_and_config_arguments_to_the_config(towers, tmp_path):
    vision_dir, text_dir = towers[("vit", "llama")]
    loading = dict(
        revision="main", cache_dir=str(tmp_path), local_files_only=True, trust_remote_code=False, token=None
    )
    model = PalmEForConditionalGeneration.from_pretrained_towers(
        vision_dir,
        text_dir,
        low_cpu_mem_usage=True,
        attn_implementation="eager",
        device_map="cpu",
        projector_type="mlp",
        **loading,
    )
    assert model.config.projector_type == "mlp" and model.device == torch.device("cpu")
    assert model.config.text_config._attn_implementation == "eager"
    assert model.model.vision_model.config._attn_implementation == "eager"
    processor = PalmEProcessor.from_pretrained_towers(vision_dir, text_dir, **loading)
    assert processor.image_token_id == model.config.image_token_id
    with pytest.raises(ValueError, match="device_map='auto'.* load it with `from_pretrained"):
        PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir, device_map="auto")
    with pytest.raises(ValueError, match="PalmEConfig has no option `no_such_option`"):
        PalmEForConditionalGeneration.from_pretrained_towers(vision_dir, text_dir, no_such_option=1)


@pytest.mark.parametrize("vision_family, text_family", [("palme", "palme"), ("vit", "llama"), ("siglip", "gpt2")])
def test_output_attentions_and_hidden_states_reach_the_image_outputs(vision_family, text_family):
    config = composite_config(vision_family, text_family)
    model = PalmEForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    input_ids = torch.tensor([[1, *[VOCAB] * 16, 5, 6]])
    pixel_values = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        outputs = model(
            pixel_values=pixel_values, input_ids=input_ids, output_attentions=True, output_hidden_states=True
        )
        vision = model.model.vision_model(pixel_values, output_attentions=True, output_hidden_states=True)
        plain = model(pixel_values=pixel_values, input_ids=input_ids).image_outputs
    image_outputs = outputs.image_outputs
    assert len(image_outputs.attentions) == len(vision.attentions) == config.vision_config.num_hidden_layers
    assert len(image_outputs.hidden_states) == len(vision.hidden_states)
    for got, expected in zip(
        image_outputs.attentions + image_outputs.hidden_states, vision.attentions + vision.hidden_states
    ):
        torch.testing.assert_close(got, expected)
    assert len(outputs.attentions) == config.text_config.num_hidden_layers  # the language model's, as before
    assert plain.attentions is None and plain.hidden_states is None  # only when asked for


@pytest.mark.parametrize("block_type", ["standard", "parallel"])
def test_freeze_towers_keeps_the_cross_attention_layers_trainable(block_type):
    model = tiny_model("reference", block_type=block_type, num_latents=2).train()
    model.freeze_towers()
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    joining = {name for name in dict(model.named_parameters()) if ".cross_attn." in name or "resampler" in name}
    assert trainable == joining and any(".cross_attn." in name for name in trainable)
    pixel_values, input_ids = tiny_inputs(model)
    before = {name: value.clone() for name, value in model.named_parameters()}
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-2)
    model(pixel_values=pixel_values, input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    changed = {name for name, value in model.named_parameters() if not torch.equal(value, before[name])}
    assert changed and changed <= joining
    model.freeze_towers(language_model=False)
    assert all(parameter.requires_grad for parameter in model.model.language_model.parameters())


@pytest.mark.parametrize("text_family", [*TEXT_FAMILIES, "palme_cross_attention"])
def test_lora_targets_adapt_every_language_model_and_keep_the_joining_layers_trainable(text_family):
    from peft import LoraConfig, get_peft_model

    if text_family == "palme_cross_attention":
        model, joining = tiny_model("reference", num_latents=2), (".resampler.", ".cross_attn.")
        pixel_values, input_ids = tiny_inputs(model, batch_size=1)
    else:
        model, joining = (
            PalmEForConditionalGeneration(composite_config("vit", text_family)),
            (".multi_modal_projector.",),
        )
        pixel_values, input_ids = torch.rand(1, 3, 32, 32), torch.tensor([[1, *[VOCAB] * 16, 5, 6, 7]])
    targets = model.lora_targets()
    assert targets["target_modules"] and all(
        name.startswith("model.language_model.") for name in targets["target_modules"]
    )
    peft_model = get_peft_model(model.train(), LoraConfig(r=2, lora_alpha=4, **targets))
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)
    for part in joining:  # trained in full
        names = [name for name in trainable if part in name and "modules_to_save" in name]
        assert names, part
    assert any("language_model" in name and "lora_" in name for name in trainable)
    assert not any("vision_model" in name for name in trainable)

    optimizer = torch.optim.AdamW(
        [parameter for parameter in peft_model.parameters() if parameter.requires_grad], lr=1e-2
    )
    peft_model(pixel_values=pixel_values, input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(pixel_values=pixel_values, input_ids=input_ids).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(pixel_values=pixel_values, input_ids=input_ids).logits, adapted)
    assert type(merged) is PalmEForConditionalGeneration
