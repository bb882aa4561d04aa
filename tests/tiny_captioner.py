"""A tiny PalmE captioner for the processing, pipeline and Hub tests: the project's word-level tokenizer (built with
the `tokenizers` library, no downloads) and small model configurations."""

from transformers import PreTrainedTokenizerFast

from palme_hf import PalmEConfig, build_caption_tokenizer


def build_tokenizer(image_token: str | None = "<image>") -> PreTrainedTokenizerFast:
    """The captioner's word-level tokenizer, padding on the left (for batched generation), with `image_token` (when
    given) as an added special token, the last of the vocabulary."""
    tokenizer = build_caption_tokenizer(padding_side="left")
    if image_token is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return tokenizer


def tiny_config(vocab_size: int, **kwargs) -> PalmEConfig:
    """A PalmE small enough for CPU tests: 32x32 images in 16x16 patches (4 image features)."""
    arguments = dict(
        image_size=32, patch_size=16, encoder_dim=32, encoder_depth=1, encoder_heads=2, num_tokens=vocab_size,
        max_seq_len=64, decoder_dim=32, decoder_depth=2, decoder_heads=2, alibi_num_heads=1, attn_flash=False,
    )
    return PalmEConfig(**{**arguments, **kwargs})
