"""A tiny PalmE captioner for the processing, pipeline and Hub tests: a word-level tokenizer built with the
`tokenizers` library (no downloads) and small model configurations."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from palme_hf import PalmEConfig

WORDS = ["a", "small", "large", "red", "green", "blue", "circle", "square", "triangle", "left", "right", "of"]
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def build_tokenizer(image_token: str | None = "<image>") -> PreTrainedTokenizerFast:
    """Word-level tokenizer: `<bos>` starts every text; `image_token` (when given) is an added special token, the last
    of the vocabulary."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
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
