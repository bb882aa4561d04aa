"""PalmEImageProcessor and PalmEProcessor: inputs, errors, normalisation, prefix expansion, save/load, model use, the
chat template."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoImageProcessor, AutoProcessor
from transformers.image_utils import PILImageResampling

from palme_hf import PalmEForConditionalGeneration, PalmEImageProcessor, PalmEProcessor
from palme_hf.cli import DEFAULT_CAPTIONER

from helpers import SAMPLE_IMAGES, sample_captions, sample_image
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
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        torch.testing.assert_close(pixel_values(image_processor, image.to(dtype))[0], image.to(dtype).float())


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
    assert torch.all(transparent == 0.0)  # composited onto black
    torch.testing.assert_close(pixel_values(image_processor, np.full((8, 8), 128, np.uint8))[0], gray)
    torch.testing.assert_close(pixel_values(image_processor, np.full((8, 8, 1), 128, np.uint8))[0], gray)


def test_paths_load_like_images(image_processor, tmp_path):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    from_path = pixel_values(image_processor, str(tmp_path / "image.png"))
    torch.testing.assert_close(from_path, pixel_values(image_processor, image))


def _palette_image(transparency: bool) -> PIL.Image.Image:
    """32x32, palette index 0 (green) on the left half and index 1 (red) on the right; index 0 transparent or not."""
    image = PIL.Image.new("P", (32, 32), 0)
    image.putpalette([0, 255, 0, 255, 0, 0])
    image.paste(1, (16, 0, 32, 32))
    if transparency:
        image.info["transparency"] = 0
    return image


def _expected(*channels: np.ndarray | float) -> torch.Tensor:
    """A (1, 3, 32, 32) `pixel_values` from each channel's value (a number or a (32, 32) array)."""
    return torch.from_numpy(np.stack([np.broadcast_to(np.float32(c), (32, 32)) for c in channels])[None])


def _halves(left: float, right: float) -> np.ndarray:
    return np.concatenate([np.full((32, 16), left), np.full((32, 16), right)], axis=1)


# Files as Pillow writes them, with the pixel values each must give, worked out from what the file holds.
FILES = {
    "l.png": (PIL.Image.new("L", (32, 32), 128), _expected(128 / 255, 128 / 255, 128 / 255)),
    "rgb.png": (PIL.Image.new("RGB", (32, 32), (10, 20, 30)), _expected(10 / 255, 20 / 255, 30 / 255)),
    "one_bit.png": (PIL.Image.new("1", (32, 32), 1), _expected(1.0, 1.0, 1.0)),
    "16_bit.png": (PIL.Image.fromarray(np.full((32, 32), 32768, np.uint16)), _expected(*[32768 / 65535] * 3)),
    "16_bit_big_endian.tiff": (
        PIL.Image.frombytes("I;16B", (32, 32), np.full((32, 32), 1000, ">u2").tobytes()),
        _expected(*[1000 / 65535] * 3),
    ),
    "int32.tiff": (PIL.Image.fromarray(np.full((32, 32), 40000, np.int32)), _expected(*[40000 / 65535] * 3)),
    "float.tiff": (PIL.Image.fromarray(np.full((32, 32), 0.25, np.float32)), _expected(0.25, 0.25, 0.25)),
    # alpha 128 of 255 on black: round(255 * 128 / 255) = 128 and round(200 * 128 / 255) = 100
    "rgba.png": (PIL.Image.new("RGBA", (32, 32), (255, 0, 0, 128)), _expected(128 / 255, 0.0, 0.0)),
    "la.png": (PIL.Image.new("LA", (32, 32), (200, 128)), _expected(100 / 255, 100 / 255, 100 / 255)),
    "palette.png": (_palette_image(transparency=False), _expected(_halves(0, 1), _halves(1, 0), 0.0)),
    "palette_transparent.png": (_palette_image(transparency=True), _expected(_halves(0, 1), 0.0, 0.0)),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_files_of_every_depth_and_mode(image_processor, tmp_path, name):
    image, expected = FILES[name]
    image.save(tmp_path / name)
    with PIL.Image.open(tmp_path / name) as opened:
        assert opened.mode == image.mode  # the file holds what was written (16-bit, float, palette...)
        from_image = pixel_values(image_processor, opened)
    from_path = pixel_values(image_processor, str(tmp_path / name))
    torch.testing.assert_close(from_path, expected, atol=1e-6, rtol=0)
    assert torch.equal(from_image, from_path)


@pytest.mark.parametrize(
    "image, message",
    [
        (PIL.Image.fromarray(np.full((8, 8), -5, np.int32)), r'mode "I" image is read as 16-bit.*\[-5, -5\]'),
        (PIL.Image.fromarray(np.full((8, 8), 70000, np.int32)), r"0\.\.65535.*\[70000, 70000\]"),
        (PIL.Image.fromarray(np.full((8, 8), 2.0, np.float32)), r"values in \[0, 1\], got values in \[2, 2\]"),
        (PIL.Image.fromarray(np.full((8, 8), np.nan, np.float32)), "NaN or infinite"),
    ],
)
def test_files_out_of_range_are_value_errors(image_processor, tmp_path, image, message):
    image.save(tmp_path / "image.tiff")
    for given in (str(tmp_path / "image.tiff"), PIL.Image.open(tmp_path / "image.tiff")):
        with pytest.raises(ValueError, match=message):
            image_processor(given)


def test_integer_arrays_by_dtype(image_processor):
    array = np.random.default_rng(0).integers(0, 256, (3, 32, 32))  # int64, as torch.randint makes them
    expected = pixel_values(image_processor, array.astype(np.uint8))
    torch.testing.assert_close(expected[0], torch.from_numpy(array / 255).float())
    assert torch.equal(pixel_values(image_processor, array), expected)
    assert torch.equal(pixel_values(image_processor, torch.from_numpy(array).int()), expected)
    sixteen = np.full((32, 32, 3), 65535, np.uint16)
    assert torch.all(pixel_values(image_processor, sixteen) == 1.0)
    assert torch.all(pixel_values(image_processor, torch.from_numpy(sixteen)) == 1.0)
    assert torch.all(pixel_values(image_processor, np.ones((32, 32), bool)) == 1.0)
    with pytest.raises(ValueError, match=r"int64 values in \[0, 300\]. Give 16-bit images as uint16"):
        image_processor(np.array([[0, 300]] * 4))
    with pytest.raises(ValueError, match="unsupported image dtype complex64"):
        image_processor(np.zeros((8, 8, 3), np.complex64))
    # `do_rescale` is the rescaling of 8-bit values; 16-bit ones always become [0, 1]
    raw = PalmEImageProcessor(size=SIZE, do_rescale=False)
    assert torch.all(pixel_values(raw, np.full((32, 32, 3), 200, np.uint8)) == 200)
    assert torch.all(pixel_values(raw, sixteen) == 1.0)


def test_float_images_outside_unit_range(image_processor):
    image = np.full((32, 32, 3), 0.5, np.float32)
    image[0, 0, 0] = 1.0005
    with pytest.warns(UserWarning, match=r"clipped a floating-point image with values in \[0.5, 1.0005\]"):
        clipped = pixel_values(image_processor, image)
    assert clipped.max() == 1.0 and clipped[0, 0, 1, 1] == 0.5
    image[0, 0, 0] = 1.02  # not divided by 255: an error
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got values in \[0.5, 1.02\]"):
        image_processor(image)
    with pytest.raises(ValueError, match=r"got values in \[0, 255\]. Floats are never rescaled"):
        image_processor(np.arange(256, dtype=np.float32).reshape(16, 16))
    for value in (np.nan, np.inf, -np.inf):
        image[0, 0, 0] = value
        with pytest.raises(ValueError, match="NaN or infinite"):
            image_processor(torch.from_numpy(image))


@pytest.mark.parametrize(
    "image", [np.zeros((0, 8, 3), np.uint8), torch.zeros(3, 8, 0), PIL.Image.new("RGB", (0, 8)), np.zeros((3, 0))]
)
def test_empty_images_are_value_errors(image_processor, image):
    with pytest.raises(ValueError, match="the image is empty"):
        image_processor(image)


def test_bicubic_resize_stays_in_unit_range():
    image = torch.zeros(3, 8, 8)
    image[:, :, 4:] = 1.0  # upsampled, the edge rings: bicubic overshoots it on both sides
    resized = pixel_values(PalmEImageProcessor(size=SIZE, resample=PILImageResampling.BICUBIC), image)
    assert resized.min() == 0.0 and resized.max() == 1.0


def test_channel_axis_of_ambiguous_shapes(image_processor):
    # (3, 32, 4) could be 3 channels of 32x4 or 4 channels of 3x32: channels first, unless said otherwise
    array = np.random.default_rng(0).integers(0, 256, (3, 32, 4), dtype=np.uint8)
    first = pixel_values(image_processor, array)
    assert torch.equal(first, pixel_values(image_processor, array, input_data_format="channels_first"))
    last = pixel_values(image_processor, array, input_data_format="channels_last")
    assert torch.equal(last, pixel_values(image_processor, PIL.Image.fromarray(array, "RGBA")))
    assert not torch.equal(first, last)


def test_batches_of_mixed_sizes_and_types(image_processor, tmp_path):
    PIL.Image.fromarray(np.full((10, 20), 65535, np.uint16)).save(tmp_path / "white.png")
    images = [
        str(tmp_path / "white.png"),
        np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8),
        torch.rand(3, 40, 30),
        PIL.Image.new("RGBA", (12, 9), (0, 0, 255, 255)),
        np.full((50, 3), 0.25),
    ]
    batch = pixel_values(image_processor, images)
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32
    for row, image in zip(batch, images):
        assert torch.equal(row, pixel_values(image_processor, image)[0])
    assert torch.all(batch[0] == 1.0) and torch.all(batch[3, 2] == 1.0) and torch.all(batch[4] == 0.25)


def test_exif_orientation_of_paths_and_pil_images(image_processor, tmp_path):
    # 32 wide, 16 high: red on the left, blue on the right; EXIF orientation 6 means "turn 90 degrees clockwise"
    array = np.zeros((16, 32, 3), np.uint8)
    array[:, :16, 0] = array[:, 16:, 2] = 255
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(array).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    from_path = pixel_values(image_processor, str(tmp_path / "photo.jpg"))[0]
    with PIL.Image.open(tmp_path / "photo.jpg") as image:
        assert torch.equal(pixel_values(image_processor, image)[0], from_path)
    # turned upright, 16 wide and 32 high: red on top, blue below (resized to 32x32; JPEG blurs the edge)
    assert from_path[0, :12].min() > 0.9 and from_path[2, :12].max() < 0.1
    assert from_path[2, 20:].min() > 0.9 and from_path[0, 20:].max() < 0.1


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
        (
            [PIL.Image.new("RGB", (8, 8))] * 2,
            "<image> a",
            r"1 image markers '<image>' \(\[1\] per text\) but 2 images",
        ),
        (PIL.Image.new("RGB", (8, 8)), ["<image> a", "<image> b"], r"2 image markers .*\[1, 1\].* but 1 images"),
        ([PIL.Image.new("RGB", (8, 8))] * 3, ["a red", "<image> <image> a"], r"2 image markers .*\[0, 2\].* 3 images"),
        (PIL.Image.new("RGB", (8, 8)), "a red circle", r"0 image markers .*\[0\].* but 1 images"),
        (None, "<image> a", r"1 image markers .*\[1\].* but 0 images"),
    ],
)
def test_prefix_text_image_mismatch_is_value_error(prefix_processor, images, text, message):
    with pytest.raises(ValueError, match=message):
        prefix_processor(images=images, text=text)


def test_prefix_texts_hold_any_number_of_images(prefix_processor, tokenizer):
    red, blue, green = (PIL.Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "green"))
    image_id = prefix_processor.image_token_id
    batch = prefix_processor(images=[[red, blue], [green]], text=["<image> a <image> red", "a <image>"], padding=True)
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [8, 4]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    flat = prefix_processor(images=[red, blue, green], text=["<image> a <image> red", "a <image>"], padding=True)
    for key in batch:
        assert torch.equal(batch[key], flat[key]), key
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 0.0, 0.0]  # the images in the order of their markers
    assert batch["pixel_values"][1, 2, 0, 0] == 1.0


def test_image_token_is_added_to_the_tokenizer(tokenizer):
    config = tiny_config(len(tokenizer), cross_attend=False)
    bare = build_tokenizer(image_token=None)
    processor = PalmEProcessor.from_model_config(config, bare)  # `<image>` becomes an added special token
    assert processor.image_token_id == config.image_token_id == len(bare) - 1
    assert "<image>" in bare.all_special_tokens and bare.convert_ids_to_tokens(config.image_token_id) == "<image>"
    assert bare.encode("red <image><image>", add_special_tokens=False)[1:] == [config.image_token_id] * 2
    with pytest.raises(ValueError, match="must be a single token of the tokenizer"):
        PalmEProcessor(
            PalmEImageProcessor(), build_tokenizer(image_token=None), image_token="<img>", num_image_tokens=4
        )
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


@pytest.mark.parametrize("cross_attend", [True, False])
def test_one_channels_first_tensor_is_one_image(tokenizer, cross_attend):
    processor = PalmEProcessor.from_model_config(tiny_config(len(tokenizer), cross_attend=cross_attend), tokenizer)
    text = "" if cross_attend else "<image> a"
    assert processor(images=torch.rand(3, 32, 32), text=[text])["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="Got 1 images for 3 texts" if cross_attend else "3 image markers.* 1 images"):
        processor(images=torch.rand(3, 32, 32), text=[text] * 3)


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
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    assert processor.batch_decode(new_tokens) == tokenizer.batch_decode(new_tokens)
    assert processor.decode(new_tokens[0]) == tokenizer.decode(new_tokens[0])
    captions = processor.post_process_image_text_to_text(generated)
    assert len(captions) == 2 and all("<image>" not in caption for caption in captions)
    assert captions[1].startswith("a small red")
    assert processor.post_process_image_text_to_text(generated[1]) == captions[1]


QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is left of the circle?"}]}]


@pytest.mark.parametrize("cross_attend", [True, False])
def test_chat_template_writes_instruction_prompts(cross_attend, tmp_path):
    tokenizer = build_tokenizer()
    processor = PalmEProcessor.from_model_config(tiny_config(len(tokenizer), cross_attend=cross_attend), tokenizer)
    marker = "" if cross_attend else "<image> "
    assert processor.apply_chat_template(QUESTION) == f"Q: {marker}what is left of the circle?"
    assert processor.apply_chat_template(QUESTION, add_generation_prompt=True) == (
        f"Q: {marker}what is left of the circle? A:"
    )
    conversation = [
        {"role": "system", "content": "answer briefly"},
        *QUESTION,
        {"role": "assistant", "content": [{"type": "text", "text": "a square"}]},
        {"role": "user", "content": "and right of it?"},
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        f"answer briefly Q: {marker}what is left of the circle? A: a square Q: and right of it? A:"
    )
    # an image alone is the captioning prompt: the bare marker, or nothing with cross-attention
    caption = [{"role": "user", "content": [{"type": "image"}]}]
    assert processor.apply_chat_template(caption, add_generation_prompt=True) == marker.strip()

    processor.save_pretrained(tmp_path)
    reloaded = PalmEProcessor.from_pretrained(tmp_path)
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.apply_chat_template(QUESTION) == processor.apply_chat_template(QUESTION)


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([{"role": "robot", "content": "hello"}], 'roles are "system", "user" and "assistant", got robot'),
        (
            [{"role": "user", "content": [{"type": "video"}]}],
            'messages hold "image", "state", "object" and "text" items, got a video item',
        ),
    ],
)
def test_chat_template_refuses_what_it_cannot_write(conversation, message):
    processor = PalmEProcessor.from_pretrained(DEFAULT_CAPTIONER)
    with pytest.raises(TemplateError, match=message):
        processor.apply_chat_template(conversation)


def test_chat_template_prompts_the_shipped_captioner():
    processor = PalmEProcessor.from_pretrained(DEFAULT_CAPTIONER)
    model = PalmEForConditionalGeneration.from_pretrained(DEFAULT_CAPTIONER)
    path = os.path.join(SAMPLE_IMAGES, "held_out_00.png")
    conversation = [{"role": "user", "content": [{"type": "image", "path": path}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert torch.equal(inputs["input_ids"], processor(images=[sample_image()], text=[""])["input_ids"])
    generated = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    [caption] = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
    assert caption.strip() == sample_captions()["held_out_00.png"]


@pytest.mark.parametrize(
    "images, text, message",
    [
        (
            [["red"], ["blue", "green"]],
            ["<image> <image> x", "y <image>"],
            r"Text 0 \('<image> <image> x'\) holds 2 image markers '<image>', but its list holds 1 images",
        ),
        ([["red"], ["blue"], ["green"]], ["<image> x", "y <image>"], "Got 3 lists of images for 2 texts"),
        ([["red", "blue"]], "<image> x", r"Text 0 .* holds 1 image markers '<image>', but its list holds 2 images"),
    ],
)
def test_one_list_of_images_per_text_is_checked_text_by_text(prefix_processor, images, text, message):
    images = [[PIL.Image.new("RGB", (8, 8), colour) for colour in group] for group in images]
    with pytest.raises(ValueError, match=message):
        prefix_processor(images=images, text=text)


def test_cross_attention_takes_one_image_in_each_list(tokenizer):
    processor = PalmEProcessor.from_model_config(tiny_config(len(tokenizer)), tokenizer)
    red, blue = PIL.Image.new("RGB", (8, 8), "red"), PIL.Image.new("RGB", (8, 8), "blue")
    assert processor(images=[[red], [blue]], text=["a", "b"], padding=True)["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"Text 1 \('b'\) takes one image \(cross-attention\), but its list holds 0"):
        processor(images=[[red], []], text=["a", "b"], padding=True)


@pytest.mark.parametrize("cross_attend", [True, False])
def test_no_images_give_no_pixel_values(tokenizer, cross_attend):
    config = tiny_config(len(tokenizer), cross_attend=cross_attend)
    processor = PalmEProcessor.from_model_config(config, tokenizer)
    inputs = processor(images=[], text=["a red"])
    assert set(inputs) == {"input_ids", "attention_mask"}
    model = PalmEForConditionalGeneration(config).eval()
    assert model.generate(**inputs, max_new_tokens=2, min_new_tokens=2).shape == (1, inputs["input_ids"].shape[1] + 2)
    if not cross_attend:
        with pytest.raises(ValueError, match="The texts hold 1 image markers '<image>' .* but 0 images were given"):
            processor(images=[], text=["<image> a red"])
