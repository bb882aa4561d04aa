"""PyTorch PalmE: a ViT image encoder and a causal text decoder that sees the image through cross-attention (as the
zeta reference) or as projected embeddings inside the token sequence (as the PaLM-E paper)."""

import os
from dataclasses import dataclass

import torch
from einops import rearrange
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticCache, StaticLayer
from transformers.generation import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
)
from transformers.masking_utils import create_causal_mask, create_masks_for_generate
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.processing_utils import Unpack
from transformers.pytorch_utils import Conv1D
from transformers.utils import CONFIG_NAME, TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .blocks_palme import PalmEParallelDecoderLayer, PerceiverLayer
from .compat_palme import (
    CACHE_NAME,
    NewestNamesPreTrainedModel,
    accept_past_key_values,
    cache_field,
    slice_logits_to_keep,
)
from .configuration_palme import PalmEConfig, PalmETextConfig, PalmEVisionConfig, is_own_tower, num_patches_of
from .hierarchical_palme import PalmEHierarchicalDecoderLayer, create_hierarchical_mask
from .layers_palme import (
    ATTENTION_IMPLEMENTATIONS,
    PalmEAlibiBias,
    PalmEAttention,
    PalmECrossAttention,
    PalmEMLP,
    PalmEQKNorm,
    PalmERotaryEmbedding,
    PalmETextCrossAttention,
    RotaryTables,
    add_bias_to_mask,
    alibi_slopes,
    split_cache,
)
from .model_card_palme import write_model_card
from .towers_palme import build_projector, load_pretrained_towers, patch_features


@dataclass
class PalmEModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    cross_attentions (`tuple(torch.FloatTensor)`, *optional*):
        Cross-attention probabilities of each decoder layer, `(batch_size, num_heads, seq_len, num_image_tokens)`.
    image_outputs ([`BaseModelOutputWithPooling`], *optional*):
        The output of [`~PalmEModel.get_image_features`] for the images of this call: the vision encoder's
        `last_hidden_state` (and `hidden_states`/`attentions` when asked for), and as `pooler_output` the image
        features the text received, `(batch_size, num_image_tokens, width)`. `None` when no image was given.
    """

    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None

    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        """The image features the text received (`image_outputs.pooler_output`)."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


@dataclass
class PalmECausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    cross_attentions (`tuple(torch.FloatTensor)`, *optional*):
        Cross-attention probabilities of each decoder layer, `(batch_size, num_heads, seq_len, num_image_tokens)`.
    image_outputs ([`BaseModelOutputWithPooling`], *optional*):
        As in [`PalmEModelOutputWithPast`].
    """

    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None

    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        """The image features the text received (`image_outputs.pooler_output`)."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


def check_token_ids(input_ids: torch.Tensor, vocab_size: int):
    """Raises a `ValueError` for token ids outside `[0, vocab_size)` (skipped while compiling: it synchronises)."""
    if torch.compiler.is_compiling() or input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"`input_ids` contains token id {bad}, outside the vocabulary (0 to {vocab_size - 1}).")


def cached_length(cache: Cache | None, seq_len: int, attention_mask: torch.Tensor | None) -> int | torch.Tensor:
    """
    The number of tokens `cache` holds before the `seq_len` new ones. A static cache counts them in a tensor, whose
    value the host would have to wait for: on a decoding step (one new token) the 2-D padding mask, which covers the
    cached and the new tokens, gives the count without that wait. Compiled graphs keep the tensor.
    """
    if cache is None:
        return 0
    length = cache.get_seq_length()
    if not isinstance(length, torch.Tensor) or torch.compiler.is_compiling():
        return length
    if seq_len == 1 and attention_mask is not None and attention_mask.ndim == 2:
        return attention_mask.shape[1] - seq_len
    return int(length)


# The attribute of a cache that holds the images whose features it holds (keys/values of their placeholders, or their
# cross-attention keys/values), `(num_images, num_channels, height, width)`: the prefill sets it, so that images given
# again with the cache can be told apart from new ones. A copy of the cache (`copy.deepcopy`) copies it.
CACHED_IMAGES_ATTRIBUTE = "palme_cached_images"


# Checkpoint keys that changed, old pattern to new, applied when loading: the parallel and hierarchical decoder layers
# of palme-hf 0.2 and earlier held their block as `layers.N.block`.
SAVED_KEY_MAPPING = {r"(layers\.\d+)\.block\.": r"\1."}


def unreadable_safetensors_files(folder: str) -> list[str]:
    """The `*.safetensors` files of `folder` whose header cannot be read (truncated or corrupt)."""
    broken = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), framework="pt"):
                    pass
            except SafetensorError:
                broken.append(os.path.join(folder, name))
    return broken


class PalmEVisionEmbeddings(nn.Module):
    """
    Patch embedding: each `patch_size x patch_size` patch, flattened as `(row, column, channel)`, is layer-normed
    (epsilon `config.patch_norm_eps`), projected to `hidden_size` and layer-normed again; learned positions are added.
    """

    def __init__(self, config: PalmEVisionConfig):
        super().__init__()
        self.config = config
        patch_dim = config.num_channels * config.patch_size**2
        self.patch_norm = nn.LayerNorm(patch_dim, eps=config.patch_norm_eps)
        self.patch_projection = nn.Linear(patch_dim, config.hidden_size)
        self.projection_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` (batch_size, num_channels, image_size, image_size) -> (batch_size, num_patches, width)."""
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"`pixel_values` must have shape (batch_size, {', '.join(map(str, expected))}) "
                f"(channels, height, width), got {tuple(pixel_values.shape)}."
            )
        patch = self.config.patch_size
        patches = rearrange(pixel_values, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)
        patches = patches.to(self.patch_projection.weight.dtype)
        embeddings = self.projection_norm(self.patch_projection(self.patch_norm(patches)))
        return embeddings + self.position_embedding


class PalmEVisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm encoder layer: bidirectional self-attention then feed-forward, each with a residual."""

    def __init__(self, config: PalmEVisionConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PalmEAttention(
            config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            is_causal=False,
            attention_dropout=config.attention_dropout,
        )
        self.mlp_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PalmEMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        attn_output, _ = self.self_attn(self.self_attn_layer_norm(hidden_states), **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.mlp_layer_norm(hidden_states))


class PalmETextDecoderLayer(GradientCheckpointingLayer):
    """
    Pre-norm decoder layer: causal self-attention (rotary/xpos, ALiBi through the mask), then cross-attention to the
    image features (when `add_cross_attention`), then feed-forward, each with a residual.
    """

    def __init__(self, config: PalmETextConfig, layer_idx: int):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PalmEAttention(
            config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            is_causal=True,
            qk_norm=config.qk_norm,
            qk_norm_scale=config.qk_norm_scale,
            rotate_values=config.rotate_values,
            attention_dropout=config.attention_dropout,
            layer_idx=layer_idx,
        )
        self.cross_attn = PalmETextCrossAttention(config, layer_idx) if config.add_cross_attention else None
        self.mlp_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PalmEMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    @accept_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: RotaryTables | None = None,
        cache: Cache | None = None,
        cross_attention_cache: EncoderDecoderCache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        if self.cross_attn is not None:
            hidden_states = self.cross_attn(hidden_states, encoder_hidden_states, cross_attention_cache, **kwargs)
        return hidden_states + self.mlp(self.mlp_layer_norm(hidden_states))


DECODER_LAYER_CLASSES = {
    "standard": PalmETextDecoderLayer,
    "parallel": PalmEParallelDecoderLayer,
    "hierarchical": PalmEHierarchicalDecoderLayer,
}


class PalmEPerceiverResampler(nn.Module):
    """
    Resamples an image's patch features into `num_latents` features: learned latents go through `resampler_depth`
    [`PerceiverLayer`]s, cross-attending to the patch features.
    """

    def __init__(self, config: PalmEConfig):
        super().__init__()
        vision_config = config.vision_config
        width, num_heads = vision_config.hidden_size, vision_config.num_attention_heads
        self.latents = nn.Parameter(torch.zeros(config.num_latents, width))
        self.perceiver = PerceiverLayer(
            width,
            num_heads,
            config.resampler_depth,
            dim_head=getattr(vision_config, "head_dim", None) or width // num_heads,
            dropout=getattr(vision_config, "attention_dropout", 0.0),
            ff_dropout=0.0,
            config=vision_config,
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """`(batch_size, num_patches, hidden_size)` -> `(batch_size, num_latents, hidden_size)`."""
        latents = self.latents.unsqueeze(0).expand(image_features.shape[0], -1, -1)
        return self.perceiver(latents, image_features, image_features)


class PalmEObservationEncoder(nn.Module):
    """
    The encoder of one kind of observation beside images, the PaLM-E paper's state vectors or object vectors: an MLP,
    linear-GELU-linear, from the `input_dim` values of one observation to `num_tokens` embeddings of the decoder width.
    """

    def __init__(self, input_dim: int, num_tokens: int, hidden_size: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.linear_1 = nn.Linear(input_dim, hidden_size)
        self.act = ACT2FN["gelu"]
        self.linear_2 = nn.Linear(hidden_size, num_tokens * hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """`(num_values, input_dim)` -> `(num_values, num_tokens, hidden_size)`."""
        hidden_states = self.linear_2(self.act(self.linear_1(values.to(self.linear_1.weight.dtype))))
        return hidden_states.view(values.shape[0], self.num_tokens, -1)


def build_observation_encoder(config: PalmEConfig, kind: str) -> PalmEObservationEncoder | None:
    """The encoder of `kind` ("state" or "object") observations, `None` when `config.{kind}_dim` is not set."""
    input_dim = getattr(config, f"{kind}_dim")
    if input_dim is None:
        return None
    num_tokens = getattr(config, f"num_{kind}_tokens")
    return PalmEObservationEncoder(input_dim, num_tokens, config.text_config.hidden_size)


# The kinds of observation beside images, each with its encoder (`PalmEModel.{kind}_encoder`) and its values' name in
# `forward` and `generate`, given in the order of their placeholders.
OBSERVATION_KINDS = {"state": "state_values", "object": "object_values"}


class PalmEPreTrainedModel(NewestNamesPreTrainedModel):
    config: PalmEConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The embeddings and the resampler own parameters next to their submodules: keep each on one device.
    _no_split_modules = [
        "PalmEVisionEmbeddings",
        "PalmEVisionEncoderLayer",
        "PalmETextDecoderLayer",
        "PalmEParallelDecoderLayer",
        "PalmEHierarchicalDecoderLayer",
        "PalmEPerceiverResampler",
    ]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False  # ALiBi is an additive mask
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @accept_past_key_values
    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, **kwargs):
        # With a compileable cache, generate() prepares 4-D masks ahead of the forward pass; the hierarchical blocks
        # build their causal, group and window masks themselves, from the padding mask.
        if getattr(self.config.get_text_config(), "block_type", None) == "hierarchical":
            return attention_mask
        return create_masks_for_generate(config, inputs_embeds, attention_mask, cache, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        [`~PreTrainedModel.from_pretrained`], with errors that name the file: a local folder without `config.json`
        (from which Transformers would build the default configuration, then fail on every size) and a truncated or
        corrupt safetensors file are an `OSError` saying so.
        """
        subfolder = kwargs.get("subfolder")
        folder = (
            os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else str(pretrained_model_name_or_path)
        )
        if kwargs.get("config") is None and os.path.isdir(folder) and not os.path.isfile(f"{folder}/{CONFIG_NAME}"):
            raise OSError(
                f"{CONFIG_NAME} is missing from {folder}: it is not a saved model folder (save_pretrained writes "
                f"{CONFIG_NAME} beside the weights), or pass `config=`."
            )
        kwargs["key_mapping"] = {**SAVED_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as error:
            broken = unreadable_safetensors_files(folder) if os.path.isdir(folder) else []
            where = ", ".join(broken) or f"a safetensors file of {pretrained_model_name_or_path}"
            raise OSError(f"{where}: truncated or corrupt, it cannot be loaded ({error}).") from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        [`~PreTrainedModel.save_pretrained`]; a head's `auto_map` also names its base model under `AutoModel`, which
        serving engines build from a saved folder's code (vLLM's Transformers modeling backend).
        """
        if self._auto_class is not None and self.base_model is not self:
            base_model_class = type(self.base_model)
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"{base_model_class.__module__.rsplit('.', 1)[-1]}.{base_model_class.__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # `push_to_hub` saves Transformers' empty model card just before uploading: describe this model instead.
        write_model_card(self, working_dir, repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = getattr(self.config, "initializer_range", None) or self.config.get_text_config().initializer_range
        if isinstance(module, PalmEVisionEmbeddings):
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, PalmEPerceiverResampler):
            init.normal_(module.latents, std=std)
        elif isinstance(module, PalmEQKNorm):
            init.ones_(module.weight)
        elif isinstance(module, PalmERotaryEmbedding):
            inv_freq, xpos_scale = module.compute_buffers()
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.xpos_scale, xpos_scale)
        elif isinstance(module, PalmEAlibiBias):
            init.copy_(module.slopes, alibi_slopes(module.num_alibi_heads, module.num_heads))


class PalmEVisionModel(PalmEPreTrainedModel):
    """The ViT image encoder: `pixel_values` -> patch features `(batch_size, num_patches, hidden_size)`."""

    config: PalmEVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "vision_model"
    _can_record_outputs = {
        "hidden_states": PalmEVisionEncoderLayer,
        "attentions": PalmEAttention,
    }

    def __init__(self, config: PalmEVisionConfig):
        super().__init__(config)
        self.embeddings = PalmEVisionEmbeddings(config)
        self.layers = nn.ModuleList([PalmEVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
            Images, values in [0, 1] (the reference feeds them un-normalised).
        """
        hidden_states = self.embeddings(pixel_values)
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        return BaseModelOutput(last_hidden_state=self.post_layernorm(hidden_states))


def check_attention_implementation_serves(config: PalmETextConfig) -> None:
    """
    Refuses a decoder whose attention an implementation outside Transformers' eager and sdpa would compute wrong.
    Serving engines bring their own kernel (vLLM's Transformers modeling backend sets `"vllm"`, its paged attention):
    it attends causally over each sequence's tokens and ignores the model's attention mask and kernels, which carry
    ALiBi's bias, the hierarchical block's windows (its token shift needs the padding mask too) and, in the
    cross-attention layers, the image.
    """
    implementation = config._attn_implementation
    if implementation is None or implementation in ATTENTION_IMPLEMENTATIONS:
        return
    unserved = []
    if config.alibi_num_heads > 0:
        unserved.append(f"`alibi_num_heads={config.alibi_num_heads}` (ALiBi: a bias carried by the attention mask)")
    if config.block_type == "hierarchical":
        unserved.append("`block_type='hierarchical'` (window attention and a token shift of its own)")
    if config.add_cross_attention:
        unserved.append("`add_cross_attention=True` (cross-attention to the image)")
    if unserved:
        raise ValueError(
            f"The attention implementation {implementation!r} (a serving engine's kernel, such as vLLM's) ignores "
            f"the attention mask and the decoder's own kernels, so it cannot compute this decoder's "
            f"{', '.join(unserved)}: it would be served wrong. Engines serve the PaLM-E paper's shape: "
            "`block_type='parallel'` (or 'standard' with `alibi_num_heads=0`) and `vision_integration='prefix'`; "
            "run this model with `attn_implementation='sdpa'` or 'eager' and `generate()`."
        )


class PalmETextModel(PalmEPreTrainedModel):
    """
    The text decoder without its head: token embeddings (plus absolute positions if configured), decoder layers, final
    LayerNorm. Self-attention keys/values (and, in cross-attention layers, the image keys/values) live in
    `cache`.
    """

    config: PalmETextConfig
    input_modalities = ("text",)
    _can_record_outputs = {
        "hidden_states": [PalmETextDecoderLayer, PalmEParallelDecoderLayer, PalmEHierarchicalDecoderLayer],
        "attentions": OutputRecorder(PalmEAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(PalmECrossAttention, index=1, layer_name="cross_attn.attention"),
    }
    # Hierarchical layers saved by palme-hf 0.1 kept rotary frequencies per block; the text model computes them now.
    _keys_to_ignore_on_load_unexpected = [r"layers\.\d+\.rotary_emb\.inv_freq$"]

    def __init__(self, config: PalmETextConfig):
        check_attention_implementation_serves(config)
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.use_absolute_position_embeddings
            else None
        )
        # The layers share one rotary embedding (the hierarchical blocks' over the steps of their groups) and the
        # standard layers one ALiBi bias, computed once per forward pass.
        self.rotary_position_divisor = config.compress_factor // config.stride
        self.rotary_emb = (
            PalmERotaryEmbedding(
                config.rotary_dim,
                base=config.rope_parameters["rope_theta"],
                use_xpos=config.use_xpos,
                xpos_scale_base=config.xpos_scale_base,
                rotate_values=config.rotate_values,
            )
            if config.use_rotary and config.window_size != 0
            else None
        )
        self.alibi = (
            PalmEAlibiBias(config.alibi_num_heads, config.num_attention_heads) if config.alibi_num_heads > 0 else None
        )
        layer_class = DECODER_LAYER_CLASSES[config.block_type]
        self.layers = nn.ModuleList([layer_class(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    @accept_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        encoder_hidden_states: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): token ids.
        attention_mask (`torch.Tensor` of shape `(batch_size, past_len + seq_len)`, *optional*): 1 for tokens, 0 for
            padding.
        position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): positions of the tokens,
            `past_len + arange(seq_len)` by default.
        cache (`Cache`, *optional*): keys/values of earlier steps (an `EncoderDecoderCache` when the layers
            cross-attend).
        inputs_embeds (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`, *optional*): embeddings in
            place of `input_ids`.
        encoder_hidden_states (`torch.FloatTensor` of shape
            `(batch_size, num_image_tokens, cross_attention_hidden_size)`, *optional*): image features to cross-attend
            to; not needed once the cache holds their keys/values.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of `input_ids` or `inputs_embeds`.")
        batch_size, seq_len = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        if seq_len == 0:
            raise ValueError(f"The input holds no tokens (shape {(batch_size, seq_len)}): give at least one.")

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if self.config.add_cross_attention and cache is not None and not isinstance(cache, EncoderDecoderCache):
            if cache.get_seq_length() != 0:
                raise ValueError(
                    "A decoder with cross-attention needs an `EncoderDecoderCache` (self-attention cache, "
                    f"cross-attention cache); got a filled {type(cache).__name__}."
                )
            # cross-attention keys/values span the image features: plain growing layers, whatever the self-attention
            # layers are (sliding, hybrid)
            cache = EncoderDecoderCache(cache, DynamicCache())
        self_attention_cache, cross_attention_cache = split_cache(cache)

        past_seen_tokens = cached_length(self_attention_cache, seq_len, attention_mask)
        # Checks that read token ids or positions make the host wait for the device: they run on the passes that
        # bring a prompt, not on the one-token steps of decoding, whose tokens the model itself chose, nor in compiled
        # graphs (generate() compiles the decoding steps), where the cache's length is a tensor too.
        compiling = torch.compiler.is_compiling()
        is_decoding_step = compiling or (seq_len == 1 and past_seen_tokens > 0)
        if inputs_embeds is None:
            if not is_decoding_step:
                check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if encoder_hidden_states is not None and not compiling and past_seen_tokens > 0:
            raise ValueError(
                f"`encoder_hidden_states` were given with a cache that already holds {past_seen_tokens} tokens, "
                "computed with another image or none: they would be mixed. Leave them out to continue with the cached "
                "image, or start a new cache with the whole prompt."
            )
        if attention_mask is not None and attention_mask.ndim == 2:
            expected = (batch_size, past_seen_tokens + seq_len)
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"`attention_mask` must have shape (batch_size, past_len + seq_len) = {expected}, got "
                    f"{tuple(attention_mask.shape)}."
                )
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0).expand(batch_size, -1)
        # Positions given with a cache are at most the number of tokens seen (generate() counts the tokens of each
        # row): a bound that needs no read of their values.
        last_position = past_seen_tokens + seq_len - 1

        if self.embed_positions is not None:
            max_positions = self.config.max_position_embeddings
            if not is_decoding_step or (not compiling and last_position >= max_positions):
                last_given = int(position_ids.max())
                if last_given >= max_positions:
                    raise ValueError(
                        f"Position {last_given} is beyond `max_position_embeddings` ({max_positions}) of this model's "
                        "absolute positions: the sequence (with its cached past) is too long."
                    )
            inputs_embeds = inputs_embeds + self.embed_positions(position_ids) * self.config.hidden_size**-0.5

        layer_kwargs = {}
        if self.config.block_type == "hierarchical":
            causal_mask = create_hierarchical_mask(
                self.config._attn_implementation,
                inputs_embeds,
                attention_mask,
                self_attention_cache,
                self.config.window_size,
                self.rotary_position_divisor,
            )
            if attention_mask is not None and attention_mask.ndim == 2:
                # padding tokens pass nothing on through the token shift
                layer_kwargs["token_mask"] = attention_mask[:, -seq_len:]
        else:
            causal_mask = create_causal_mask(
                self.config,
                inputs_embeds,
                attention_mask,
                self_attention_cache,
                position_ids=position_ids,
                # skipping the mask reads the padding mask; a decoding step keeps it rather than wait for the device
                allow_is_causal_skip=self.alibi is None and not is_decoding_step,
            )
        if self.alibi is not None:
            query_positions = torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens
            alibi = self.alibi(query_positions, causal_mask.shape[-1])
            causal_mask = add_bias_to_mask(causal_mask, alibi, inputs_embeds.dtype)

        position_embeddings = None
        if self.rotary_emb is not None:
            divisor = self.rotary_position_divisor
            position_embeddings = self.rotary_emb(
                position_ids // divisor,
                xpos_offset=self.config.xpos_offset,
                dtype=inputs_embeds.dtype,
                check_positions=not is_decoding_step
                or not (
                    compiling
                    or self.rotary_emb.xpos_positions_fit(
                        0, last_position // divisor, self.config.xpos_offset, inputs_embeds.dtype
                    )
                ),
            )

        hidden_states = inputs_embeds
        for decoder_layer in self.layers:
            # The image features go in positionally, so that reentrant gradient checkpointing passes their gradient on.
            hidden_states = decoder_layer(
                hidden_states,
                encoder_hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                cache=self_attention_cache,
                cross_attention_cache=cross_attention_cache,
                **layer_kwargs,
                **kwargs,
            )

        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=self.norm(hidden_states), **cache_field(cache if use_cache else None)
        )


class PalmEModel(PalmEPreTrainedModel):
    """
    PalmE without its language-model head: the image encoder, the image-to-text bridge and the text decoder. The
    towers are PalmE's own ([`PalmEVisionModel`], [`PalmETextModel`]) or, for other configs, the Transformers models
    `AutoModel` builds from `config.vision_config` and `config.text_config` (as Llava builds its towers).
    """

    def __init__(self, config: PalmEConfig):
        super().__init__(config)
        vision_config, text_config = config.vision_config, config.text_config
        self.vision_model = (
            PalmEVisionModel(vision_config)
            if is_own_tower(vision_config, PalmEVisionConfig)
            else AutoModel.from_config(vision_config)
        )
        self.resampler = PalmEPerceiverResampler(config) if config.num_latents is not None else None
        self.multi_modal_projector = build_projector(config)
        self.state_encoder = build_observation_encoder(config, "state")
        self.object_encoder = build_observation_encoder(config, "object")
        self.language_model = (
            PalmETextModel(text_config)
            if is_own_tower(text_config, PalmETextConfig)
            else AutoModel.from_config(text_config)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """
        Encodes images, `pixel_values` `(num_images, num_channels, height, width)`. `pooler_output` holds the image
        features the text receives, `(num_images, num_image_tokens, width)`: the encoder's patch features (the last
        `num_patches` tokens of its output: a class token is left out), resampled into `num_latents` features when
        configured, projected to the decoder width with `"prefix"` integration. `last_hidden_state`, `hidden_states`
        and `attentions` are the vision encoder's. With `return_dict=False` (or `config.return_dict=False`), the tuple
        of the fields that are set, as Transformers' models return.
        """
        vision_outputs = self.vision_model(pixel_values, **kwargs)
        image_features = vision_outputs.last_hidden_state
        if not is_own_tower(self.config.vision_config, PalmEVisionConfig):
            image_features = patch_features(image_features, num_patches_of(self.config.vision_config))
        if self.resampler is not None:
            image_features = self.resampler(image_features)
        if self.multi_modal_projector is not None:
            image_features = self.multi_modal_projector(image_features)
        return BaseModelOutputWithPooling(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=image_features.clone(),  # not a view (of a biased projector's product, or of the slice)
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, token_id: int | None = None
    ) -> torch.Tensor:
        """
        Where the image placeholders are (or those of `token_id`, a state or object placeholder), `(batch_size,
        seq_len)`: the `image_token_id` tokens of `input_ids`, or, with `inputs_embeds` only, the positions holding
        that token's embedding.
        """
        token_id = self.config.image_token_id if token_id is None else token_id
        if input_ids is not None:
            return input_ids == token_id
        placeholder = torch.tensor(token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(placeholder)).all(dim=-1)

    def _observation_encoder(self, kind: str) -> PalmEObservationEncoder:
        """The encoder of `kind` observations; a `ValueError` when the model takes none (their values were given)."""
        encoder = getattr(self, f"{kind}_encoder")
        if encoder is None:
            raise ValueError(
                f"`{OBSERVATION_KINDS[kind]}` were given, but this model takes no {kind} vectors (`config.{kind}_dim` "
                f"is None): build it with `{kind}_dim` and `{kind}_token_id` in its PalmEConfig."
            )
        return encoder

    def get_observation_features(self, kind: str, values: torch.FloatTensor) -> torch.FloatTensor:
        """
        Encodes observations of `kind` (`"state"` or `"object"`), `values` `(num_values, config.{kind}_dim)` in the
        order of their placeholders, into the embeddings that replace those, `(num_values, config.num_{kind}_tokens,
        text hidden size)`.

        Raises:
            `ValueError` when the model takes no such observations, for values of another width, and for NaN or
            infinite values (checked on the host, at prefill: values are given with the prompt only).
        """
        name, encoder = OBSERVATION_KINDS[kind], self._observation_encoder(kind)
        width = getattr(self.config, f"{kind}_dim")
        if values.ndim != 2 or values.shape[1] != width:
            raise ValueError(
                f"`{name}` must have shape (num_{kind}s, {kind}_dim) = (num_{kind}s, {width}), one row per {kind} in "
                f"the order of their placeholders; got {tuple(values.shape)}."
            )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(values).all()):
            raise ValueError(f"`{name}` hold NaN or infinite values: give finite {kind} vectors.")
        return encoder(values)

    def _merge_observations(
        self,
        kind: str,
        values: torch.FloatTensor | None,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        is_decoding_step: bool,
    ) -> torch.Tensor:
        """
        Replaces the placeholders of `kind` by the features of `values`, in order, as images replace theirs: the first
        `num_{kind}_tokens` placeholders of the batch (read sequence by sequence) by the first value's, and so on.
        Placeholders without values (read on the host, except on a decoding step) and values without placeholders
        are a `ValueError`.
        """
        token_id, name = getattr(self.config, f"{kind}_token_id"), OBSERVATION_KINDS[kind]
        if values is None:
            if token_id is not None and input_ids is not None and not is_decoding_step:
                if bool((input_ids == token_id).any()):
                    raise ValueError(
                        f"`input_ids` hold {kind} placeholder tokens (id {token_id}) but no `{name}` were given."
                    )
            return inputs_embeds
        features = self.get_observation_features(kind, values)
        placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds, token_id)
        return self._scatter_into_placeholders(inputs_embeds, placeholder_mask, features, kind, name, f"`{name}`")

    def _scatter_into_placeholders(
        self,
        inputs_embeds: torch.Tensor,
        placeholder_mask: torch.Tensor,
        features: torch.Tensor,
        kind: str,
        name: str,
        given: str,
    ) -> torch.Tensor:
        """
        Replaces the placeholders of `kind` (`placeholder_mask`, `(batch_size, seq_len)`) of `inputs_embeds` by
        `features` `(num_values, per_value, hidden_size)`, in order: the first `per_value` placeholders of the batch
        (read sequence by sequence) by the first value's, and so on. A count that does not fit (read on the host; not
        while compiling) is a `ValueError` naming the input `name` (`given`, as the message says it).
        """
        if not torch.compiler.is_compiling():
            num_values, per_value = features.shape[:2]
            counts = placeholder_mask.sum(dim=1).tolist()
            token_id = self.config.image_token_id if kind == "image" else getattr(self.config, f"{kind}_token_id")
            if sum(counts) == 0:
                raise ValueError(
                    f"`{name}` were given ({num_values}), but the text holds no {kind} placeholder tokens (id "
                    f"{token_id}): put {per_value} placeholders where each {kind} goes (PalmEProcessor expands its "
                    f"{kind} marker into them), or leave `{name}` out."
                )
            if sum(counts) != num_values * per_value or any(count % per_value for count in counts):
                raise ValueError(
                    f"The text holds {sum(counts)} {kind} placeholder tokens (id {token_id}; {counts} per sequence), "
                    f"but {num_values} {given} were given, which need {per_value} placeholders each "
                    f"({num_values * per_value} in all, a multiple of {per_value} per sequence)."
                )
        mask = placeholder_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))

    def _merge_image_features(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """
        Replaces the image placeholders by the images' features, in order: the first `num_image_tokens` placeholders
        of the batch (read sequence by sequence) by the first image's, and so on. Each sequence may hold any number of
        images, at any positions.
        """
        image_token_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        return self._scatter_into_placeholders(
            inputs_embeds, image_token_mask, image_features, "image", "pixel_values", "images"
        )

    @accept_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        state_values: torch.FloatTensor | None = None,
        object_values: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PalmEModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): token ids; with `"prefix"` integration,
            `config.num_image_tokens` placeholders (`config.image_token_id`) where each image goes.
        pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, image_size, image_size)`, *optional*):
            with cross-attention one image per sequence; with `"prefix"` integration the images of all sequences in
            the order of their placeholders (any number per sequence). May be omitted once the cache holds the image
            (cross-attention) or after the placeholders were consumed (prefix).
        state_values (`torch.FloatTensor` of shape `(num_states, config.state_dim)`, *optional*): the state vectors
            of all sequences in the order of their placeholders, `config.num_state_tokens` `config.state_token_id`
            tokens each (any number per sequence). Given with the placeholders only: the cache holds them after.
        object_values (`torch.FloatTensor` of shape `(num_objects, config.object_dim)`, *optional*): the object
            vectors, as `state_values`, with `config.num_object_tokens` `config.object_token_id` placeholders each.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of `input_ids` or `inputs_embeds`.")
        observation_values = {"state": state_values, "object": object_values}
        for kind, values in observation_values.items():
            if values is not None:
                self._observation_encoder(kind)  # values for a kind the model does not take are refused at once
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if pixel_values is not None and pixel_values.ndim != 4:
            raise ValueError(
                "`pixel_values` must be a batch of images (batch_size, channels, height, width), got shape "
                f"{tuple(pixel_values.shape)}."
            )
        image_outputs = image_features = None
        images_join_cached_tokens = (
            pixel_values is not None
            and cache is not None
            and not torch.compiler.is_compiling()
            and cache.get_seq_length() > 0
        )
        if images_join_cached_tokens:
            pixel_values = self._images_not_in_cache(pixel_values, input_ids, cache)
        if pixel_values is not None:
            if self.config.vision_integration == "cross_attention" and pixel_values.shape[0] != batch_size:
                raise ValueError(
                    f"Got {pixel_values.shape[0]} images for {batch_size} text sequences: with cross-attention give "
                    "one image per sequence."
                )
            output_flags = {key: kwargs[key] for key in ("output_attentions", "output_hidden_states") if key in kwargs}
            image_outputs = self.get_image_features(pixel_values, return_dict=True, **output_flags)
            image_features = image_outputs.pooler_output

        if self.config.vision_integration == "prefix":
            # as in the text model, a one-token decoding step (a token the model chose) is not read on the host
            is_decoding_step = torch.compiler.is_compiling() or (
                input_ids is not None and input_ids.shape[1] == 1 and cached_length(cache, 1, attention_mask) > 0
            )
            if inputs_embeds is None:
                if not is_decoding_step:
                    check_token_ids(input_ids, self.config.text_config.vocab_size)
                inputs_embeds = self.get_input_embeddings()(input_ids)
            if image_features is not None:
                inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, image_features)
            elif (
                input_ids is not None
                and not is_decoding_step
                and bool((input_ids == self.config.image_token_id).any())
            ):
                raise ValueError(
                    f"`input_ids` hold image placeholder tokens (id {self.config.image_token_id}) but no "
                    "`pixel_values` were given."
                )
            for kind, values in observation_values.items():
                inputs_embeds = self._merge_observations(kind, values, input_ids, inputs_embeds, is_decoding_step)
            input_ids = None
        else:
            kwargs["encoder_hidden_states"] = image_features

        outputs = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **cache_field(cache),
            **kwargs,
        )
        output_cache = getattr(outputs, CACHE_NAME, None)
        if image_features is not None and output_cache is not None and not torch.compiler.is_compiling():
            # a filled cache adds the images of a later turn to those it holds; an empty one holds these alone
            earlier = getattr(output_cache, CACHED_IMAGES_ATTRIBUTE, None) if images_join_cached_tokens else None
            if earlier is not None:
                pixel_values = torch.cat([earlier, pixel_values.to(earlier.device, earlier.dtype)])
            setattr(output_cache, CACHED_IMAGES_ATTRIBUTE, pixel_values)
        return PalmEModelOutputWithPast(**outputs, image_outputs=image_outputs)

    def _images_not_in_cache(
        self, pixel_values: torch.FloatTensor, input_ids: torch.LongTensor | None, cache: Cache
    ) -> torch.FloatTensor | None:
        """
        `pixel_values` given with a cache that already holds tokens: the images to encode now, `None` when they are
        the images the cache holds (a prompt cache reused, generate() passing the image again), never a mix. With
        `"prefix"` integration, images for placeholders among the new tokens are new images (a later turn).

        Raises:
            `ValueError` when the images differ from those the cache holds (or the cache holds tokens computed
            without an image): its keys and values were computed with those, and would be mixed with the new ones.
        """
        if self.config.vision_integration == "prefix" and (
            input_ids is None or bool((input_ids == self.config.image_token_id).any())
        ):
            return pixel_values
        cached_images = getattr(cache, CACHED_IMAGES_ATTRIBUTE, None)
        if (
            cached_images is not None
            and cached_images.shape == pixel_values.shape
            and torch.equal(cached_images, pixel_values.to(cached_images.device, cached_images.dtype))
        ):
            return None
        held = "other images" if cached_images is not None else "no image"
        raise ValueError(
            f"`pixel_values` were given with a cache that already holds {cache.get_seq_length()} tokens, computed "
            f"with {held}: the new images would be mixed with them. To continue with the cached image, leave out "
            "`pixel_values` (or pass the same ones); for another image, start a new cache (`cache=None`, or a fresh "
            "`DynamicCache()`) with the whole prompt."
        )


def repeat_groups(values: torch.Tensor, group_sizes: list[int], expand_size: int) -> torch.Tensor:
    """`values` cut into consecutive groups of `group_sizes` (one per text), each group repeated `expand_size` times in
    turn: [a, b] -> [a, b, a, b] for a text of two values and `expand_size=2`."""
    groups = torch.split(values, group_sizes)
    return torch.cat([group for group in groups for _ in range(expand_size)])


class PalmEForCausalLM(PalmEPreTrainedModel, GenerationMixin):
    """
    The PalmE text decoder with its language-model head, for text alone (`AutoModelForCausalLM`). Loads a text decoder
    saved on its own or the text half of a [`PalmEForConditionalGeneration`] checkpoint (its image encoder, resampler,
    projector and state and object encoders are left out); cross-attention layers, if the decoder has them, are
    skipped without an image.
    """

    config: PalmETextConfig
    input_modalities = ("text",)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _keys_to_ignore_on_load_unexpected = [
        r"^model\.(vision_model|resampler|multi_modal_projector|state_encoder|object_encoder)\."
    ]

    def __init__(self, config: PalmETextConfig | PalmEConfig):
        config = config.get_text_config()
        if not is_own_tower(config, PalmETextConfig):
            raise ValueError(
                f"PalmEForCausalLM is PalmE's own text decoder; this text decoder is a {type(config).__name__}: load "
                "it with AutoModelForCausalLM, from its own checkpoint."
            )
        super().__init__(config)
        self.model = PalmETextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # A PalmEForConditionalGeneration checkpoint keeps the decoder under `model.language_model.`.
        kwargs["key_mapping"] = {r"^model\.language_model\.": "model.", **(kwargs.get("key_mapping") or {})}
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @accept_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): targets for the next-token loss,
            aligned with `input_ids` (shifted inside); -100 is ignored.
        logits_to_keep (`int` or `torch.Tensor`): compute logits for the last `logits_to_keep` positions only
            (0 = all).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        # A biased head's 3-D output is a view of its 2-D product; the outputs handed out are tensors of their own, on
        # which FSDP2's pre-backward hooks see every in-place change.
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)).clone()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_field(getattr(outputs, CACHE_NAME)),
        )


class PalmEForConditionalGeneration(PalmEPreTrainedModel, GenerationMixin):
    """
    PalmE with its language-model head: captioning, VQA, training. The head is a biased linear layer (as the
    reference) on PalmE's own decoder, and a linear layer without bias on a Transformers language model (the heads of
    Llama, GPT-2, Qwen2, Gemma, ...), tied to the token embeddings when `text_config.tie_word_embeddings`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: PalmEConfig):
        super().__init__(config)
        self.model = PalmEModel(config)
        text_config = config.text_config
        own_decoder = is_own_tower(text_config, PalmETextConfig)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=own_decoder)
        if not own_decoder:
            # the token embeddings' name is the language model's own (`wte` in GPT-2)
            embeddings = self.model.language_model.get_input_embeddings().weight
            name = next(key for key, value in self.model.language_model.named_parameters() if value is embeddings)
            self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}"}
        self.post_init()

    @classmethod
    def from_pretrained_towers(
        cls,
        vision_model: str,
        text_model: str,
        image_token_id: int | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs,
    ) -> "PalmEForConditionalGeneration":
        """
        The PaLM-E recipe: a model built from a pretrained vision encoder and a pretrained causal language model, each
        a local folder or Hub id written by `save_pretrained` of the tower's own class (`ViTModel`,
        `SiglipVisionModel`, `LlamaForCausalLM`, `PalmEVisionModel`, `PalmEForCausalLM`, ...; of a CLIP or SigLIP
        dual encoder, `CLIPModel` or `SiglipModel`, the vision half is taken), with their weights and a freshly
        initialised projector (and resampler, with `num_latents`).

        The image placeholder is the `<image>` token added to `text_model`'s tokenizer, as
        [`PalmEProcessor.from_pretrained_towers`] adds it (or `image_token_id`, when given); with `state_dim` (or
        `object_dim`) and no `image_token_id`, the `<state>` (`<obj>`) token follows it, unless its id is given. The
        token embeddings and the head grow to hold them. `dtype` is what `from_pretrained` takes (`torch.bfloat16`,
        `"bfloat16"`, `"auto"`: the checkpoints' own): the towers load and the model is built in it, as
        `from_pretrained` builds a model, so that the rotary frequencies stay float32; without it the model is
        float32. The loading arguments of `from_pretrained` (`revision`, `cache_dir`, `token`, `local_files_only`,
        `trust_remote_code`, `attn_implementation`, `variant`, `use_safetensors`, `low_cpu_mem_usage`, and
        `device_map` as one device) go to the towers' loaders; the other `kwargs` to [`PalmEConfig`]
        (`vision_integration` defaults to `"prefix"`; `projector_type`, `num_latents`, `state_dim`, ...). Freeze
        towers for training with [`freeze_towers`].
        """
        return load_pretrained_towers(cls, vision_model, text_model, image_token_id, dtype, **kwargs)

    def freeze_towers(self, vision_model: bool = True, language_model: bool = True) -> "PalmEForConditionalGeneration":
        """
        Freezes the towers for training, as the PaLM-E paper's variants do: `vision_model=True` freezes the image
        encoder, `language_model=True` the decoder with its head (token embeddings included); `False` makes that tower
        trainable again. What joins image and text stays trainable: the projector and the resampler, the state and
        object encoders, and with cross-attention the decoder's cross-attention layers (as Flamingo trains them
        between frozen towers); both `True` trains those only. Returns the model.
        """
        for parameter in self.model.vision_model.parameters():
            parameter.requires_grad_(not vision_model)
        for module in (self.model.language_model, self.lm_head):
            for parameter in module.parameters():
                parameter.requires_grad_(not language_model)
        for module in self.model.language_model.modules():
            if isinstance(module, PalmETextCrossAttention):
                module.requires_grad_(True)
        return self

    def lora_targets(self) -> dict[str, list[str]]:
        """
        What a PEFT `LoraConfig` takes to put LoRA adapters on the language model while what joins image and text
        trains in full, for any text tower (Llama, GPT-2, Qwen2, Gemma, PalmE's own, ...):
        `get_peft_model(model, LoraConfig(r=8, **model.lora_targets()))`. `target_modules` are the full names of the
        language model's linear layers (`nn.Linear`, and GPT-2's `Conv1D`), its cross-attention layers left out;
        `modules_to_save` those of the projector, the resampler, the state and object encoders and the
        cross-attention layers that the model has.
        """
        joining = [
            module
            for module in (
                self.model.multi_modal_projector,
                self.model.resampler,
                self.model.state_encoder,
                self.model.object_encoder,
            )
            if module is not None
        ]
        joining += [module for module in self.model.modules() if isinstance(module, PalmETextCrossAttention)]
        names = {module: name for name, module in self.named_modules()}
        modules_to_save = [names[module] for module in joining]
        target_modules = [
            name
            for name, module in self.model.language_model.named_modules(prefix="model.language_model")
            if isinstance(module, (nn.Linear, Conv1D))
            and not any(name.startswith(f"{joined}.") for joined in modules_to_save)
        ]
        return {"target_modules": target_modules, "modules_to_save": modules_to_save}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    @accept_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        state_values: torch.FloatTensor | None = None,
        object_values: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PalmECausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): targets for the next-token loss,
            aligned with `input_ids` (shifted inside); -100 is ignored.
        logits_to_keep (`int` or `torch.Tensor`): compute logits for the last `logits_to_keep` positions only
            (0 = all).
        state_values (`torch.FloatTensor` of shape `(num_states, config.state_dim)`, *optional*),
        object_values (`torch.FloatTensor` of shape `(num_objects, config.object_dim)`, *optional*): the state and
            object vectors of the text's placeholders, in order, as [`PalmEModel.forward`] takes them.

        Example:

        ```python
        >>> import torch
        >>> from palme_hf import PalmEConfig, PalmEForConditionalGeneration

        >>> model = PalmEForConditionalGeneration(PalmEConfig.from_zeta_kwargs())
        >>> pixel_values = torch.rand(1, 3, 256, 256)
        >>> input_ids = torch.randint(0, 20000, (1, 8))
        >>> generated = model.generate(pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=16)
        ```
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            state_values=state_values,
            object_values=object_values,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # Not a view of the head's product (see PalmEForCausalLM.forward).
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep)).clone()

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.text_config.vocab_size, **kwargs)

        return PalmECausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
            image_outputs=outputs.image_outputs,
            **cache_field(getattr(outputs, CACHE_NAME)),
        )

    def _get_logits_processor(self, generation_config: GenerationConfig, *args, **kwargs) -> LogitsProcessorList:
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if self.config.vision_integration == "prefix":
            # The placeholders stand for image (state, object) features, never a token to generate: suppressed here
            # rather than through `generation_config.suppress_tokens`, which a user's generation config would replace.
            placeholders = [self.config.image_token_id, self.config.state_token_id, self.config.object_token_id]
            placeholders = [token_id for token_id in placeholders if token_id is not None]
            processors.append(SuppressTokensLogitsProcessor(placeholders, device=self.device))
        return processors

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict]:
        # Beams and `num_return_sequences` repeat each text `expand_size` times; with `"prefix"` integration a text
        # may hold several images, which are repeated as its group, [a, b] -> [a, b, a, b], so that every copy of
        # the text sees its own images (repeating them one by one, [a, a, b, b], would mix them across copies), as
        # Transformers expands its VLMs' image features.
        # State and object vectors are repeated the same way, by their own placeholders.
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1:
            pixel_values = self._repeat_images_per_text(
                pixel_values, input_ids, model_kwargs.get("inputs_embeds"), expand_size
            )
        observation_values = {kind: model_kwargs.pop(name, None) for kind, name in OBSERVATION_KINDS.items()}
        if expand_size > 1:
            observation_values = {
                kind: self._repeat_observations_per_text(
                    kind, values, input_ids, model_kwargs.get("inputs_embeds"), expand_size
                )
                for kind, values in observation_values.items()
            }
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        for kind, values in observation_values.items():
            if values is not None:
                model_kwargs[OBSERVATION_KINDS[kind]] = values
        return input_ids, model_kwargs

    def _repeat_images_per_text(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        expand_size: int,
    ) -> torch.FloatTensor:
        """
        `pixel_values` `(num_images, channels, height, width)` of a batch of texts, with each text's images repeated
        `expand_size` times as a group: `(num_images * expand_size, channels, height, width)`, in the order of the
        texts' copies.
        """
        if self.config.vision_integration != "prefix":
            return pixel_values.repeat_interleave(expand_size, dim=0)  # one image per text
        if input_ids is None or input_ids.shape[1] == 0:
            input_ids = None  # generate() gives an empty tensor with `inputs_embeds`
        placeholders = self.model.get_placeholder_mask(input_ids, inputs_embeds).sum(dim=1)
        images_per_text = (placeholders // self.config.num_image_tokens).tolist()
        if sum(images_per_text) != pixel_values.shape[0] or any(placeholders % self.config.num_image_tokens):
            raise ValueError(
                f"The texts hold {placeholders.tolist()} image placeholder tokens (id {self.config.image_token_id}), "
                f"{self.config.num_image_tokens} per image, but {pixel_values.shape[0]} images were given: give one "
                "image per placeholder run, in order."
            )
        return repeat_groups(pixel_values, images_per_text, expand_size)

    def _repeat_observations_per_text(
        self,
        kind: str,
        values: torch.FloatTensor | None,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        expand_size: int,
    ) -> torch.FloatTensor | None:
        """
        The values of `kind` observations, `(num_values, {kind}_dim)`, with each text's values repeated `expand_size`
        times as a group, as [`_repeat_images_per_text`] repeats images; `None` stays `None`.
        """
        if values is None:
            return None
        if input_ids is None or input_ids.shape[1] == 0:
            input_ids = None  # generate() gives an empty tensor with `inputs_embeds`
        self.model._observation_encoder(kind)  # values of a kind the model does not take are refused here
        token_id, per_value = getattr(self.config, f"{kind}_token_id"), getattr(self.config, f"num_{kind}_tokens")
        placeholders = self.model.get_placeholder_mask(input_ids, inputs_embeds, token_id).sum(dim=1)
        values_per_text = (placeholders // per_value).tolist()
        if sum(values_per_text) != values.shape[0] or any(placeholders % per_value):
            raise ValueError(
                f"The texts hold {placeholders.tolist()} {kind} placeholder tokens (id {token_id}), {per_value} per "
                f"{kind}, but {values.shape[0]} `{OBSERVATION_KINDS[kind]}` were given: give one per placeholder run, "
                "in order."
            )
        return repeat_groups(values, values_per_text, expand_size)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        state_values: torch.FloatTensor | None = None,
        object_values: torch.FloatTensor | None = None,
        **kwargs,
    ):
        if kwargs.get("next_sequence_length") == 0:
            # generate() would slice `input_ids[:, -0:]` and feed the whole cached prompt again after itself
            raise ValueError(
                f"The cache already holds the whole prompt ({input_ids.shape[1]} tokens), so there is nothing to "
                "feed: pass the prompt with at least one new token after the cached ones, or a fresh cache."
            )
        cache = kwargs.get(CACHE_NAME)
        past_length = cache.get_seq_length() if cache is not None else 0
        # An assistant's cache cut back inside the prompt's image (state, object) placeholders (after a rejected
        # draft) cannot take the rest of their features: the prompt is read again, with its values. A one-token step
        # is a generated token, never a placeholder, and is not looked at (that would synchronise every decoding step).
        given = {
            self.config.image_token_id: pixel_values,
            self.config.state_token_id: state_values,
            self.config.object_token_id: object_values,
        }
        placeholder_ids = [token_id for token_id, values in given.items() if values is not None]
        if (
            placeholder_ids
            and self.config.vision_integration == "prefix"
            and 0 < past_length < input_ids.shape[1] - 1
            and bool(
                torch.isin(input_ids[:, past_length:], torch.tensor(placeholder_ids, device=input_ids.device)).any()
            )
        ):
            cache.crop(-past_length)
            kwargs["next_sequence_length"] = None
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, pixel_values=pixel_values, **kwargs
        )
        # generate() passes the image on its first step only, and never to an assistant model (assisted decoding).
        # The image belongs wherever the cache holds none of it yet: at prefill, an assistant's included. So do the
        # state and object vectors, which generate() would otherwise pass on every step.
        cache = model_inputs.get(CACHE_NAME)
        prefill = cache is None or cache.get_seq_length() == 0
        for name, values in (
            ("pixel_values", pixel_values),
            ("state_values", state_values),
            ("object_values", object_values),
        ):
            if values is not None and prefill:
                model_inputs[name] = values
        return model_inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_NAME)
        if (
            self.config.vision_integration == "cross_attention"
            and cache is not None
            and not isinstance(cache, EncoderDecoderCache)
            and not getattr(cache, "_is_user_defined", False)
        ):
            if isinstance(cache, StaticCache):
                # Cross-attention keys/values span the image features, whatever the text length.
                num_layers = self.config.text_config.num_hidden_layers
                cross_cache = Cache(layers=[StaticLayer(self.config.num_image_tokens) for _ in range(num_layers)])
            else:
                cross_cache = DynamicCache()
            model_kwargs[CACHE_NAME] = EncoderDecoderCache(cache, cross_cache)


__all__ = [
    "PalmEForCausalLM",
    "PalmEForConditionalGeneration",
    "PalmEModel",
    "PalmEPreTrainedModel",
    "PalmETextModel",
    "PalmEVisionModel",
]
