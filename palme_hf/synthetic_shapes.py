"""
A synthetic image-captioning dataset: pictures of one to three coloured shapes with compositional captions, such as
"a small red circle left of a large blue square", and the word-level tokenizer that goes with them.

A scene puts each shape in its own third of the image (left, centre or right column; the vertical position and the
position inside the column are random), so shapes never overlap and "left of" is never ambiguous. The caption
describes the shapes from left to right, as `a <size> <colour> <shape>`, joined by `left of`.

Every image is drawn from its split, seed and index alone, so a split of any length is deterministic and costs no
memory. The `"held_out"` split is made of scenes holding at least one (size, colour, shape) combination of
`HELD_OUT_COMBINATIONS`, which the `"train"` split never shows: a captioner scored on it has to compose attributes
it has only seen apart.

Photos of such scenes are not clean renders: `ImageAugmentation` (the dataset's `augmentation`) crops, rescales,
brightens or darkens, adds sensor noise to and JPEG-compresses each image at random, and `jpeg_compress`,
`add_gaussian_noise`, `scale_brightness`, `resize_by` and `with_transparent_background` apply one such change at a
fixed strength (to score a captioner under it).
"""

import io
import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerFast

SIZES = ("small", "large")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (40, 90, 240), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (0, 0, 0)
MAX_SHAPES = 3
# The side of a shape's bounding box, as a fraction of a column's width (a third of the image).
SIZE_FRACTIONS = {"small": 0.4, "large": 0.8}

ALL_COMBINATIONS = tuple(itertools.product(SIZES, COLOURS, SHAPES))
# Each held-out combination differs from training ones in one attribute only: every (size, colour), (size, shape)
# and (colour, shape) pair still appears in training.
HELD_OUT_COMBINATIONS = (
    ("large", "red", "triangle"),
    ("small", "green", "circle"),
    ("large", "blue", "square"),
    ("small", "yellow", "triangle"),
)
TRAIN_COMBINATIONS = tuple(c for c in ALL_COMBINATIONS if c not in HELD_OUT_COMBINATIONS)
SPLITS = ("train", "held_out")

CAPTION_WORDS = ("a", *SIZES, *COLOURS, *SHAPES, "left", "of")
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
# bos, three shapes of four words, two "left of", eos
MAX_CAPTION_TOKENS = 1 + 4 * MAX_SHAPES + 2 * (MAX_SHAPES - 1) + 1


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene: its attributes, and the centre and side of its bounding box, in pixels."""

    size: str
    colour: str
    shape: str
    center_x: float
    center_y: float
    side: float

    def describe(self) -> str:
        """The shape's words in a caption, e.g. `"a small red circle"`."""
        return f"a {self.size} {self.colour} {self.shape}"


def check_split(split: str):
    """Raises a `ValueError` unless `split` is one of `SPLITS`: `"train"` or `"held_out"`."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")


def sample_scene(rng: random.Random, split: str, image_size: int) -> list[ShapeSpec]:
    """
    Draws one to three shapes from `rng`, in distinct columns and ordered left to right. `"train"` scenes use only
    `TRAIN_COMBINATIONS`; `"held_out"` scenes hold at least one of `HELD_OUT_COMBINATIONS`.
    """
    check_split(split)
    num_shapes = rng.randint(1, MAX_SHAPES)
    columns = sorted(rng.sample(range(MAX_SHAPES), num_shapes))
    if split == "train":
        combinations = [rng.choice(TRAIN_COMBINATIONS) for _ in columns]
    else:
        combinations = [rng.choice(ALL_COMBINATIONS) for _ in columns]
        combinations[rng.randrange(num_shapes)] = rng.choice(HELD_OUT_COMBINATIONS)
    column_width = image_size / MAX_SHAPES
    scene = []
    for column, (size, colour, shape) in zip(columns, combinations):
        side = SIZE_FRACTIONS[size] * column_width
        slack_x = (column_width - side) / 2 - 1
        center_x = (column + 0.5) * column_width + rng.uniform(-slack_x, slack_x)
        center_y = rng.uniform(side / 2 + 1, image_size - side / 2 - 1)
        scene.append(ShapeSpec(size, colour, shape, center_x, center_y, side))
    return scene


def caption_scene(scene: list[ShapeSpec]) -> str:
    """The caption of a scene: its shapes from left to right, joined by "left of"."""
    ordered = sorted(scene, key=lambda spec: spec.center_x)
    return " left of ".join(spec.describe() for spec in ordered)


def draw_scene(scene: list[ShapeSpec], image_size: int) -> Image.Image:
    """Draws a scene as an RGB image on a black background (every colour then contrasts with it alike)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for spec in scene:
        half = spec.side / 2
        left, top = spec.center_x - half, spec.center_y - half
        right, bottom = spec.center_x + half, spec.center_y + half
        fill = COLOURS[spec.colour]
        if spec.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif spec.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([(spec.center_x, top), (right, bottom), (left, bottom)], fill=fill)
    return image


def jpeg_compress(image: Image.Image, quality: int) -> Image.Image:
    """`image` saved as a JPEG of `quality` (1 to 95, Pillow's scale; Pillow's default chroma subsampling) and read
    back, as RGB."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"`quality` must be an integer from 1 to 95, got {quality!r}.")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as compressed:
        return compressed.convert("RGB")


def add_gaussian_noise(image: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    """`image` (RGB) plus independent Gaussian noise of standard deviation `sigma` (a fraction of the full 0..255
    scale: `5 / 255` is five grey levels) on every pixel and channel, drawn from `rng`, rounded and clipped to
    uint8."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma <= 1:
        raise ValueError(f"`sigma` must be a number in [0, 1] (a fraction of the 0..255 scale), got {sigma!r}.")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 255 * sigma, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8))


def scale_brightness(image: Image.Image, factor: float) -> Image.Image:
    """`image` (RGB) with every value multiplied by `factor` (> 0), rounded and clipped to uint8."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"`factor` must be a positive number, got {factor!r}.")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(pixels * factor), 0, 255).astype(np.uint8))


def resize_by(image: Image.Image, factor: float) -> Image.Image:
    """`image` resized (bilinear) by `factor` (> 0) in both directions, to at least one pixel."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"`factor` must be a positive number, got {factor!r}.")
    width, height = image.size
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return image.resize(size, resample=Image.Resampling.BILINEAR)


def with_transparent_background(image: Image.Image) -> Image.Image:
    """An RGBA version of a render whose background pixels are fully transparent and white underneath (a PNG with
    transparency): composited onto black, as `PalmEImageProcessor` does, it is the render again."""
    rgb = np.asarray(image.convert("RGB"))
    background = (rgb == BACKGROUND).all(axis=-1)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)], axis=-1)
    rgba[background] = (255, 255, 255, 0)
    return Image.fromarray(rgba, mode="RGBA")


def _check_range(name: str, value, low: float, high: float, integer: bool = False):
    """A `(min, max)` pair within [low, high], min <= max (integers with `integer`), or None; else a ValueError."""
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or any(isinstance(bound, bool) or not isinstance(bound, kinds) for bound in value)
        or not low <= value[0] <= value[1] <= high
    ):
        kind = "integers" if integer else "numbers"
        raise ValueError(
            f"ImageAugmentation: `{name}` must be None or a (min, max) tuple of {kind} with {low} <= min <= max <= "
            f"{high}, got {value!r}."
        )


@dataclass(frozen=True)
class ImageAugmentation:
    """
    Random photo-like changes to a render, each applied with `probability`, in the order a photo meets them: a crop
    of up to `max_crop` of the side off each edge, a resize by a factor in `scale`, a brightness factor in
    `brightness`, Gaussian noise of a standard deviation in `noise_sigma` (a fraction of the 0..255 scale) and a
    JPEG round trip at a quality in `jpeg_quality`. Strengths are drawn uniformly; a range of None turns that change
    off. The caption stays true: shapes keep their colours and their left-to-right order, and the processor resizes
    the image back to the model's size.

    Args:
        probability (`float`, defaults to 0.5): probability of each change, independently.
        max_crop (`float`, defaults to 0.03): largest fraction of the width (height) cropped off each side.
        scale (`tuple[float, float]`, defaults to `(0.85, 1.2)`): range of the resize factor.
        brightness (`tuple[float, float]`, defaults to `(0.85, 1.15)`): range of the brightness factor.
        noise_sigma (`tuple[float, float]`, defaults to `(0, 10 / 255)`): range of the noise's standard deviation.
        jpeg_quality (`tuple[int, int]`, defaults to `(30, 95)`): range of the JPEG quality.
    """

    probability: float = 0.5
    max_crop: float = 0.03
    scale: tuple[float, float] | None = (0.85, 1.2)
    brightness: tuple[float, float] | None = (0.85, 1.15)
    noise_sigma: tuple[float, float] | None = (0.0, 10 / 255)
    jpeg_quality: tuple[int, int] | None = (30, 95)

    def __post_init__(self):
        for name, value, high in (("probability", self.probability, 1.0), ("max_crop", self.max_crop, 0.25)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                raise ValueError(f"ImageAugmentation: `{name}` must be a number in [0, {high}], got {value!r}.")
        _check_range("scale", self.scale, 0.25, 4.0)
        _check_range("brightness", self.brightness, 0.25, 4.0)
        _check_range("noise_sigma", self.noise_sigma, 0.0, 1.0)
        _check_range("jpeg_quality", self.jpeg_quality, 1, 95, integer=True)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        """`image` changed at random, every draw from `rng` (so the same `rng` state gives the same image)."""
        image = image.convert("RGB")
        if self.max_crop > 0 and rng.random() < self.probability:
            width, height = image.size
            left, right = (int(rng.uniform(0, self.max_crop) * width) for _ in range(2))
            top, bottom = (int(rng.uniform(0, self.max_crop) * height) for _ in range(2))
            image = image.crop((left, top, width - right, height - bottom))
        if self.scale is not None and rng.random() < self.probability:
            image = resize_by(image, rng.uniform(*self.scale))
        if self.brightness is not None and rng.random() < self.probability:
            image = scale_brightness(image, rng.uniform(*self.brightness))
        if self.noise_sigma is not None and rng.random() < self.probability:
            image = add_gaussian_noise(image, rng.uniform(*self.noise_sigma), rng)
        if self.jpeg_quality is not None and rng.random() < self.probability:
            image = jpeg_compress(image, rng.randint(*self.jpeg_quality))
        return image


class SyntheticShapesDataset(Dataset):
    """
    `num_samples` captioned scenes of a split: item `index` is `{"image": PIL.Image, "caption": str}`, drawn from
    `(seed, split, index)` alone, the augmentation's draws included.

    Args:
        num_samples (`int`): length of the dataset.
        split (`str`, defaults to `"train"`): `"train"` or `"held_out"`.
        seed (`int`, defaults to 0): the dataset's seed; the two splits of one seed are independent.
        image_size (`int`, defaults to 64): height and width of the renders.
        augmentation ([`ImageAugmentation`], *optional*): applied to every render (the images may then have other
            sizes); None gives the clean renders.
    """

    def __init__(
        self,
        num_samples: int,
        split: str = "train",
        seed: int = 0,
        image_size: int = 64,
        augmentation: ImageAugmentation | None = None,
    ):
        check_split(split)
        if augmentation is not None and not isinstance(augmentation, ImageAugmentation):
            raise ValueError(f"`augmentation` must be an ImageAugmentation or None, got {augmentation!r}.")
        if num_samples < 0:
            raise ValueError(f"`num_samples` must be >= 0, got {num_samples}.")
        if image_size < 24:
            raise ValueError(
                f"`image_size` must be at least 24 pixels for the shapes to be told apart, got {image_size}."
            )
        self.num_samples = num_samples
        self.split = split
        self.seed = seed
        self.image_size = image_size
        self.augmentation = augmentation

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> list[ShapeSpec]:
        """The shapes of item `index`."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for a dataset of {self.num_samples} samples.")
        # A string seed is hashed with SHA-512: the same on every run and platform.
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        return sample_scene(rng, self.split, self.image_size)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        image = draw_scene(scene, self.image_size)
        if self.augmentation is not None:
            image = self.augmentation(image, random.Random(f"{self.seed}/{self.split}/{index}/augmentation"))
        return {"image": image, "caption": caption_scene(scene)}


def build_caption_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """
    A word-level tokenizer for the captions of this dataset (`tokenizers` WordLevel model, whitespace
    pre-tokenizer), as a Transformers fast tokenizer. Ids 0 to 3 are `<pad>`, `<bos>`, `<eos>`, `<unk>`, then
    `CAPTION_WORDS` follow. Encoding prepends `<bos>`, so the prompt for captioning is the empty string; the
    end-of-caption `<eos>` is the training target that stops generation. `padding_side="left"` suits batched
    generation from prompts of different lengths.
    """
    return build_word_level_tokenizer(CAPTION_WORDS, pre_tokenizers.WhitespaceSplit(), padding_side)


def build_word_level_tokenizer(
    words, pre_tokenizer: pre_tokenizers.PreTokenizer, padding_side: str = "right"
) -> PreTrainedTokenizerFast:
    """
    A word-level tokenizer (`tokenizers` WordLevel model) of `words`, split into words by `pre_tokenizer`, as a
    Transformers fast tokenizer: ids 0 to 3 are `<pad>`, `<bos>`, `<eos>`, `<unk>`, then `words`; encoding prepends
    `<bos>`.
    """
    special_tokens = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
    vocab = {token: index for index, token in enumerate([*special_tokens, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side=padding_side,
        model_input_names=["input_ids", "attention_mask"],
    )


__all__ = [
    "ALL_COMBINATIONS",
    "CAPTION_WORDS",
    "HELD_OUT_COMBINATIONS",
    "ImageAugmentation",
    "MAX_CAPTION_TOKENS",
    "ShapeSpec",
    "SyntheticShapesDataset",
    "TRAIN_COMBINATIONS",
    "add_gaussian_noise",
    "build_caption_tokenizer",
    "caption_scene",
    "draw_scene",
    "jpeg_compress",
    "resize_by",
    "sample_scene",
    "scale_brightness",
    "with_transparent_background",
]
