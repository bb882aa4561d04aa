"""Image processor and processor (tokenizer + images) for PalmE."""

import json
import os
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
    is_valid_image,
    load_image,
    make_flat_list_of_images,
)
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .compat_palme import processor_defaults
from .configuration_palme import PalmEConfig, num_patches_of
from .towers_palme import (
    HUB_ARGUMENTS,
    IMAGE_TOKEN,
    OBJECT_TOKEN,
    STATE_TOKEN,
    add_image_token,
    add_placeholder_token,
    split_loading_arguments,
    vision_tower_class_and_config,
)

# How far outside [0, 1] a floating-point image may go and still be clipped (with a warning) rather than refused.
FLOAT_RANGE_TOLERANCE = 1e-3


def _add_channel_axis(image):
    """`(height, width)` arrays and tensors as `(1, height, width)`; anything else unchanged."""
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 2:
        return image[None]
    return image


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """A channels-first image with 1 channel repeated to RGB, or with 4 composited onto black: `rgb * alpha`."""
    if image.shape[0] == 1:
        return np.repeat(image, 3, axis=0)
    if image.shape[0] == 4 and image.dtype == np.uint8:
        return np.round(image[:3] * (image[3:] / 255)).astype(np.uint8)
    if image.shape[0] == 4:
        return image[:3] * image[3:]
    return image


class PalmEImageProcessor(PilBackend):
    r"""
    Turns images into the `pixel_values` of a PalmE model, `(batch_size, 3, height, width)` float32 in [0, 1]: each
    image is turned by its EXIF orientation (PIL images, given or read from a file), converted to RGB, resized to
    `size` and brought to [0, 1] by its type. Mean/std normalisation is off by default: the reference PalmE is fed
    un-normalised [0, 1] images.

    Accepts one image or a list of images (of any sizes), each a PIL image, a numpy array or a torch tensor of shape
    `(height, width)`, `(channels, height, width)` or `(height, width, channels)` with 1, 3 or 4 channels, or the
    path, http(s) URL or base64 string of an image file; a numpy array or tensor with a leading batch dimension is a
    batch. Files are read with Pillow at their depth (16-bit and float files too); URLs and base64 strings are read
    by Transformers' `load_image`, as 8-bit RGB.

    Pixel values, by the image's type (v: a value of the image):

    | image                                                                 | values    | pixel value              |
    |-----------------------------------------------------------------------|-----------|--------------------------|
    | uint8; PIL modes 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, ...         | 0..255    | v * `rescale_factor`     |
    | other integer dtypes (int64 of `torch.randint`, int32, int16, ...)    | 0..255    | as uint8 (else an error) |
    | bool                                                                  | 0, 1      | as uint8 0 and 255       |
    | uint16; PIL modes I;16, I;16B, ... (16-bit PNG and TIFF files)        | 0..65535  | v / 65535                |
    | PIL mode I (int32: 32-bit TIFF files, 16-bit files in older Pillow)   | 0..65535  | v / 65535 (else an error)|
    | floating point: float16/32/64, bfloat16, PIL mode F (float TIFF files)| [0, 1]    | v (see below)            |

    Floating-point images are never rescaled: values less than `FLOAT_RANGE_TOLERANCE` (1e-3) outside [0, 1] are
    clipped with a warning; values further out (8-bit values in a float array, say), NaN and infinity are a
    `ValueError`. Images other than 8-bit ones are resized in floating point, without a round trip through 8 bits.

    Channels (with `do_convert_rgb`): grayscale is repeated; an alpha channel (4-channel arrays, PIL modes LA, PA,
    RGBA, and P, L or RGB with a transparent colour) is composited onto black, `rgb * alpha`, the background of the
    synthetic captioner's images. An array's channels are first when `shape[0]` is 1, 3 or 4, else last (when
    `shape[-1]` is); when both are, first, as in Transformers (pass `input_data_format="channels_last"` for the
    other). A zero-height or zero-width image is a `ValueError`.

    Args:
        size (`dict[str, int]`, defaults to `{"height": 256, "width": 256}`): the model's image size
            (`config.vision_config.image_size`).
        resample (`PILImageResampling`, defaults to `BILINEAR`): resampling filter of the resize.
        do_rescale (`bool`, defaults to `True`), rescale_factor (`float`, defaults to `1 / 255`): rescaling of 8-bit
            images to [0, 1].
        do_normalize (`bool`, defaults to `False`), image_mean, image_std (defaults to 0.5 per channel): optional
            normalisation, `(pixel - mean) / std`, after rescaling.
        do_convert_rgb (`bool`, defaults to `True`): convert grayscale and RGBA images to RGB. Without it, an image
            that does not have 3 channels is an error.
        return_tensors (`str`, defaults to `"pt"`): `pixel_values` as one PyTorch tensor (`None`: a list of arrays).
    """

    resample = PILImageResampling.BILINEAR
    size = {"height": 256, "width": 256}
    do_resize = True
    do_rescale = True
    do_normalize = False
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    do_convert_rgb = True
    return_tensors = "pt"

    def fetch_images(self, image_url_or_urls):
        """Loads the images given as paths, URLs or base64 strings; anything that is not an image is a `ValueError`."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(image) for image in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            source = image_url_or_urls
            try:
                if os.path.isfile(source):
                    # not `load_image`: its conversion to 8-bit RGB clips 16-bit files to white and float ones to
                    # black. `exif_transpose` reads the orientation (a TIFF keeps it in tags that a copy loses) and
                    # loads the pixels before the file is closed.
                    with PIL.Image.open(source) as image:
                        return PIL.ImageOps.exif_transpose(image)
                return load_image(source)
            except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
                expected = "; expected the path of an image file, an http(s) URL or a base64-encoded image"
                if os.path.isfile(source):
                    expected = ""
                raise ValueError(
                    f"{type(self).__name__}: could not read an image from {source[:200]!r}{expected} "
                    f"({type(error).__name__}: {str(error)[:200]})."
                ) from error
        if is_valid_image(image_url_or_urls):
            return image_url_or_urls
        raise ValueError(
            f"{type(self).__name__}: expected an image (a PIL image, a numpy array, a torch tensor, or the path or "
            f"URL of an image file) or a list of images, got {type(image_url_or_urls).__name__}: "
            f"{repr(image_url_or_urls)[:200]}."
        )

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        images = self.fetch_images(images)
        # a (height, width) array is one grayscale image
        if isinstance(images, (list, tuple)):
            images = [_add_channel_axis(image) for image in images]
        else:
            images = _add_channel_axis(images)
        try:
            return make_flat_list_of_images(images, expected_ndims=expected_ndims)
        except ValueError as error:
            items = images if isinstance(images, (list, tuple)) else [images]
            found = [tuple(item.shape) if hasattr(item, "shape") else type(item).__name__ for item in items]
            raise ValueError(
                f"{type(self).__name__}: expected one image or a batch of images (a list, or an array with a leading "
                f"batch dimension) of shape (height, width), (channels, height, width) or (height, width, channels); "
                f"got {found}."
            ) from error

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        """One image as a channels-first RGB array `(3, height, width)`, uint8 or float32 in [0, 1] (the table)."""
        if isinstance(image, PIL.Image.Image):
            image = self._pil_to_numpy(image, do_convert_rgb)
            input_data_format = ChannelDimension.LAST
        elif isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()  # numpy has no bfloat16
        if image.ndim == 2:
            image = image[None]
            input_data_format = ChannelDimension.FIRST
        elif input_data_format is None:
            if image.shape[0] not in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"{type(self).__name__}: expected an image with 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, "
                    f"first or last; got an array of shape {tuple(image.shape)}."
                )
            input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
        if ChannelDimension(input_data_format) == ChannelDimension.LAST:
            image = np.moveaxis(image, -1, 0)
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(
                f"{type(self).__name__}: the image is empty: {image.shape[1]}x{image.shape[2]} pixels (height x "
                f"width)."
            )
        image = self._to_unit_range(image)
        if do_convert_rgb:
            image = _to_rgb(image)
        if image.shape[0] != 3:
            raise ValueError(
                f"{type(self).__name__}: expected an RGB image (3 channels), got {image.shape[0]} channels "
                f"(channels-first shape {tuple(image.shape)}); `do_convert_rgb=True` converts grayscale and RGBA."
            )
        return image

    def _pil_to_numpy(self, image: PIL.Image.Image, do_convert_rgb: bool) -> np.ndarray:
        """
        A PIL image, turned by its EXIF orientation, as a `(height, width)` or `(height, width, channels)` array:
        uint16 for the 16- and 32-bit integer modes, float32 for mode "F", else uint8 (RGB or RGBA with
        `do_convert_rgb`).
        """
        image = PIL.ImageOps.exif_transpose(image)
        if image.mode == "I":
            array = np.asarray(image)
            if np.any(array < 0) or np.any(array > 65535):
                raise ValueError(
                    f'{type(self).__name__}: a mode "I" image is read as 16-bit, 0..65535 (older Pillows open '
                    f'16-bit files as mode "I"); got values in [{array.min()}, {array.max()}].'
                )
            return array.astype(np.uint16)
        if image.mode.startswith("I;16"):
            return np.asarray(image).astype(np.uint16)  # native byte order (I;16B is big-endian)
        if image.mode == "F" or not do_convert_rgb:
            return np.asarray(image)
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))

    def _to_unit_range(self, image: np.ndarray) -> np.ndarray:
        """8-bit images as uint8 (rescaled later, with `rescale_factor`); any other as float32 in [0, 1]."""
        kind, itemsize = image.dtype.kind, image.dtype.itemsize
        if kind == "b":
            return image.astype(np.uint8) * 255  # as Pillow's 1-bit mode converts
        if kind == "u" and itemsize == 1:
            return image
        if kind == "u" and itemsize == 2:
            return (image / 65535).astype(np.float32)
        if kind in "iu":
            if np.any(image < 0) or np.any(image > 255):
                raise ValueError(
                    f"{type(self).__name__}: an integer image other than uint16 holds 8-bit values, 0..255; got "
                    f"{image.dtype} values in [{image.min()}, {image.max()}]. Give 16-bit images as uint16."
                )
            return image.astype(np.uint8)
        if kind != "f":
            raise ValueError(f"{type(self).__name__}: unsupported image dtype {image.dtype}.")
        if not np.isfinite(image).all():
            raise ValueError(f"{type(self).__name__}: the image holds NaN or infinite values.")
        low, high = image.min(), image.max()
        if low < 0 or high > 1:
            if low < -FLOAT_RANGE_TOLERANCE or high > 1 + FLOAT_RANGE_TOLERANCE:
                raise ValueError(
                    f"{type(self).__name__}: a floating-point image must hold values in [0, 1], got values in "
                    f"[{low:.6g}, {high:.6g}]. Floats are never rescaled: give 8-bit values as uint8, or divided "
                    f"by 255."
                )
            warnings.warn(
                f"{type(self).__name__}: clipped a floating-point image with values in [{low:.6g}, {high:.6g}] to "
                f"[0, 1].",
                stacklevel=2,
            )
            image = np.clip(image, 0, 1)
        return image.astype(np.float32)

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, **kwargs) -> np.ndarray:
        """Resizes a channels-first image to `(size.height, size.width)`; float32 images stay float32 in [0, 1]."""
        if image.dtype == np.uint8:
            return super().resize(image, size, resample=resample, **kwargs)
        resample = PILImageResampling.BILINEAR if resample is None else resample
        channels = [
            np.asarray(PIL.Image.fromarray(channel).resize((size.width, size.height), resample=resample))
            for channel in image
        ]
        # filters that overshoot (bicubic, Lanczos) are clipped, as the 8-bit resize clips them
        return np.clip(np.stack(channels), 0, 1)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        do_pad: bool | None,
        pad_size: SizeDict | None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        processed_images = []
        for image in images:
            if do_resize and image.shape[-2:] != (size.height, size.width):
                image = self.resize(image, size, resample=resample)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            # process_image left only 8-bit images unscaled
            if do_rescale and image.dtype == np.uint8:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            if np.issubdtype(image.dtype, np.floating):
                image = image.astype(np.float32)
            processed_images.append(image)
        if do_pad:
            processed_images = self.pad(processed_images, pad_size=pad_size)
        return BatchFeature(data={"pixel_values": processed_images}, tensor_type=return_tensors)


# The default chat template, for instruction-style prompts as in the PaLM-E paper ("Q: <image> What is this? A:"):
# a user turn with text is `Q: ...`, an assistant turn `A: ...`, and the generation prompt `A:` follows a question; an
# image item becomes the image marker (nothing with cross-attention, where the image is not in the text), so that a
# user turn of an image alone is the captioning prompt; a state or object item becomes its marker (refused by a
# processor that takes none). Parts are joined by single spaces; system turns are plain text. The loop reads
# `message['content']` itself, by which serving engines (vLLM) tell that the template takes lists of typed items.
CHAT_TEMPLATE = """
{%- set ns = namespace(parts=[], asked=false) -%}
{%- for message in messages -%}
    {%- set turn = namespace(words=[], has_text=false) -%}
    {%- if message['content'] is string -%}
        {%- set turn.words = [message['content'] | trim] -%}
        {%- set turn.has_text = true -%}
    {%- endif -%}
    {%- for item in message['content'] if message['content'] is not string -%}
        {%- if item['type'] == 'image' -%}
            {%- if image_marker -%}{%- set turn.words = turn.words + [image_marker] -%}{%- endif -%}
        {%- elif item['type'] == 'text' -%}
            {%- set turn.words = turn.words + [item['text'] | trim] -%}
            {%- set turn.has_text = true -%}
        {%- elif item['type'] in observation_markers -%}
            {%- if not observation_markers[item['type']] -%}
                {{- raise_exception('This PalmE processor takes no ' ~ item['type'] ~ ' vectors, got a '
                    ~ item['type'] ~ ' item.') -}}
            {%- endif -%}
            {%- set turn.words = turn.words + [observation_markers[item['type']]] -%}
        {%- else -%}
            {{- raise_exception('PalmE messages hold "image", "state", "object" and "text" items, got a '
                ~ item['type'] ~ ' item.') -}}
        {%- endif -%}
    {%- endfor -%}
    {%- set content = turn.words | reject('equalto', '') | join(' ') -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set ns.parts = ns.parts + ['A: ' ~ content] -%}
        {%- set ns.asked = false -%}
    {%- elif message['role'] == 'user' -%}
        {%- set ns.parts = ns.parts + [('Q: ' ~ content) if turn.has_text else content] -%}
        {%- set ns.asked = turn.has_text -%}
    {%- elif message['role'] == 'system' -%}
        {%- set ns.parts = ns.parts + [content] -%}
    {%- else -%}
        {{- raise_exception('PalmE chat roles are "system", "user" and "assistant", got ' ~ message['role'] ~ '.') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and ns.asked -%}{%- set ns.parts = ns.parts + ['A:'] -%}{%- endif -%}
{{- ns.parts | reject('equalto', '') | join(' ') -}}
"""


def default_chat_template(
    image_token: str | None, state_token: str | None = None, object_token: str | None = None
) -> str:
    """
    `CHAT_TEMPLATE` with `image_token` as the image marker (none: cross-attention), and `state_token` and
    `object_token` as the markers of state and object items (none: the processor takes no such vectors).
    """
    observation_markers = {"state": state_token or "", "object": object_token or ""}
    return (
        "{%- set image_marker = " + json.dumps(image_token or "") + " -%}"
        "{%- set observation_markers = " + json.dumps(observation_markers) + " -%}" + CHAT_TEMPLATE
    )


def placeholder_token(
    tokenizer, kind: str, token: str | None, num_tokens: int | None
) -> tuple[str | None, int | None]:
    """
    The marker and placeholder token of `kind` ("image", "state", "object") and its id: `(None, None)` without
    `num_tokens` (the processor takes no such input); else `token` must be a single token of `tokenizer`, also when
    written twice in a row, and `num_tokens` a positive integer (a `ValueError` naming them otherwise).
    """
    if num_tokens is None:
        return None, None
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
        raise ValueError(f"`num_{kind}_tokens` must be a positive integer or None, got {num_tokens!r}.")
    if not token:
        raise ValueError(f"`{kind}_token` must be a token of the tokenizer when `num_{kind}_tokens` is set.")
    encoded = tokenizer.encode(token * 2, add_special_tokens=False)
    if len(encoded) != 2 or encoded[0] != encoded[1] or encoded[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"`{kind}_token` {token!r} must be a single token of the tokenizer, also when written twice in a row (add "
            f"it as a special token); {token * 2!r} encodes to {encoded}."
        )
    return token, encoded[0]


def _is_one_list_per_text(images) -> bool:
    """Whether `images` is a list of lists (or tuples) of images, the form that gives each text its own images."""
    return (
        isinstance(images, (list, tuple))
        and len(images) > 0
        and all(isinstance(item, (list, tuple)) for item in images)
    )


def _count_images(image_processor, images) -> list:
    """`images` as the flat list of images the image processor reads (a `(height, width)` array is one image)."""
    if isinstance(images, (list, tuple)) and len(images) == 0:
        return []
    return image_processor._prepare_images_structure(images)


@processor_defaults
class PalmEProcessor(ProcessorMixin):
    r"""
    A PalmE processor: a [`PalmEImageProcessor`] and any Transformers tokenizer. `processor(images=..., text=...)`
    returns what the model's `forward` and `generate` take (`pixel_values`, `input_ids`, `attention_mask`; PyTorch
    tensors by default).

    With `"prefix"` integration (`num_image_tokens` set), texts are multimodal sentences: each marker `image_token`
    stands where an image goes (any number per text, at any positions, e.g. `"Q: What changed between <image> and
    <image>? A:"`), the images given in the order of their markers (a flat list, or one list per text, each holding
    as many images as its text has markers). Each marker is expanded into `num_image_tokens` copies of the image
    placeholder token (the token `image_token` itself, whose id must be the model's `config.image_token_id`), one per
    image feature, and `pixel_values` holds all images in order (none: no `pixel_values`). With cross-attention
    (`num_image_tokens=None`) the image does not appear in the text: texts are tokenized as they are, each with one
    image. [`PalmEProcessor.from_model_config`] builds one that matches a model,
    [`PalmEProcessor.from_pretrained_towers`] one for a model built from two pretrained towers.

    A model that also takes state vectors or object vectors (`config.state_dim`, `config.object_dim`) has a marker
    for each kind, `state_token` (`"<state>"`) and `object_token` (`"<obj>"`), expanded as the image marker into
    `num_state_tokens` / `num_object_tokens` placeholders: `processor(images=..., states=..., objects=...,
    text="Q: <image> <state> Object 1 is <obj>. Object 2 is <obj>. Which object is largest? A:")` gives
    `state_values` and `object_values` beside `pixel_values`, the vectors in the order of their markers.

    Args:
        image_processor ([`PalmEImageProcessor`] or the vision tower's image processor): the image processor.
        tokenizer ([`PreTrainedTokenizerBase`]): the tokenizer.
        image_token (`str`, defaults to `"<image>"`): the image marker and placeholder token of `"prefix"`
            integration; it must be a single token of the tokenizer (an added token, so that copies of it written
            together still split into tokens). Unused with cross-attention.
        num_image_tokens (`int`, *optional*): placeholders per image, the model's `config.num_image_tokens`, for
            `"prefix"` integration; `None` for cross-attention.
        state_token (`str`, defaults to `"<state>"`), num_state_tokens (`int`, *optional*): the state marker and
            placeholder token, a single token of the tokenizer, and the placeholders per state vector
            (`config.num_state_tokens`); `None`: the processor takes no state vectors.
        object_token (`str`, defaults to `"<obj>"`), num_object_tokens (`int`, *optional*): the same for object
            vectors (`config.num_object_tokens`).
        chat_template (`str`, *optional*): a Jinja chat template; by default `CHAT_TEMPLATE`, the PaLM-E paper's
            `Q: ... A:` prompts with the image marker where a message's image item is:
            `processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
            "what is this?"}]}], add_generation_prompt=True)` is `"Q: <image> what is this? A:"` (`"Q: what is this?
            A:"` with cross-attention); `{"type": "state"}` and `{"type": "object"}` items are the state and object
            markers.
    """

    # `processor(...)` output feeds the model directly
    text_kwargs = {"return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_token: str | None = IMAGE_TOKEN,
        num_image_tokens: int | None = None,
        chat_template: str | None = None,
        state_token: str | None = STATE_TOKEN,
        num_state_tokens: int | None = None,
        object_token: str | None = OBJECT_TOKEN,
        num_object_tokens: int | None = None,
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.image_token, self.image_token_id = placeholder_token(tokenizer, "image", image_token, num_image_tokens)
        self.num_state_tokens = num_state_tokens
        self.state_token, self.state_token_id = placeholder_token(tokenizer, "state", state_token, num_state_tokens)
        self.num_object_tokens = num_object_tokens
        self.object_token, self.object_token_id = placeholder_token(
            tokenizer, "object", object_token, num_object_tokens
        )
        if chat_template is None:
            chat_template = default_chat_template(self.image_token, self.state_token, self.object_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_model_config(
        cls, config: PalmEConfig, tokenizer, image_token: str = IMAGE_TOKEN, **image_processor_kwargs
    ) -> "PalmEProcessor":
        """
        The processor of a model with this `config` and `tokenizer` (PalmE's own vision encoder): images resized to
        the model's image size and, with `"prefix"` integration, `config.num_image_tokens` placeholders. There the
        tokenizer gets `image_token` as an added special token when it lacks it (as Llava's tokenizers hold theirs),
        whose id must be `config.image_token_id`.
        """
        image_size = config.vision_config.image_size
        image_processor = PalmEImageProcessor(
            size={"height": image_size, "width": image_size}, **image_processor_kwargs
        )
        if config.vision_integration != "prefix":
            return cls(image_processor, tokenizer, image_token=None)
        if image_token == IMAGE_TOKEN:
            add_image_token(tokenizer, image_token)
        # the markers of the state and object vectors the model takes, added as the image marker is
        observations = {}
        for kind, token in (("state", STATE_TOKEN), ("object", OBJECT_TOKEN)):
            if getattr(config, f"{kind}_dim") is not None:
                add_placeholder_token(tokenizer, token)
                observations[f"{kind}_token"] = token
                observations[f"num_{kind}_tokens"] = getattr(config, f"num_{kind}_tokens")
        processor = cls(
            image_processor,
            tokenizer,
            image_token=image_token,
            num_image_tokens=config.num_image_tokens,
            **observations,
        )
        for kind in ("image", "state", "object"):
            token_id, expected = getattr(processor, f"{kind}_token_id"), getattr(config, f"{kind}_token_id")
            if token_id != expected:
                raise ValueError(
                    f"`{kind}_token` {getattr(processor, f'{kind}_token')!r} is token {token_id} of the tokenizer, "
                    f"but the model's {kind} placeholder is `config.{kind}_token_id` = {expected}."
                )
        return processor

    @classmethod
    def from_pretrained_towers(
        cls,
        vision_model: str,
        text_model: str,
        num_latents: int | None = None,
        num_state_tokens: int | None = None,
        num_object_tokens: int | None = None,
        **kwargs,
    ) -> "PalmEProcessor":
        """
        The processor of [`PalmEForConditionalGeneration.from_pretrained_towers`]`(vision_model, text_model)`: the
        vision tower's image processor and the language model's tokenizer (each a local folder or Hub id; the vision
        half of a CLIP or SigLIP dual encoder), with `<image>` added to the tokenizer as a special token, expanded into
        one placeholder per image feature (the tower's patches, or `num_latents` with a resampler). For a model that
        takes state (object) vectors, `num_state_tokens` (`num_object_tokens`), its `config.num_state_tokens`, adds
        `<state>` (`<obj>`) after `<image>`, as the model's loader does. The arguments that
        say where to read from (`revision`, `cache_dir`, `token`, `local_files_only`, `trust_remote_code`, ...) go to
        every loader; the other `kwargs` to `AutoImageProcessor.from_pretrained`.
        """
        hub_kwargs, _ = split_loading_arguments(kwargs, HUB_ARGUMENTS)
        image_processor = AutoImageProcessor.from_pretrained(vision_model, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(text_model, **hub_kwargs)
        add_image_token(tokenizer)
        for token, num_tokens in ((STATE_TOKEN, num_state_tokens), (OBJECT_TOKEN, num_object_tokens)):
            if num_tokens is not None:
                add_placeholder_token(tokenizer, token)
        _, vision_config = vision_tower_class_and_config(vision_model, **hub_kwargs)
        num_image_tokens = num_latents if num_latents is not None else num_patches_of(vision_config)
        return cls(
            image_processor,
            tokenizer,
            image_token=IMAGE_TOKEN,
            num_image_tokens=num_image_tokens,
            num_state_tokens=num_state_tokens,
            num_object_tokens=num_object_tokens,
        )

    def __call__(self, images=None, text=None, states=None, objects=None, **kwargs) -> BatchFeature:
        """
        The model's inputs for `images` and `text` (see the class), and for `states` and `objects`, the state and
        object vectors of the texts' markers: each a tensor or array `(num_values, dim)` of all the texts' vectors in
        the order of their markers, a list of vectors, or one `(n, dim)` group per text (each holding as many vectors
        as its text has markers). They are returned as float32 tensors, `state_values` and `object_values`, and each
        marker is expanded into its placeholders.
        """
        observation_values = {}
        for kind, values in (("state", states), ("object", objects)):
            text, observation_values[f"{kind}_values"] = self._expand_observation_markers(kind, values, text)
        outputs = super().__call__(images=images, text=text, **kwargs)
        outputs.update({name: values for name, values in observation_values.items() if values is not None})
        return outputs

    def _expand_observation_markers(
        self, kind: str, values, text: str | list[str] | None
    ) -> tuple[str | list[str] | None, torch.Tensor | None]:
        """
        `text` with each marker of `kind` ("state" or "object") expanded into its placeholders, and `values` as one
        float32 tensor `(num_values, dim)`, in the order of the markers.

        Raises:
            `ValueError` when the counts of values and markers differ (in all or text by text), for values a processor
            without that kind's marker is given, and for values given without text.
        """
        token, per_value, argument = getattr(self, f"{kind}_token"), getattr(self, f"num_{kind}_tokens"), f"{kind}s"
        if values is not None and token is None:
            raise ValueError(
                f"`{argument}` were given, but this processor takes no {kind} vectors (`num_{kind}_tokens` is None): "
                f"build it with `PalmEProcessor.from_model_config` for a model with `{kind}_dim`."
            )
        if values is not None and text is None:
            raise ValueError(f"`{argument}` were given without `text`: give the text that holds their markers.")
        if token is None or text is None:
            return text, None
        texts = [text] if isinstance(text, str) else list(text)
        counts = [sample.count(token) for sample in texts]
        values = None if values is None else self._observations_as_tensor(kind, values, texts, counts)
        num_values = 0 if values is None else values.shape[0]
        if num_values != sum(counts):
            raise ValueError(
                f"The texts hold {sum(counts)} {kind} markers {token!r} ({counts} per text) but {num_values} {kind} "
                f"vectors were given (`{argument}`): give one {kind} vector per marker, in order."
            )
        expanded = [sample.replace(token, token * per_value) for sample in texts]
        return (expanded[0] if isinstance(text, str) else expanded), (values if num_values else None)

    def _observations_as_tensor(self, kind: str, values, texts: list[str], counts: list[int]) -> torch.Tensor:
        """
        `values` of `kind` as a float32 tensor `(num_values, dim)`: a tensor or array of that shape, one vector, a
        list of vectors, or a list of one `(n, dim)` group per text, each of as many vectors as its text has markers
        (`counts`).
        """
        argument = f"{kind}s"
        if isinstance(values, (list, tuple)) and len(values) > 0 and all(np.ndim(group) == 2 for group in values):
            if len(values) != len(texts):
                raise ValueError(
                    f"Got {len(values)} groups of `{argument}` for {len(texts)} texts: give one group per text."
                )
            for index, (group, count) in enumerate(zip(values, counts)):
                if len(group) != count:
                    raise ValueError(
                        f"Text {index} ({texts[index][:80]!r}) holds {count} {kind} markers, but its group of "
                        f"`{argument}` holds {len(group)}: give each text its own {kind} vectors, in order."
                    )
            values = np.concatenate([np.asarray(group, dtype=np.float32) for group in values])
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float32))
        if tensor.ndim == 1:
            tensor = tensor.reshape(1, -1) if tensor.numel() else tensor.reshape(0, 0)
        if tensor.ndim != 2:
            raise ValueError(
                f"`{argument}` must be {kind} vectors of one width: a (num_{kind}s, dim) tensor or array, a list of "
                f"vectors, or one (n, dim) group per text; got shape {tuple(tensor.shape)}."
            )
        return tensor

    @property
    def unused_input_names(self) -> list[str]:
        return ["token_type_ids"]

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        images, text, videos, audio = super().prepare_inputs_layout(
            images=images, text=text, videos=videos, audio=audio, **kwargs
        )
        if images is not None and text is not None and _is_one_list_per_text(images):
            self._check_images_of_each_text(images, [text] if isinstance(text, str) else text)
        if images is not None:
            # one flat list, in which images are counted as the image processor reads them ((height, width) arrays too)
            images = _count_images(self.image_processor, images)
            # no images (`images=[]`) is no `pixel_values`, as for a text-only call
            images = images or None
        return images, text, videos, audio

    def _check_images_of_each_text(self, images: list, texts: list[str]):
        """Images given as one list per text: as many lists as texts, each with as many images as its text takes."""
        if len(images) != len(texts):
            raise ValueError(f"Got {len(images)} lists of images for {len(texts)} texts: give one list per text.")
        for index, (text_images, text) in enumerate(zip(images, texts)):
            num_images = len(_count_images(self.image_processor, text_images))
            wanted = text.count(self.image_token) if self.image_token is not None else 1
            if num_images != wanted:
                takes = (
                    f"holds {wanted} image markers {self.image_token!r}"
                    if self.image_token is not None
                    else "takes one image (cross-attention)"
                )
                raise ValueError(
                    f"Text {index} ({text[:80]!r}) {takes}, but its list holds {num_images} images: give each text "
                    "its own images, in the order of its markers."
                )

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """
        Besides the base checks: with `"prefix"` integration as many images as markers in all texts; with
        cross-attention one image per text.
        """
        if text is not None and (images is not None or self.image_token is not None):
            texts = [text] if isinstance(text, str) else text
            num_images = 0 if images is None else len(images)
            if self.image_token is not None:
                counts = [sample.count(self.image_token) for sample in texts]
                if sum(counts) != num_images:
                    raise ValueError(
                        f"The texts hold {sum(counts)} image markers {self.image_token!r} ({counts} per text) but "
                        f"{num_images} images were given: give one image per marker, in order."
                    )
            elif num_images != len(texts):
                raise ValueError(f"Got {num_images} images for {len(texts)} texts: give one image per text.")
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs) -> MultiModalData:
        """
        The placeholders each image of `image_sizes` (`(height, width)` each) takes in the text, as serving engines
        (vLLM) ask a processor: `num_image_tokens` whatever its size, since every image is resized to the model's (none
        with cross-attention, where the image is not in the text), from one image each.
        """
        if image_sizes is None:
            return MultiModalData()
        num_images = len(image_sizes)
        return MultiModalData(
            num_image_tokens=[self.num_image_tokens or 0] * num_images, num_image_patches=[1] * num_images
        )

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """
        Decodes `generate()` output, `(batch_size, seq_len)` or `(seq_len,)` ids, into text (a list of strings or one
        string). With `skip_special_tokens`, the image (state, object) placeholders, which stand for those inputs, are
        dropped too.
        """
        sequences = generated_outputs.tolist() if hasattr(generated_outputs, "tolist") else list(generated_outputs)
        placeholders = {self.image_token_id, self.state_token_id, self.object_token_id} - {None}
        if skip_special_tokens and placeholders:
            if sequences and isinstance(sequences[0], list):
                sequences = [[token for token in ids if token not in placeholders] for ids in sequences]
            else:
                sequences = [token for token in sequences if token not in placeholders]
        return self.tokenizer.decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


__all__ = ["PalmEImageProcessor", "PalmEProcessor"]
