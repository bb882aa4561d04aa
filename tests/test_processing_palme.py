"""PalmEImageProcessor and PalmEProcessor: inputs, errors, normalisation, prefix expansion, save/load, model use."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor

from palme_hf import PalmEForConditionalGeneration, PalmEImageProcessor, PalmEProcessor
from tiny_captioner import build_tokenizer, tiny_config

SIZE = {"height": 32, "width": 32}


@pytest.fixture
def image_processor():
    return PalmEImageProcessor(size=SIZE)


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def prefix_processor(tokenizer):
    return PalmEProcessor.from_model_config(tiny_config(len(tokenizer), cross_attend=False), tokenizer)


def pixel_values(processor, images, **kwargs):
    return processor(images, **kwargs)["pixel_values"]


def test_defaults_match_the_reference_input():
    processor = PalmEImageProcessor()
    assert dict(processor.size)["height"] == dict(processor.size)["width"] == 256
    assert processor.do_rescale and not processor.do_normalize


def test_pil_numpy_and_tensor_inputs_agree(image_processor):
    array = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    expected = pixel_values(image_processor, PIL.Image.fromarray(array))
    assert expected.shape == (1, 3, 32, 32) and expected.dtype == torch.float32
    assert 0.0 <= expected.min() and expected.max() <= 1.0
    torch.testing.assert_close(pixel_values(image_processor, array), expected)  # HWC uint8
    torch.testing.assert_close(pixel_values(image_processor, array.transpose(2, 0, 1).copy()), expected)  # CHW
    torch.testing.assert_close(pixel_values(image_processor, torch.from_numpy(array)), expected)


def test_colours_rescale_to_unit_range(image_processor):
    red = pixel_values(image_processor, PIL.Image.new("RGB", (50, 10), (255, 0, 0)))[0]
    assert torch.all(red[0] == 1.0) and torch.all(red[1:] == 0.0)


def test_float_images_in_unit_range_pass_through(image_processor):
    image = torch.rand(3, 32, 32)
    assert torch.equal(pixel_values(image_processor, image)[0], image)
    # a float image in [0, 255] is rescaled like the 8-bit image it holds
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(
        pixel_values(image_processor, array.astype(np.float32)), pixel_values(image_processor, array)
    )


def test_float_images_resize_in_floating_point(image_processor):
    array = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    resized = pixel_values(image_processor, array.astype(np.float32) / 255)
    assert resized.shape == (1, 3, 32, 32)
    # the same resize as the 8-bit path, without its rounding to 8 bits
    torch.testing.assert_close(resized, pixel_values(image_processor, array), atol=1 / 255, rtol=0)


def test_batches_and_lists(image_processor):
    assert pixel_values(image_processor, torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    assert pixel_values(image_processor, np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 3, 32, 32)
    images = [PIL.Image.new("RGB", (8, 8)), np.zeros((16, 16, 3), np.uint8), torch.rand(3, 40, 20)]
    assert pixel_values(image_processor, images).shape == (3, 3, 32, 32)
    assert isinstance(pixel_values(image_processor, images, return_tensors=None), list)


def test_grayscale_and_rgba_become_rgb(image_processor):
    gray = pixel_values(image_processor, PIL.Image.new("L", (8, 8), 128))[0]
    assert torch.all(gray == 128 / 255)
    transparent = pixel_values(image_processor, PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 0)))[0]
    assert torch.all(transparent == 1.0)  # composited onto white
    torch.testing.assert_close(pixel_values(image_processor, np.full((8, 8), 128, np.uint8))[0], gray)
    torch.testing.assert_close(pixel_values(image_processor, np.full((8, 8, 1), 128, np.uint8))[0], gray)


def test_paths_load_like_images(image_processor, tmp_path):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    from_path = pixel_values(image_processor, str(tmp_path / "image.png"))
    torch.testing.assert_close(from_path, pixel_values(image_processor, image))


def test_normalisation(image_processor):
    image = torch.rand(3, 32, 32)
    normalised = pixel_values(image_processor, image, do_normalize=True)[0]
    torch.testing.assert_close(normalised, (image - 0.5) / 0.5)
    custom = PalmEImageProcessor(size=SIZE, do_normalize=True, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.25, 2.0])
    mean, std = torch.tensor([0.1, 0.2, 0.3])[:, None, None], torch.tensor([0.5, 0.25, 2.0])[:, None, None]
    torch.testing.assert_close(pixel_values(custom, image)[0], (image - mean) / std)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((20, 20, 2), np.uint8), r"1 \(grayscale\), 3 \(RGB\) or 4 \(RGBA\) channels.*\(20, 20, 2\)"),
        (np.zeros((2, 20, 20), np.uint8), r"channels.*\(2, 20, 20\)"),
        (torch.zeros(5, 20, 20, 7), r"channels.*\(20, 20, 7\)"),
        (np.zeros(5), r"expected one image or a batch of images.*\(5,\)"),
        (5, r"expected an image .* got int: 5"),
        ("/no/such/image.png", r"could not read an image from '/no/such/image.png'"),
    ],
)
def test_bad_images_are_value_errors(image_processor, image, message):
    with pytest.raises(ValueError, match=message):
        image_processor(image)


def test_unreadable_file_and_unconverted_channels(image_processor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not read an image from .*broken.png"):
        image_processor(str(tmp_path / "broken.png"))
    with pytest.raises(ValueError, match="expected an RGB image \\(3 channels\\), got 1"):
        image_processor(PIL.Image.new("L", (8, 8)), do_convert_rgb=False)


def test_image_processor_round_trip(tmp_path):
    processor = PalmEImageProcessor(size=SIZE, do_normalize=True, image_mean=[0.1, 0.2, 0.3])
    processor.save_pretrained(tmp_path)
    for loaded in (PalmEImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is PalmEImageProcessor
        assert loaded.to_dict() == processor.to_dict()
    image = torch.rand(3, 40, 40)
    torch.testing.assert_close(pixel_values(loaded, image), pixel_values(processor, image))


def test_prefix_expansion(prefix_processor, tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert prefix_processor.image_token == "<image>" and prefix_processor.image_token_id == image_id
    assert prefix_processor.num_image_tokens == 4
    inputs = prefix_processor(images=PIL.Image.new("RGB", (8, 8)), text="<image> a red circle")
    words = tokenizer.convert_tokens_to_ids(["a", "red", "circle"])
    assert inputs["input_ids"].tolist() == [[tokenizer.bos_token_id, *[image_id] * 4, *words]]
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)

    batch = prefix_processor(
        images=[PIL.Image.new("RGB", (8, 8))] * 2, text=["<image> a", "a small <image> red square"], padding=True
    )
    assert batch["input_ids"].shape == (2, 9)
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [4, 4]
    assert batch["attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]  # the tokenizer pads on the left


@pytest.mark.parametrize(
    "images, text, message",
    [
        ([PIL.Image.new("RGB", (8, 8))] * 2, "<image> a", "Got 2 images for 1 texts"),
        (PIL.Image.new("RGB", (8, 8)), ["<image> a", "<image> b"], "Got 1 images for 2 texts"),
        ([PIL.Image.new("RGB", (8, 8))] * 2, ["a red", "<image> <image> a"], r"exactly once.*\[0, 2\]"),
        (PIL.Image.new("RGB", (8, 8)), "a red circle", r"marker '<image>' exactly once.*\[0\]"),
        (None, "<image> a", "Found 1 <image> tokens in the text but no images"),
    ],
)
def test_prefix_text_image_mismatch_is_value_error(prefix_processor, images, text, message):
    with pytest.raises(ValueError, match=message):
        prefix_processor(images=images, text=text)


def test_image_token_must_be_the_models_placeholder(tokenizer):
    config = tiny_config(len(tokenizer), cross_attend=False)
    with pytest.raises(ValueError, match="must be a single token of the tokenizer"):
        PalmEProcessor.from_model_config(config, build_tokenizer(image_token=None))
    with pytest.raises(ValueError, match=r"`image_token` '<bos>' is token 1 .* `config.image_token_id` = 16"):
        PalmEProcessor.from_model_config(config, tokenizer, image_token="<bos>")
    with pytest.raises(ValueError, match="`num_image_tokens` must be a positive integer"):
        PalmEProcessor(PalmEImageProcessor(), tokenizer, num_image_tokens=0)


def test_cross_attention_processor_tokenizes_text_as_is(tokenizer):
    config = tiny_config(len(tokenizer))
    processor = PalmEProcessor.from_model_config(config, tokenizer)
    assert processor.image_token is None and processor.num_image_tokens is None
    inputs = processor(images=[PIL.Image.new("RGB", (8, 8))] * 2, text=["a red", "a blue circle"], padding=True)
    assert inputs["input_ids"].tolist() == tokenizer(["a red", "a blue circle"], padding=True)["input_ids"]
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert processor(images=torch.rand(3, 32, 32))["pixel_values"].shape == (1, 3, 32, 32)
    grayscale = processor(images=np.zeros((2, 20, 20), np.uint8)[0], text="a")  # a (height, width) array
    assert grayscale["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="Got 1 images for 2 texts"):
        processor(images=PIL.Image.new("RGB", (8, 8)), text=["a", "a"], padding=True)


def test_processor_round_trip(prefix_processor, tmp_path):
    prefix_processor.save_pretrained(tmp_path)
    image, text = torch.rand(3, 20, 20), "<image> a small red circle"
    expected = prefix_processor(images=image, text=text)
    for loaded in (PalmEProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is PalmEProcessor and type(loaded.image_processor) is PalmEImageProcessor
        assert (loaded.image_token, loaded.image_token_id, loaded.num_image_tokens) == ("<image>", 16, 4)
        assert loaded.image_processor.to_dict() == prefix_processor.image_processor.to_dict()
        outputs = loaded(images=image, text=text)
        assert outputs.keys() == expected.keys()
        for key in expected:
            assert torch.equal(outputs[key], expected[key]), key


@pytest.mark.parametrize("cross_attend", [True, False])
def test_processor_feeds_model_forward_and_generate(tokenizer, cross_attend):
    config = tiny_config(len(tokenizer), cross_attend=cross_attend)
    processor = PalmEProcessor.from_model_config(config, tokenizer)
    model = PalmEForConditionalGeneration(config).eval()
    images = [PIL.Image.new("RGB", (40, 30), (255, 0, 0)), np.zeros((32, 32, 3), np.uint8)]
    marker = "" if cross_attend else "<image> "
    inputs = processor(images=images, text=[marker + "a", marker + "a small red"], padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tokenizer))

    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1]:]
    assert processor.batch_decode(new_tokens) == tokenizer.batch_decode(new_tokens)
    assert processor.decode(new_tokens[0]) == tokenizer.decode(new_tokens[0])
    captions = processor.post_process_image_text_to_text(generated)
    assert len(captions) == 2 and all("<image>" not in caption for caption in captions)
    assert captions[1].startswith("a small red")
    assert processor.post_process_image_text_to_text(generated[1]) == captions[1]
