"""The PaLM-E recipe with pretrained parts: Transformers vision encoders and causal language models as PalmE's towers,
the projector between them, and loading the towers' own checkpoints."""

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.activations import ACT2FN

from .configuration_palme import PalmEConfig

IMAGE_TOKEN = "<image>"


class PalmEMultiModalProjector(nn.Module):
    """Llava's projector (`projector_type="mlp"`): linear, GELU, linear, from image features to the decoder width."""

    def __init__(self, config: PalmEConfig):
        super().__init__()
        text_width = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, text_width)
        self.act = ACT2FN["gelu"]
        self.linear_2 = nn.Linear(text_width, text_width)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """`(num_images, num_image_tokens, vision width)` -> `(num_images, num_image_tokens, text width)`."""
        return self.linear_2(self.act(self.linear_1(image_features)))


def build_projector(config: PalmEConfig) -> nn.Module | None:
    """The image-to-text projector of `"prefix"` integration: the paper's affine map (`"linear"`) or an MLP."""
    if config.vision_integration != "prefix":
        return None
    if config.projector_type == "mlp":
        return PalmEMultiModalProjector(config)
    return nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)


def patch_features(last_hidden_state: torch.Tensor, num_patches: int) -> torch.Tensor:
    """
    The patch features of a vision tower's output `(num_images, tokens, width)`: its last `num_patches` tokens, which
    leaves out the tokens a ViT or CLIP puts before its patches (a class token, register tokens).
    """
    if last_hidden_state.shape[1] < num_patches:
        raise ValueError(
            f"The vision tower returned {last_hidden_state.shape[1]} tokens per image, fewer than its "
            f"{num_patches} patches (`image_size` / `patch_size` of its config)."
        )
    return last_hidden_state[:, last_hidden_state.shape[1] - num_patches :]


def add_image_token(tokenizer, image_token: str = IMAGE_TOKEN) -> int:
    """
    Adds `image_token` to `tokenizer` as an added special token (as Llava's tokenizers hold it) unless it is one
    already, so that it never shadows a word of the vocabulary; returns its id.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(image_token)


def load_state(module: nn.Module, state_dict: dict, what: str):
    """Loads `state_dict` into `module` exactly: missing, unexpected or misshapen weights are a `ValueError`."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"The weights of {what} do not fit the tower PalmE built from its config: {error}") from error


def load_pretrained_towers(
    cls,
    vision_model: str,
    text_model: str,
    image_token_id: int | None = None,
    dtype: torch.dtype | None = None,
    **config_kwargs,
):
    """The implementation of [`PalmEForConditionalGeneration.from_pretrained_towers`]."""
    vision = AutoModel.from_pretrained(vision_model, dtype=dtype)
    text = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype)
    if image_token_id is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(text_model)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{text_model!r} holds no tokenizer to add the `{IMAGE_TOKEN}` token to: give `image_token_id` "
                f"({type(error).__name__}: {str(error)[:200]})."
            ) from error
        image_token_id = add_image_token(tokenizer)
    if image_token_id >= text.config.vocab_size:
        text.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
    config_kwargs.setdefault("vision_integration", "prefix")
    config = PalmEConfig(
        vision_config=vision.config, text_config=text.config, image_token_id=image_token_id, **config_kwargs
    )
    model = cls(config) if dtype is None else cls(config).to(dtype)
    load_state(model.model.vision_model, vision.state_dict(), f"the vision tower {vision_model!r}")
    load_state(model.model.language_model, text.base_model.state_dict(), f"the language model {text_model!r}")
    load_state(model.lm_head, text.get_output_embeddings().state_dict(), f"the language-model head of {text_model!r}")
    model.tie_weights()
    return model


__all__ = ["PalmEMultiModalProjector", "add_image_token"]
