"""`palme_hf.captioning`: the collator in both image routes, and the folder of captioned images, which reads nothing
outside itself and names every file that cannot be used."""

import json
import os
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import torch

from palme_hf import PalmEForConditionalGeneration, PalmEImageProcessor, PalmEProcessor
from palme_hf.captioning import CaptioningCollator, ImageCaptionFolder, generate_captions
from palme_hf.synthetic_shapes import SyntheticShapesDataset

from tiny_captioner import build_tokenizer, tiny_config


@pytest.mark.slow  # trains
def test_captioning_collator_trains_in_prefix_mode():
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), cross_attend=False)
    model = PalmEForConditionalGeneration(config)
    processor = PalmEProcessor.from_model_config(config, tokenizer)
    items = [SyntheticShapesDataset(8, "train", seed=0, image_size=32)[index] for index in range(8)]
    collator = CaptioningCollator(processor, word_dropout=0.25)

    batch = collator(items)
    prompt_length = 1 + config.num_image_tokens  # <bos> and the image placeholders, as generate_captions prompts
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert (batch["input_ids"][:, 1:prompt_length] == config.image_token_id).all()
    assert (batch["labels"][:, :prompt_length] == -100).all()
    targets = [[token for token in row if token != -100] for row in batch["labels"].tolist()]
    assert [tokenizer.decode(ids[:-1]) for ids in targets] == [item["caption"] for item in items]
    assert all(ids[-1] == tokenizer.eos_token_id for ids in targets)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**collator(items)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses  # it learns
    captions = generate_captions(model, processor, [item["image"] for item in items[:2]], max_new_tokens=4)
    assert len(captions) == 2 and all(processor.image_token not in caption for caption in captions)


def captioned_folder(folder, entries: dict) -> str:
    """A captioned image folder: `entries` (file name -> caption) in metadata.jsonl, a red 8x8 PNG for each name under
    the folder that does not exist yet."""
    os.makedirs(folder, exist_ok=True)
    for name in entries:
        path = os.path.join(folder, name)
        if not os.path.isabs(name) and not os.path.lexists(path) and ".." not in name:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            PIL.Image.new("RGB", (8, 8), "red").save(path)
    lines = [json.dumps({"file_name": name, "text": text}) for name, text in entries.items()]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_image_caption_folder_reads_its_subfolders(tmp_path):
    folder = ImageCaptionFolder(captioned_folder(tmp_path / "data", {"a.png": "a", "deep/er/b.png": "b"}))
    assert folder.files == [str(tmp_path / "data" / "a.png"), str(tmp_path / "data" / "deep/er/b.png")]
    assert folder[1]["caption"] == "b" and folder[1]["image"].size == (8, 8)


def test_image_caption_folder_refuses_files_outside_itself(tmp_path):
    """A downloaded folder must not make a training run read other images of the disk."""
    outside = tmp_path / "outside"
    outside.mkdir()
    PIL.Image.new("RGB", (8, 8), "blue").save(outside / "secret.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "link.png").symlink_to(outside / "secret.png")
    (data / "sub").symlink_to(outside, target_is_directory=True)
    metadata = data / "metadata.jsonl"
    cases = {
        str(outside / "secret.png"): "is an absolute path",
        "../outside/secret.png": "leads outside",
        "link.png": "leads outside",
        "sub/secret.png": "leads outside",
    }
    for file_name, reason in cases.items():
        captioned_folder(data, {"fine.png": "a fine image", file_name: "a secret"})
        with pytest.raises(ValueError, match=f"{metadata}, line 2: file_name {file_name!r} {reason}"):
            ImageCaptionFolder(str(data))


def test_image_caption_folder_names_the_line_that_is_not_utf8(tmp_path):
    data = tmp_path / "data"
    captioned_folder(data, {"a.png": "a"})
    (data / "metadata.jsonl").write_bytes(
        b'{"file_name": "a.png", "text": "a"}\n{"file_name": "a.png", "text": "caf\xe9"}\n'
    )
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 36\)"):
        ImageCaptionFolder(str(data))


def png_header(width: int, height: int) -> bytes:
    """The first bytes of an 8-bit RGB PNG of `width` x `height` pixels (its header and an empty first data chunk):
    enough for Pillow to read its size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", b"")
    )


def test_check_images_names_every_file_that_cannot_be_used(tmp_path):
    """Each of these ended in a traceback in the middle of training (the eval folder's, after it)."""
    data = tmp_path / "data"
    names = ["good.png", "empty.png", "text.png", "int32.tiff", "huge.png", "small.png"]
    captioned_folder(data, {name: "a caption" for name in names})
    (data / "empty.png").write_bytes(b"")
    (data / "text.png").write_text("not an image")
    PIL.Image.fromarray(np.full((8, 8), -5, np.int32)).save(data / "int32.tiff")
    (data / "huge.png").write_bytes(png_header(14_000, 14_000))  # 196 megapixels, refused before decoding
    image_processor = PalmEImageProcessor(size={"height": 8, "width": 8})
    folder = ImageCaptionFolder(str(data))
    with pytest.raises(ValueError) as refusal:
        folder.check_images(image_processor)
    message = str(refusal.value)
    assert message.startswith(f"4 of the 6 images of {data} cannot be used: ")
    for name, reason in [
        ("empty.png", "is an empty file (0 bytes)"),
        ("text.png", "could not read an image from it (UnidentifiedImageError"),
        ("int32.tiff", "got values in [-5, -5]"),
        ("huge.png", "is 14000x14000 = 196,000,000 pixels, more than the limit of 89,478,485 (--max-image-pixels"),
    ]:
        assert f"{data / name}: " in message and reason in message, name
    assert "good.png" not in message and "small.png" not in message

    strict = ImageCaptionFolder(captioned_folder(tmp_path / "small", {"a.png": "a"}), max_image_pixels=63)
    with pytest.raises(ValueError, match="is 8x8 = 64 pixels, more than the limit of 63"):
        strict.check_images(image_processor)
    ImageCaptionFolder(str(tmp_path / "small"), max_image_pixels=64).check_images(image_processor)
