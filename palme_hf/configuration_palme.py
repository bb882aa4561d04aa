"""PalmE model configuration: a ViT image encoder feeding a causal text decoder."""

from transformers import PreTrainedConfig


def check_positive_ints(owner: str | None = None, **values):
    """Raises a `ValueError` for any value that is not a positive integer, naming it (and its owner, if given)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            where = f"{owner}: " if owner else ""
            raise ValueError(f"{where}`{name}` must be a positive integer, got {value!r}.")


class PalmEVisionConfig(PreTrainedConfig):
    r"""
    Configuration of the PalmE image encoder, a ViT as in the reference `ViTransformerWrapper`: images are cut into
    `patch_size` patches, each patch is layer-normed, projected and layer-normed again, learned positions are added,
    then `num_hidden_layers` pre-norm encoder layers and a final LayerNorm follow.

    Args:
        image_size (`int`, defaults to 256): height and width of the (square) input images.
        patch_size (`int`, defaults to 32): side of a patch; must divide `image_size`.
        num_channels (`int`, defaults to 3): channels of the input images.
        hidden_size (`int`, defaults to 512): width of the encoder.
        num_hidden_layers (`int`, defaults to 6): number of encoder layers.
        num_attention_heads (`int`, defaults to 8): attention heads per layer.
        head_dim (`int`, defaults to 64): width of each head (64 whatever `hidden_size` is, as in the reference).
        intermediate_size (`int`, *optional*): feed-forward width, `4 * hidden_size` by default.
        hidden_act (`str`, defaults to `"gelu"`): feed-forward activation.
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): standard deviation of the weight initialisation.
    """

    model_type = "palme_vision"
    base_config_key = "vision_config"
    # Default tensor parallel plan for base model `PalmEVisionModel`
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.fc1": "colwise",
        "layers.*.mlp.fc2": "rowwise",
    }

    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 32,
        num_channels: int = 3,
        hidden_size: int = 512,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        head_dim: int = 64,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        check_positive_ints(
            type(self).__name__,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=num_channels,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
        )
        if image_size % patch_size != 0:
            raise ValueError(
                f"{type(self).__name__}: `image_size` ({image_size}) must be divisible by `patch_size` ({patch_size})."
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PalmETextConfig(PreTrainedConfig):
    r"""
    Configuration of the PalmE text decoder. Each layer is pre-norm self-attention, then (with
    `add_cross_attention`) cross-attention to the image features, then a feed-forward, each with a residual; a final
    LayerNorm and a biased language-model head follow, as in the reference x-transformers `Decoder`.

    Args:
        vocab_size (`int`, defaults to 20000): number of tokens.
        hidden_size (`int`, defaults to 512): width of the decoder.
        num_hidden_layers (`int`, defaults to 6): number of decoder layers.
        num_attention_heads (`int`, defaults to 8): attention heads per layer.
        head_dim (`int`, defaults to 64): width of each head.
        intermediate_size (`int`, *optional*): feed-forward width, `4 * hidden_size` by default.
        hidden_act (`str`, defaults to `"gelu"`): feed-forward activation.
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        max_position_embeddings (`int`, defaults to 1024): longest sequence with absolute positions; the centre of
            the xpos scale by default.
        use_absolute_position_embeddings (`bool`, defaults to `False`): add learned absolute positions (scaled by
            `hidden_size ** -0.5`) to the token embeddings. Sequences are then limited to `max_position_embeddings`.
        alibi_num_heads (`int`, defaults to 4): ALiBi bias on the first `alibi_num_heads` self-attention heads
            (0 turns ALiBi off).
        use_rotary (`bool`, defaults to `True`): rotary embeddings in self-attention.
        rotary_dim (`int`, *optional*): number of features of each head that are rotated, `max(head_dim // 2, 32)`
            (at most `head_dim`) by default.
        rope_theta (`float`, defaults to 10000.0): rotary base.
        use_xpos (`bool`, defaults to `True`): xpos length-extrapolation scaling of the rotated features.
        xpos_scale_base (`int`, defaults to 512): xpos scale base.
        xpos_offset (`int`, *optional*): the position at which the xpos scale is 1, `max_position_embeddings // 2` by
            default. It cancels in query-key products; it matters only with `rotate_values`.
        rotate_values (`bool`, defaults to `False`): also rotate (and xpos-scale, with the key scale) the values, as
            the zeta reference does. Only the zeta converter turns this on.
        qk_norm (`bool`, defaults to `False`): l2-normalise queries and keys per head, with learned per-feature gains,
            and use `qk_norm_scale` as the attention scale.
        qk_norm_scale (`float`, defaults to 10.0): attention scale with `qk_norm`.
        add_cross_attention (`bool`, defaults to `True`): cross-attention to image features in every layer.
        cross_attention_hidden_size (`int`, *optional*): width of the image features, `hidden_size` by default.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): standard deviation of the weight initialisation.
        block_type (`str`, defaults to `"standard"`): the decoder layer.
            `"standard"`: the reference layer above (ALiBi, partial rotary/xpos, GELU feed-forward).
            `"parallel"`: PaLM's parallel block ([`TransformerBlock`]): multi-query attention with rotary/xpos over
            the whole head (query/key normalisation with `qk_norm`) in parallel with a SwiGLU feed-forward of width
            `intermediate_size`.
            `"hierarchical"`: [`HierarchicalBlock`]: token shift, full (rotary with xpos) or local-window
            (`window_size`, plain rotary) attention, axial grouping by `compress_factor // stride`, a GELU
            feed-forward of width `intermediate_size`; no query/key normalisation or attention dropout.
            Cross-attention to the image follows the block in every layer, whatever its type.
        window_size (`int`, *optional*): local attention window of the hierarchical block (`None`: full attention).
        compress_factor (`int`, defaults to 1): compression of the hierarchical block, a power of two.
        stride (`int`, defaults to 1): stride of the hierarchical block.
        num_key_value_heads (`int`, *optional*): key/value heads of self-attention, set by the block type: 1 for the
            parallel block's multi-query attention, `num_attention_heads` otherwise. Read by caches and
            tensor-parallel plans; a given value must agree.
        pad_token_id (`int`, *optional*): the padding token, carried into the generation config.
        bos_token_id (`int`, *optional*): the beginning-of-sequence token, carried into the generation config.
        eos_token_id (`int` or `list[int]`, *optional*): the end-of-sequence token(s): `generate()` stops there.
    """

    model_type = "palme_text"
    base_config_key = "text_config"
    # Tensor parallel plans for base model `PalmETextModel`, put together by `base_model_tp_plan`: the blocks share
    # module names, not head layouts.
    block_tp_plans = {
        "standard": {
            "layers.*.mlp.fc1": "colwise",
            "layers.*.mlp.fc2": "rowwise",
        },
        # Multi-query attention: the single key/value head cannot be split, every rank keeps `k_proj` and `v_proj`.
        "parallel": {
            "layers.*.block.self_attn.q_proj": "colwise",
            "layers.*.block.self_attn.o_proj": "rowwise",
            "layers.*.block.mlp.gate_proj": "colwise",
            "layers.*.block.mlp.up_proj": "colwise",
            "layers.*.block.mlp.down_proj": "rowwise",
        },
        "hierarchical": {
            "layers.*.block.self_attn.q_proj": "colwise",
            "layers.*.block.self_attn.k_proj": "colwise",
            "layers.*.block.self_attn.v_proj": "colwise",
            "layers.*.block.self_attn.o_proj": "rowwise",
            "layers.*.block.mlp.fc1": "colwise",
            "layers.*.block.mlp.fc2": "rowwise",
        },
    }
    standard_attention_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
    }
    cross_attention_tp_plan = {
        "layers.*.cross_attn.attention.q_proj": "colwise",
        "layers.*.cross_attn.attention.k_proj": "colwise",
        "layers.*.cross_attn.attention.v_proj": "colwise",
        "layers.*.cross_attn.attention.o_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        vocab_size: int = 20000,
        hidden_size: int = 512,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        head_dim: int = 64,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        max_position_embeddings: int = 1024,
        use_absolute_position_embeddings: bool = False,
        alibi_num_heads: int = 4,
        use_rotary: bool = True,
        rotary_dim: int | None = None,
        rope_theta: float = 10000.0,
        use_xpos: bool = True,
        xpos_scale_base: int = 512,
        xpos_offset: int | None = None,
        rotate_values: bool = False,
        qk_norm: bool = False,
        qk_norm_scale: float = 10.0,
        add_cross_attention: bool = True,
        cross_attention_hidden_size: int | None = None,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        block_type: str = "standard",
        window_size: int | None = None,
        compress_factor: int = 1,
        stride: int = 1,
        num_key_value_heads: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        cross_attention_hidden_size = hidden_size if cross_attention_hidden_size is None else cross_attention_hidden_size
        if rotary_dim is None:
            # the blocks rotate the whole head; the reference layer the first max(head_dim // 2, 32) features
            rotary_dim = min(head_dim, max(head_dim // 2, 32)) if block_type == "standard" else head_dim
        xpos_offset = max_position_embeddings // 2 if xpos_offset is None else xpos_offset
        name = type(self).__name__
        check_positive_ints(
            name,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            cross_attention_hidden_size=cross_attention_hidden_size,
        )
        if not 0 <= alibi_num_heads <= num_attention_heads:
            raise ValueError(
                f"{name}: `alibi_num_heads` ({alibi_num_heads}) must be between 0 and `num_attention_heads` "
                f"({num_attention_heads})."
            )
        if use_rotary and not (0 < rotary_dim <= head_dim and rotary_dim % 2 == 0):
            raise ValueError(
                f"{name}: `rotary_dim` ({rotary_dim}) must be even, positive and at most `head_dim` ({head_dim})."
            )
        if use_xpos and not use_rotary:
            raise ValueError(f"{name}: `use_xpos=True` needs `use_rotary=True`.")
        if rotate_values and not use_rotary:
            raise ValueError(f"{name}: `rotate_values=True` needs `use_rotary=True`.")
        if use_xpos and xpos_scale_base <= 0:
            raise ValueError(f"{name}: `xpos_scale_base` must be positive, got {xpos_scale_base}.")
        _check_block_options(
            name, block_type, hidden_size, intermediate_size, head_dim, alibi_num_heads, use_rotary, rotary_dim,
            rotate_values, window_size, compress_factor, stride,
        )
        block_key_value_heads = 1 if block_type == "parallel" else num_attention_heads
        if num_key_value_heads is not None and num_key_value_heads != block_key_value_heads:
            raise ValueError(
                f"{name}: `block_type={block_type!r}` has {block_key_value_heads} key/value heads, got "
                f"`num_key_value_heads={num_key_value_heads}`."
            )
        for token_name, token_ids in (
            ("pad_token_id", pad_token_id),
            ("bos_token_id", bos_token_id),
            ("eos_token_id", eos_token_id),
        ):
            for token_id in token_ids if isinstance(token_ids, list) else [token_ids]:
                if token_id is not None and (
                    not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size
                ):
                    raise ValueError(
                        f"{name}: `{token_name}` must be None or a token id in [0, {vocab_size}), got {token_ids!r}."
                    )
        if block_type == "hierarchical" and (qk_norm or attention_dropout):
            raise ValueError(
                f"{name}: the hierarchical block has no query/key normalisation or attention dropout; got "
                f"`qk_norm={qk_norm}`, `attention_dropout={attention_dropout}`."
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.use_absolute_position_embeddings = use_absolute_position_embeddings
        self.alibi_num_heads = alibi_num_heads
        self.use_rotary = use_rotary
        self.rotary_dim = rotary_dim
        self.rope_theta = rope_theta
        self.use_xpos = use_xpos
        self.xpos_scale_base = xpos_scale_base
        self.xpos_offset = xpos_offset
        self.rotate_values = rotate_values
        self.qk_norm = qk_norm
        self.qk_norm_scale = qk_norm_scale
        self.add_cross_attention = add_cross_attention
        self.cross_attention_hidden_size = cross_attention_hidden_size
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.block_type = block_type
        self.window_size = window_size
        self.compress_factor = compress_factor
        self.stride = stride
        self.num_key_value_heads = block_key_value_heads
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        # The cache layout the hierarchical block needs, read by `DynamicCache(config=...)`/`StaticCache`; derived,
        # so a saved value must agree with the block options.
        layout = {}
        if block_type == "hierarchical":
            layer_type, sliding_window, num_states = hierarchical_cache_layout(window_size, compress_factor, stride)
            layout = {
                "layer_types": [layer_type] * num_hidden_layers,
                "sliding_window": sliding_window,
                "number_of_conv_states": num_states,
            }
        for key in ("layer_types", "sliding_window", "number_of_conv_states"):
            given = kwargs.pop(key, None)
            if given is not None and given != layout.get(key):
                raise ValueError(
                    f"{name}: `{key}={given!r}` does not match the block options, which need {layout.get(key)!r}."
                )
            if key in layout:
                setattr(self, key, layout[key])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """
        The tensor parallel plan of `PalmETextModel` for this block type, with cross-attention if the layers have it.
        The standard layer's self-attention is split only without ALiBi: `PalmETextModel` folds the ALiBi bias of
        every head into the one mask all layers share, which a rank holding some of the heads could not use.
        """
        plan = dict(self.block_tp_plans[self.block_type])
        if self.block_type == "standard" and not self.alibi_num_heads:
            plan.update(self.standard_attention_tp_plan)
        if self.add_cross_attention:
            plan.update(self.cross_attention_tp_plan)
        return plan


BLOCK_TYPES = ("standard", "parallel", "hierarchical")


def hierarchical_cache_layout(window_size: int | None, compress_factor: int, stride: int) -> tuple[str, int | None, int]:
    """
    The cache layer a `HierarchicalBlock` needs: its Transformers cache layer type (`"hybrid"`: growing keys/values
    plus token-shift states; `"hybrid_sliding"`: keys/values of the last `sliding_window` tokens plus token-shift
    states; `"conv"`: token-shift state only, for `window_size=0`), its sliding window, and its number of token-shift
    states (one before the attention, one before the feed-forward).
    """
    if window_size == 0:
        return "conv", None, 1
    if window_size is None:
        return "hybrid", None, 2
    return "hybrid_sliding", window_size * (compress_factor // stride) + 1, 2


def _check_block_options(
    name, block_type, hidden_size, intermediate_size, head_dim, alibi_num_heads, use_rotary, rotary_dim,
    rotate_values, window_size, compress_factor, stride,
):
    """The options each decoder block supports; an option a block would ignore is an error."""
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"{name}: `block_type` must be one of {BLOCK_TYPES}, got {block_type!r}.")
    if block_type == "standard":
        if window_size is not None or compress_factor != 1 or stride != 1:
            raise ValueError(
                f"{name}: `window_size`, `compress_factor` and `stride` are options of `block_type='hierarchical'`."
            )
        return
    if alibi_num_heads:
        raise ValueError(
            f"{name}: ALiBi is part of the standard layer; `block_type={block_type!r}` needs `alibi_num_heads=0`, "
            f"got {alibi_num_heads}."
        )
    if not use_rotary or rotary_dim != head_dim or rotate_values:
        raise ValueError(
            f"{name}: `block_type={block_type!r}` rotates the whole head of queries and keys: it needs "
            f"`use_rotary=True`, `rotary_dim=head_dim` ({head_dim}) and `rotate_values=False`."
        )
    if block_type == "parallel":
        if intermediate_size % hidden_size != 0:
            raise ValueError(
                f"{name}: the parallel block's feed-forward width is a multiple of `hidden_size` ({hidden_size}); "
                f"got `intermediate_size={intermediate_size}`."
            )
        if window_size is not None or compress_factor != 1 or stride != 1:
            raise ValueError(
                f"{name}: `window_size`, `compress_factor` and `stride` are options of `block_type='hierarchical'`."
            )
        return
    if window_size is not None and (not isinstance(window_size, int) or window_size < 0):
        raise ValueError(f"{name}: `window_size` must be None (full attention) or an integer >= 0, got {window_size!r}.")
    check_positive_ints(name, compress_factor=compress_factor, stride=stride)
    if compress_factor & (compress_factor - 1):
        raise ValueError(f"{name}: `compress_factor` must be a power of two, got {compress_factor}.")
    if stride > compress_factor or compress_factor % stride:
        raise ValueError(f"{name}: `stride` ({stride}) must be a power of two dividing `compress_factor` ({compress_factor}).")


# The reference `zeta.models.PalmE` constructor arguments, with its defaults.
ZETA_PALME_DEFAULTS = {
    "image_size": 256,
    "patch_size": 32,
    "encoder_dim": 512,
    "encoder_depth": 6,
    "encoder_heads": 8,
    "num_tokens": 20000,
    "max_seq_len": 1024,
    "decoder_dim": 512,
    "decoder_depth": 6,
    "decoder_heads": 8,
    "alibi_num_heads": 4,
    "use_abs_pos_emb": False,
    "cross_attend": True,
    "alibi_pos_bias": True,
    "rotary_xpos": True,
    "attn_flash": True,
    "qk_norm": True,
}

VISION_INTEGRATIONS = ("cross_attention", "prefix")


class PalmEConfig(PreTrainedConfig):
    r"""
    Configuration of a PalmE model: `vision_config` ([`PalmEVisionConfig`]) and `text_config` ([`PalmETextConfig`]).

    The reference's flat keyword arguments are accepted too, with the reference's defaults, and are mapped into the
    sub-configurations, so `PalmEConfig(encoder_dim=1024, decoder_depth=8)` builds what
    `zeta.models.PalmE(encoder_dim=1024, decoder_depth=8)` builds: `image_size`, `patch_size`, `encoder_dim`,
    `encoder_depth`, `encoder_heads`, `num_tokens`, `max_seq_len`, `decoder_dim`, `decoder_depth`, `decoder_heads`,
    `alibi_num_heads`, `use_abs_pos_emb`, `cross_attend`, `alibi_pos_bias`, `rotary_xpos`, `attn_flash` (selects the
    `"sdpa"` attention implementation, `"eager"` when False) and `qk_norm`. A flat argument overrides the matching
    field of a sub-configuration given alongside it.

    Args:
        vision_config (`dict` or [`PalmEVisionConfig`], *optional*): the image encoder.
        text_config (`dict` or [`PalmETextConfig`], *optional*): the text decoder.
        block_type (`str`, *optional*): shortcut for `text_config.block_type` (`"standard"`, `"parallel"`,
            `"hierarchical"`); with a block other than the standard one, ALiBi is off unless asked for.
        vision_integration (`str`, defaults to `"cross_attention"`): how the image reaches the text.
            `"cross_attention"`: every decoder layer cross-attends to the image features (the reference).
            `"prefix"`: as in the PaLM-E paper, the image features are projected to the decoder width and replace the
            `image_token_id` placeholder tokens of `input_ids` (one placeholder per image feature).
        image_token_id (`int`, *optional*): the placeholder token of `"prefix"` integration, the last token of the
            vocabulary by default.
        num_latents (`int`, *optional*): when set, a Perceiver resampler (learned latents cross-attending to the
            patch features, `resampler_depth` [`PerceiverLayer`]s) turns each image into `num_latents` features
            before they reach the text, with either integration.
        resampler_depth (`int`, defaults to 2): layers of the Perceiver resampler.
    """

    model_type = "palme"
    sub_configs = {"vision_config": PalmEVisionConfig, "text_config": PalmETextConfig}

    def __init__(
        self,
        vision_config: dict | PalmEVisionConfig | None = None,
        text_config: dict | PalmETextConfig | None = None,
        vision_integration: str = "cross_attention",
        image_token_id: int | None = None,
        num_latents: int | None = None,
        resampler_depth: int = 2,
        block_type: str | None = None,
        **kwargs,
    ):
        flat = {key: kwargs.pop(key) for key in list(kwargs) if key in ZETA_PALME_DEFAULTS}
        if isinstance(vision_config, PalmEVisionConfig):
            vision_config = vision_config.to_dict()
        if isinstance(text_config, PalmETextConfig):
            text_config = text_config.to_dict()
        vision_kwargs = dict(vision_config or {})
        text_kwargs = dict(text_config or {})
        is_new = vision_config is None and text_config is None
        if flat or is_new:
            # Build from the reference's arguments: its defaults for everything not given.
            reference = {**ZETA_PALME_DEFAULTS, **flat} if is_new else flat
            vision_kwargs, text_kwargs, attn_implementation = _map_zeta_arguments(reference, vision_kwargs, text_kwargs)
            # Only an explicit `attn_flash` requests a kernel; otherwise Transformers picks one (sdpa where available)
            # and `set_attn_implementation` / `from_pretrained(attn_implementation=...)` change it.
            if "attn_flash" in flat and kwargs.get("attn_implementation") is None:
                kwargs["attn_implementation"] = attn_implementation
        if block_type is not None:
            text_kwargs["block_type"] = block_type
            if block_type != "standard" and "alibi_num_heads" not in flat and "alibi_pos_bias" not in flat:
                text_kwargs["alibi_num_heads"] = 0
            if block_type == "hierarchical" and "qk_norm" not in flat:
                text_kwargs["qk_norm"] = False
        if "cross_attend" in flat:
            flat_integration = "cross_attention" if flat["cross_attend"] else "prefix"
            if vision_integration != "cross_attention" and vision_integration != flat_integration:
                raise ValueError(
                    f"`cross_attend={flat['cross_attend']}` contradicts `vision_integration={vision_integration!r}`."
                )
            vision_integration = flat_integration
        if vision_integration not in VISION_INTEGRATIONS:
            raise ValueError(
                f"`vision_integration` must be one of {VISION_INTEGRATIONS}, got {vision_integration!r}."
            )
        if num_latents is not None:
            check_positive_ints(type(self).__name__, num_latents=num_latents, resampler_depth=resampler_depth)
        self.num_latents = num_latents
        self.resampler_depth = resampler_depth
        self.vision_config = PalmEVisionConfig(**vision_kwargs)
        text_kwargs["add_cross_attention"] = vision_integration == "cross_attention"
        text_kwargs.setdefault("cross_attention_hidden_size", self.vision_config.hidden_size)
        self.text_config = PalmETextConfig(**text_kwargs)
        self.vision_integration = vision_integration
        if vision_integration == "prefix" and image_token_id is None:
            image_token_id = self.text_config.vocab_size - 1
        if image_token_id is not None and not 0 <= image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"`image_token_id` ({image_token_id}) must be a token of the vocabulary "
                f"(0 to {self.text_config.vocab_size - 1})."
            )
        self.image_token_id = image_token_id
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        """How many image features the text receives: one per latent with a resampler, else one per patch."""
        return self.num_latents if self.num_latents is not None else self.vision_config.num_patches


def _map_zeta_arguments(reference: dict, vision_kwargs: dict, text_kwargs: dict) -> tuple[dict, dict, str | None]:
    """Maps the reference `PalmE` keyword arguments onto the sub-configurations' keyword arguments and the attention
    implementation (`cross_attend` is handled by the caller)."""
    vision_keys = {
        "image_size": "image_size",
        "patch_size": "patch_size",
        "encoder_dim": "hidden_size",
        "encoder_depth": "num_hidden_layers",
        "encoder_heads": "num_attention_heads",
    }
    text_keys = {
        "num_tokens": "vocab_size",
        "max_seq_len": "max_position_embeddings",
        "decoder_dim": "hidden_size",
        "decoder_depth": "num_hidden_layers",
        "decoder_heads": "num_attention_heads",
        "qk_norm": "qk_norm",
    }
    vision_kwargs = dict(vision_kwargs)
    text_kwargs = dict(text_kwargs)
    for zeta_key, key in vision_keys.items():
        if zeta_key in reference:
            vision_kwargs[key] = reference[zeta_key]
    for zeta_key, key in text_keys.items():
        if zeta_key in reference:
            text_kwargs[key] = reference[zeta_key]
    if "encoder_dim" in reference:
        text_kwargs["cross_attention_hidden_size"] = reference["encoder_dim"]
    if "rotary_xpos" in reference:
        text_kwargs["use_rotary"] = text_kwargs["use_xpos"] = bool(reference["rotary_xpos"])
    if reference.get("alibi_pos_bias") is False:
        text_kwargs["alibi_num_heads"] = 0
    elif "alibi_num_heads" in reference:
        text_kwargs["alibi_num_heads"] = reference["alibi_num_heads"]
    elif reference.get("alibi_pos_bias") and not text_kwargs.get("alibi_num_heads"):
        text_kwargs["alibi_num_heads"] = ZETA_PALME_DEFAULTS["alibi_num_heads"]
    if "use_abs_pos_emb" in reference:
        # The reference adds absolute positions only when the decoder has no rotary embedding.
        use_rotary = text_kwargs.get("use_rotary", True)
        text_kwargs["use_absolute_position_embeddings"] = bool(reference["use_abs_pos_emb"]) and not use_rotary
    attn_implementation = None
    if "attn_flash" in reference:
        attn_implementation = "sdpa" if reference["attn_flash"] else "eager"
    return vision_kwargs, text_kwargs, attn_implementation


__all__ = ["PalmEConfig", "PalmETextConfig", "PalmEVisionConfig"]
