"""The PaLM-E recipe with pretrained parts: Transformers vision encoders and causal language models as PalmE's towers,
the projector between them, and loading the towers' own checkpoints."""

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .configuration_palme import PalmEConfig

IMAGE_TOKEN = "<image>"
# The markers and placeholder tokens of the observations beside images: state vectors and object vectors.
STATE_TOKEN = "<state>"
OBJECT_TOKEN = "<obj>"


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


def add_placeholder_token(tokenizer, token: str) -> int:
    """
    Adds the placeholder `token` (`<image>`, `<state>`, `<obj>`) to `tokenizer` as an added special token (as Llava's
    tokenizers hold theirs) unless it is one already, so that it never shadows a word of the vocabulary; returns its
    id.
    """
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(token)


def add_image_token(tokenizer, image_token: str = IMAGE_TOKEN) -> int:
    """Adds the image placeholder `image_token` to `tokenizer` (see `add_placeholder_token`); returns its id."""
    return add_placeholder_token(tokenizer, image_token)


def load_state(module: nn.Module, state_dict: dict, what: str):
    """Loads `state_dict` into `module` exactly: missing, unexpected or misshapen weights are a `ValueError`."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"The weights of {what} do not fit the tower PalmE built from its config: {error}") from error


# Arguments of `from_pretrained` that say where a checkpoint is read from: they go to every loader of a tower (model,
# config, tokenizer, image processor).
HUB_ARGUMENTS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "token",
    "trust_remote_code",
)
# Arguments of a model's `from_pretrained` that say how its weights load: they go to both towers' model loaders.
WEIGHT_ARGUMENTS = ("attn_implementation", "low_cpu_mem_usage", "use_safetensors", "variant")


def split_loading_arguments(kwargs: dict, names: tuple[str, ...]) -> tuple[dict, dict]:
    """`kwargs` split into those named in `names` and the rest."""
    chosen = {key: value for key, value in kwargs.items() if key in names}
    return chosen, {key: value for key, value in kwargs.items() if key not in names}


def vision_tower_class_and_config(vision_model: str, **hub_kwargs):
    """
    The model class and config of the vision encoder in `vision_model`: the checkpoint's own or, for a dual encoder
    (a `CLIPModel` or `SiglipModel` folder, with a `vision_config`), those of its vision half, as
    `CLIPVisionModel.from_pretrained` reads the same folder.
    """
    config = AutoConfig.from_pretrained(vision_model, **hub_kwargs)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None and type(config) in MODEL_MAPPING and type(vision_config) in MODEL_MAPPING:
        config = vision_config
    if type(config) not in MODEL_MAPPING:
        return AutoModel, config  # a checkpoint with custom code (`trust_remote_code`): AutoModel resolves it
    return MODEL_MAPPING[type(config)], config


def load_vision_tower(vision_model: str, dtype, **loading_kwargs) -> PreTrainedModel:
    """The vision encoder of `vision_model` (the vision half of a dual encoder), with every weight read from it."""
    hub_kwargs, _ = split_loading_arguments(loading_kwargs, HUB_ARGUMENTS)
    model_class, _ = vision_tower_class_and_config(vision_model, **hub_kwargs)
    vision, loading_info = model_class.from_pretrained(
        vision_model, dtype=dtype, output_loading_info=True, **loading_kwargs
    )
    if loading_info["missing_keys"]:
        raise ValueError(
            f"{vision_model!r} does not hold the weights of its vision encoder ({type(vision).__name__}): "
            f"{sorted(loading_info['missing_keys'])[:5]} are missing."
        )
    return vision


def towers_dtype(dtype, vision: PreTrainedModel, text: PreTrainedModel) -> torch.dtype | None:
    """
    The dtype to build PalmE in: `None` (the default dtype, float32) without `dtype`; else the dtype the towers loaded
    in (`dtype="auto"`: each checkpoint's own, which must agree).
    """
    if dtype is None:
        return None
    if vision.dtype != text.dtype:
        raise ValueError(
            f"With `dtype={dtype!r}` the vision tower loaded in {vision.dtype} and the language model in "
            f'{text.dtype}: give one dtype (`torch.bfloat16`, `"float32"`, ...).'
        )
    return text.dtype


def load_pretrained_towers(
    cls,
    vision_model: str,
    text_model: str,
    image_token_id: int | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs,
):
    """The implementation of [`PalmEForConditionalGeneration.from_pretrained_towers`]."""
    device_map = kwargs.pop("device_map", None)
    if isinstance(device_map, dict) or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"`from_pretrained_towers` builds the model on one device; `device_map={device_map!r}` spreads a saved "
            "model: `save_pretrained` this one and load it with `from_pretrained(folder, device_map=...)`."
        )
    loading_kwargs, config_kwargs = split_loading_arguments(kwargs, HUB_ARGUMENTS + WEIGHT_ARGUMENTS)
    hub_kwargs, _ = split_loading_arguments(loading_kwargs, HUB_ARGUMENTS)
    vision = load_vision_tower(vision_model, dtype, **loading_kwargs)
    text = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype, **loading_kwargs)
    if image_token_id is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(text_model, **hub_kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{text_model!r} holds no tokenizer to add the `{IMAGE_TOKEN}` token to: give `image_token_id` "
                f"({type(error).__name__}: {str(error)[:200]})."
            ) from error
        image_token_id = add_image_token(tokenizer)
        # the placeholders of the state and object vectors the model takes follow, as the processor adds them
        for kind, token in (("state", STATE_TOKEN), ("object", OBJECT_TOKEN)):
            if config_kwargs.get(f"{kind}_dim") is not None and config_kwargs.get(f"{kind}_token_id") is None:
                config_kwargs[f"{kind}_token_id"] = add_placeholder_token(tokenizer, token)
    placeholder_ids = [image_token_id, config_kwargs.get("state_token_id"), config_kwargs.get("object_token_id")]
    largest_id = max(token_id for token_id in placeholder_ids if isinstance(token_id, int))
    if largest_id >= text.config.vocab_size:
        text.resize_token_embeddings(largest_id + 1, mean_resizing=False)
    config_kwargs.setdefault("vision_integration", "prefix")
    config = PalmEConfig(
        vision_config=vision.config, text_config=text.config, image_token_id=image_token_id, **config_kwargs
    )
    # built as `from_pretrained` builds a model in `dtype`: under it as the default dtype, so that what a tower keeps
    # in float32 (the rotary frequencies `inv_freq`) stays float32
    attention_kwargs, _ = split_loading_arguments(loading_kwargs, ("attn_implementation",))
    model = cls._from_config(config, dtype=towers_dtype(dtype, vision, text), **attention_kwargs)
    load_state(model.model.vision_model, vision.state_dict(), f"the vision tower {vision_model!r}")
    load_state(model.model.language_model, text.base_model.state_dict(), f"the language model {text_model!r}")
    load_state(model.lm_head, text.get_output_embeddings().state_dict(), f"the language-model head of {text_model!r}")
    model.tie_weights()
    return model if device_map is None else model.to(device_map)


__all__ = ["PalmEMultiModalProjector", "add_image_token"]
