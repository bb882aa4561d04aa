"""A tiny PalmE captioner for the processing, pipeline and Hub tests: the project's word-level tokenizer (built with
the `tokenizers` library, no downloads) and a small model configuration for it."""

from transformers import PreTrainedTokenizerFast

from palme_hf import PalmEConfig
from palme_hf.synthetic_shapes import build_caption_tokenizer

from helpers import tiny_config as tiny_model_config


def build_tokenizer(image_token: str | None = "<image>") -> PreTrainedTokenizerFast:
    """The captioner's word-level tokenizer, padding on the left (for batched generation), with `image_token` (when
    given) as an added special token, the last of the vocabulary."""
    tokenizer = build_caption_tokenizer(padding_side="left")
    if image_token is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return tokenizer


def tiny_config(vocab_size: int, cross_attend: bool = True) -> PalmEConfig:
    """A captioner for a tokenizer of `vocab_size` tokens: 32x32 images in 16x16 patches (4 image features); without
    `cross_attend`, the image goes in as a prefix at the tokenizer's last token (its added `<image>`)."""
    return tiny_model_config(
        "reference" if cross_attend else "prefix",
        vision=dict(patch_size=16, num_hidden_layers=1),
        image_token_id=None if cross_attend else vocab_size - 1,
        vocab_size=vocab_size,
        hidden_size=32,
        num_attention_heads=2,
        alibi_num_heads=1,
        qk_norm=False,
    )
