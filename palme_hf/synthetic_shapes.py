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
"""

import itertools
import random
from dataclasses import dataclass

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
        return f"a {self.size} {self.colour} {self.shape}"


def check_split(split: str):
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


class SyntheticShapesDataset(Dataset):
    """
    `num_samples` captioned scenes of a split: item `index` is `{"image": PIL.Image, "caption": str}`, drawn from
    `(seed, split, index)` alone.

    Args:
        num_samples (`int`): length of the dataset.
        split (`str`, defaults to `"train"`): `"train"` or `"held_out"`.
        seed (`int`, defaults to 0): the dataset's seed; the two splits of one seed are independent.
        image_size (`int`, defaults to 64): height and width of the images.
    """

    def __init__(self, num_samples: int, split: str = "train", seed: int = 0, image_size: int = 64):
        check_split(split)
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
        return {"image": draw_scene(scene, self.image_size), "caption": caption_scene(scene)}


def build_caption_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """
    A word-level tokenizer for the captions of this dataset (`tokenizers` WordLevel model, whitespace
    pre-tokenizer), as a Transformers fast tokenizer. Ids 0 to 3 are `<pad>`, `<bos>`, `<eos>`, `<unk>`, then
    `CAPTION_WORDS` follow. Encoding prepends `<bos>`, so the prompt for captioning is the empty string; the
    end-of-caption `<eos>` is the training target that stops generation. `padding_side="left"` suits batched
    generation from prompts of different lengths.
    """
    special_tokens = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
    vocab = {token: index for index, token in enumerate([*special_tokens, *CAPTION_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
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
    "MAX_CAPTION_TOKENS",
    "ShapeSpec",
    "SyntheticShapesDataset",
    "TRAIN_COMBINATIONS",
    "build_caption_tokenizer",
    "caption_scene",
    "draw_scene",
    "sample_scene",
]
