"""PalmE model configuration: a ViT image encoder feeding a causal text decoder."""

import contextlib
import contextvars
import dataclasses
import difflib
from collections.abc import Callable, Iterator
from typing import Literal, get_args, get_origin

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import RopeParameters
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.utils import logging

from .compat_palme import NewestNamesPreTrainedConfig

logger = logging.get_logger(__name__)


def check_positive_ints(owner: str | None = None, **values):
    """Raises a `ValueError` for any value that is not a positive integer, naming it (and its owner, if given)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            where = f"{owner}: " if owner else ""
            raise ValueError(f"{where}`{name}` must be a positive integer, got {value!r}.")


def check_bools(owner: str, **values):
    """Raises a `ValueError` naming the first value that is not `True` or `False` (a string such as `"false"`)."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{owner}: `{name}` must be True or False, got {value!r}.")


def check_positive_numbers(owner: str, **values):
    """Raises a `ValueError` naming the first value that is not a positive `int` or `float`."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{owner}: `{name}` must be a positive number, got {value!r}.")


def check_dropouts(owner: str, **values):
    """Raises a `ValueError` naming the first value that is not a dropout probability, in [0, 1)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{owner}: `{name}` must be a dropout probability in [0, 1), got {value!r}.")


def check_activations(owner: str, **values):
    """Raises a `ValueError` naming the first value that is not the name of one of Transformers' activations."""
    for name, value in values.items():
        if value not in ACT2FN:
            raise ValueError(
                f"{owner}: `{name}` must be one of Transformers' activations {sorted(ACT2FN)}, got {value!r}."
            )


def option(default, check: Callable[..., None]):
    """A declared option whose value must pass `check(owner, **{name: value})`, one of the `check_*` above; `None`, for
    a `None` default, stands for a default that `__post_init__` derives from options already checked."""
    return dataclasses.field(default=default, metadata={"check": check})


def check_declared_options(config: PreTrainedConfig):
    """Checks each declared option of `config` with the check `option` gave it, a `Literal` one against its type."""
    owner = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None and field.default is None:
            continue
        if get_origin(field.type) is Literal and value not in get_args(field.type):
            raise ValueError(f"{owner}: `{field.name}` must be one of {get_args(field.type)}, got {value!r}.")
        if "check" in field.metadata:
            field.metadata["check"](owner, **{field.name: value})


class SavedConfigReading:
    """
    Whether a config is being built from saved data (`from_dict`, which `from_pretrained` and `AutoConfig` use, and
    `from_json_file`): keys it does not know are then kept, not refused. A context variable, in an object that pickles
    as a fresh one: cloudpickle copies the config classes of a saved folder's code by value with the globals they
    read (vLLM sends configs to its workers so), and a context variable itself cannot be pickled.
    """

    def __init__(self):
        self.flag = contextvars.ContextVar("reading_saved_config", default=False)

    def __reduce__(self):
        return (type(self), ())


READING_SAVED_CONFIG = SavedConfigReading()


@contextlib.contextmanager
def reading_saved_config(reading: bool = True) -> Iterator[None]:
    """Marks the configs built inside as read from saved data when `reading` (else leaves the mark as it is)."""
    token = READING_SAVED_CONFIG.flag.set(True) if reading else None
    try:
        yield
    finally:
        if token is not None:
            READING_SAVED_CONFIG.flag.reset(token)


# Keys of a config.json that `PreTrainedConfig.__post_init__` keeps as attributes, which Transformers reads and writes
# elsewhere: the class's `model_type`, the Auto classes of custom code and a quantizer's settings.
TRANSFORMERS_SAVED_KEYS = {"model_type", "auto_map", "quantization_config"}


def check_known_keys(config: PreTrainedConfig, kwargs: dict):
    """
    Refuses a keyword argument that neither `config`'s class nor Transformers knows, naming the closest option: a
    misspelt option would otherwise be kept as an attribute and silently ignored. `kwargs` are those that are not
    declared fields; `PreTrainedConfig.__post_init__` has taken the ones Transformers reads (`attn_implementation`,
    `torch_dtype`, generation parameters, ...) and kept the others as attributes, unknown but for Transformers'
    bookkeeping (`_name_or_path`) and `TRANSFORMERS_SAVED_KEYS`.

    Strict where a person types, lenient where data is read: while a saved config is read (`READING_SAVED_CONFIG`), an
    unknown key (a tool's, a later palme-hf's, or set as `config.key = value`) stays an attribute, saved again, with a
    warning naming it and the closest option.
    """
    options = [field.name for field in dataclasses.fields(config)]
    if hasattr(config, "rope_parameters"):
        options.append("rope_theta")  # the flat key Transformers maps into `rope_parameters`
    reading = READING_SAVED_CONFIG.flag.get()
    for key in kwargs:
        if key not in vars(config) or key.startswith("_") or key in TRANSFORMERS_SAVED_KEYS:
            continue
        closest = difflib.get_close_matches(key, options, n=1)
        if not reading:
            hint = f" Did you mean `{closest[0]}`?" if closest else ""
            raise ValueError(f"{type(config).__name__} has no option `{key}`.{hint}")
        hint = f" (the closest option is `{closest[0]}`)" if closest else ""
        logger.warning_once(
            f"{type(config).__name__}: the saved key `{key}` is not one of its options{hint}; it is kept as an "
            "attribute and saved again, but PalmE does not read it."
        )


def check_saved_properties(config: PreTrainedConfig, kwargs: dict):
    """
    Takes out of `kwargs` the saved values of `config`'s computed properties (`num_patches`, `num_image_tokens`,
    `vocab_size` of a [`PalmEConfig`]): each must agree with what the options give, since a config that contradicts
    itself describes two models; a contradiction is a `ValueError` naming both values. Call it once the options are
    set.
    """
    properties = [key for key in kwargs if isinstance(getattr(type(config), key, None), property)]
    for key in [key for key in properties if not hasattr(PreTrainedConfig, key)]:
        saved, computed = kwargs.pop(key), getattr(config, key)
        if saved != computed:
            raise ValueError(
                f"{type(config).__name__}: the saved `{key}={saved!r}` contradicts its options, which give "
                f"{computed!r}: correct or remove `{key}` in the config.json."
            )


class SavedConfigMixin:
    """
    What PalmE's configs add to `PreTrainedConfig`: keyword arguments that are not declared options are refused with
    the closest option named (`check_known_keys`), except in saved configs, read leniently: `from_dict` (behind
    `from_pretrained`, `AutoConfig` and `trust_remote_code`) and `from_json_file` keep unknown keys with a warning.
    """

    def __post_init__(self, **kwargs):
        check_saved_properties(self, kwargs)
        super().__post_init__(**kwargs)
        check_known_keys(self, kwargs)
        # Transformers' own checks (`validate_*`), which `@strict` runs once its configs are built. PalmE's configs are
        # not `@strict`: its type checks of the fields would raise before the `ValueError`s naming config and option.
        self.validate()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """The config a saved `config_dict` describes; keys it does not know are kept, with one warning each."""
        with reading_saved_config():
            return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_json_file(cls, json_file):
        """The config saved in `json_file`; keys it does not know are kept, with one warning each."""
        with reading_saved_config():
            return super().from_json_file(json_file)


class PalmEVisionConfig(SavedConfigMixin, NewestNamesPreTrainedConfig):
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
        patch_norm_eps (`float`, *optional*): epsilon of the LayerNorm over each raw flattened patch,
            `layer_norm_eps` by default (the reference's 1e-5). That LayerNorm divides a patch by its standard
            deviation, so on a flat patch (a uniform background has variance 0) it scales any perturbation, sensor
            noise or JPEG ringing of a pixel value or two, up to unit size. An epsilon near the variance of the
            patches that carry content (about 0.1 for [0, 1] images with saturated colours) keeps a nearly flat patch
            nearly zero while content patches are normalised almost as before.
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

    image_size: int = option(256, check_positive_ints)
    patch_size: int = option(32, check_positive_ints)
    num_channels: int = option(3, check_positive_ints)
    hidden_size: int = option(512, check_positive_ints)
    num_hidden_layers: int = option(6, check_positive_ints)
    num_attention_heads: int = option(8, check_positive_ints)
    head_dim: int = option(64, check_positive_ints)
    intermediate_size: int | None = option(None, check_positive_ints)
    hidden_act: str = option("gelu", check_activations)
    layer_norm_eps: float = option(1e-5, check_positive_numbers)
    patch_norm_eps: float | None = option(None, check_positive_numbers)
    attention_dropout: float = option(0.0, check_dropouts)
    initializer_range: float = option(0.02, check_positive_numbers)

    def __post_init__(self, **kwargs):
        check_declared_options(self)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.patch_norm_eps is None:
            self.patch_norm_eps = self.layer_norm_eps
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"{type(self).__name__}: `image_size` ({self.image_size}) must be divisible by `patch_size` "
                f"({self.patch_size})."
            )
        super().__post_init__(**kwargs)

    @property
    def num_patches(self) -> int:
        """Patches of one image, `(image_size // patch_size) ** 2`: the image features the encoder returns."""
        return (self.image_size // self.patch_size) ** 2


class PalmETextConfig(SavedConfigMixin, NewestNamesPreTrainedConfig):
    r"""
    Configuration of the PalmE text decoder. Each layer is a block (`block_type`), followed, with
    `add_cross_attention`, by pre-norm cross-attention to the image features; a final LayerNorm and a biased
    language-model head follow, as in the reference x-transformers `Decoder`.

    Every option is honoured by every block type that accepts it; an option a block type does not have is refused
    with a `ValueError` (README.md has the table). Options left at `None` take the block type's own default.

    Args:
        vocab_size (`int`, defaults to 20000): number of tokens.
        hidden_size (`int`, defaults to 512): width of the decoder.
        num_hidden_layers (`int`, defaults to 6): number of decoder layers.
        num_attention_heads (`int`, defaults to 8): attention heads per layer.
        head_dim (`int`, defaults to 64): width of each head.
        intermediate_size (`int`, *optional*): feed-forward width, `4 * hidden_size` by default.
        hidden_act (`str`, *optional*): feed-forward activation: `"gelu"` (standard, hierarchical), or the gate's
            activation of the parallel block's SwiGLU, `"silu"`.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm (the hierarchical block's RMS norms
            have none).
        max_position_embeddings (`int`, defaults to 1024): longest sequence with absolute positions; the centre of
            the xpos scale by default.
        use_absolute_position_embeddings (`bool`, defaults to `False`): add learned absolute positions (scaled by
            `hidden_size ** -0.5`) to the token embeddings. Sequences are then limited to `max_position_embeddings`.
        alibi_num_heads (`int`, *optional*): ALiBi bias on the first `alibi_num_heads` self-attention heads of the
            standard layer, 4 by default (0 turns ALiBi off); the blocks have none.
        use_rotary (`bool`, defaults to `True`): rotary embeddings in self-attention (the blocks always rotate).
        rotary_dim (`int`, *optional*): number of features of each head that are rotated: `max(head_dim // 2, 32)`
            (at most `head_dim`) in the standard layer, the whole head in the blocks.
        rope_parameters (`RopeParameters`, *optional*): the rotary embedding, `{"rope_type": "default", "rope_theta":
            10000.0}` by default: PalmE's rotary embedding has no scaling, `rope_theta` is its base. The keyword
            `rope_theta=` (the flat key of earlier configs, read from their config.json too) sets the base.
        use_xpos (`bool`, *optional*): xpos length-extrapolation scaling of the rotated features; on by default,
            except in the hierarchical block's window attention (as in its reference).
        xpos_scale_base (`int`, defaults to 512): xpos scale base.
        xpos_offset (`int`, *optional*): the position at which the xpos scale is 1, `max_position_embeddings // 2` by
            default. It cancels in query-key products; it matters only with `rotate_values`.
        rotate_values (`bool`, defaults to `False`): standard layer only: also rotate (and xpos-scale, with the key
            scale) the values, as the zeta reference does. Only the zeta converter turns this on.
        qk_norm (`bool`, defaults to `False`): l2-normalise queries and keys per head, with learned per-feature gains,
            and use `qk_norm_scale` as the attention scale.
        qk_norm_scale (`float`, defaults to 10.0): attention scale with `qk_norm`.
        add_cross_attention (`bool`, defaults to `True`): cross-attention to image features in every layer. Inside a
            [`PalmEConfig`] it follows `vision_integration`.
        cross_attention_hidden_size (`int`, *optional*): width of the image features, `hidden_size` by default.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): standard deviation of the weight initialisation.
        block_type (`str`, defaults to `"standard"`): the decoder layer.
            `"standard"`: the reference layer (ALiBi, partial rotary/xpos, GELU feed-forward).
            `"parallel"`: PaLM's parallel block ([`ParallelTransformerBlock`]): multi-query attention with rotary/xpos
            over the whole head (query/key l2-normalisation with `qk_norm`) in parallel with a SwiGLU feed-forward of
            width `intermediate_size`.
            `"hierarchical"`: [`HierarchicalBlock`]: token shift, full or local-window (`window_size`) attention,
            axial grouping by `compress_factor // stride`, a feed-forward of width `intermediate_size`.
        window_size (`int`, *optional*): local attention window of the hierarchical block (`None`: full attention).
        compress_factor (`int`, defaults to 1): compression of the hierarchical block, a power of two.
        stride (`int`, defaults to 1): stride of the hierarchical block.
        num_key_value_heads (`int`, *optional*): key/value heads of self-attention, set by the block type: 1 for the
            parallel block's multi-query attention, `num_attention_heads` otherwise. Read by caches and
            tensor-parallel plans; a given value must agree.
        pad_token_id (`int`, *optional*): the padding token, carried into the generation config.
        bos_token_id (`int`, *optional*): the beginning-of-sequence token, carried into the generation config.
        eos_token_id (`int` or `list[int]`, *optional*): the end-of-sequence token(s): `generate()` stops there.
        tie_word_embeddings (`bool`, defaults to `False`): share the token embedding matrix with the LM head.
    """

    model_type = "palme_text"
    base_config_key = "text_config"
    # Tensor parallel plans for base model `PalmETextModel`, put together in `__post_init__`: the blocks share module
    # names, not head layouts.
    block_tp_plans = {
        "standard": {
            "layers.*.mlp.fc1": "colwise",
            "layers.*.mlp.fc2": "rowwise",
        },
        # Multi-query attention: the single key/value head cannot be split, every rank keeps `k_proj` and `v_proj`.
        "parallel": {
            "layers.*.self_attn.q_proj": "colwise",
            "layers.*.self_attn.o_proj": "rowwise",
            "layers.*.mlp.gate_proj": "colwise",
            "layers.*.mlp.up_proj": "colwise",
            "layers.*.mlp.down_proj": "rowwise",
        },
        "hierarchical": {
            "layers.*.self_attn.q_proj": "colwise",
            "layers.*.self_attn.k_proj": "colwise",
            "layers.*.self_attn.v_proj": "colwise",
            "layers.*.self_attn.o_proj": "rowwise",
            "layers.*.mlp.fc1": "colwise",
            "layers.*.mlp.fc2": "rowwise",
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

    vocab_size: int = option(20000, check_positive_ints)
    hidden_size: int = option(512, check_positive_ints)
    num_hidden_layers: int = option(6, check_positive_ints)
    num_attention_heads: int = option(8, check_positive_ints)
    head_dim: int = option(64, check_positive_ints)
    intermediate_size: int | None = option(None, check_positive_ints)
    hidden_act: str | None = option(None, check_activations)
    layer_norm_eps: float = option(1e-5, check_positive_numbers)
    max_position_embeddings: int = option(1024, check_positive_ints)
    use_absolute_position_embeddings: bool = option(False, check_bools)
    alibi_num_heads: int | None = None
    use_rotary: bool = option(True, check_bools)
    rotary_dim: int | None = option(None, check_positive_ints)
    rope_parameters: RopeParameters | dict | None = None
    use_xpos: bool | None = option(None, check_bools)
    xpos_scale_base: int = option(512, check_positive_numbers)
    xpos_offset: int | None = None
    rotate_values: bool = option(False, check_bools)
    qk_norm: bool = option(False, check_bools)
    qk_norm_scale: float = option(10.0, check_positive_numbers)
    add_cross_attention: bool = option(True, check_bools)
    cross_attention_hidden_size: int | None = option(None, check_positive_ints)
    attention_dropout: float = option(0.0, check_dropouts)
    initializer_range: float = option(0.02, check_positive_numbers)
    use_cache: bool = option(True, check_bools)
    tie_word_embeddings: bool = option(False, check_bools)
    block_type: Literal["standard", "parallel", "hierarchical"] = "standard"
    window_size: int | None = None
    compress_factor: int = 1
    stride: int = 1
    num_key_value_heads: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        name = type(self).__name__
        check_declared_options(self)
        # The block type's own defaults for the options left at None
        is_standard = self.block_type == "standard"
        if self.hidden_act is None:
            self.hidden_act = "silu" if self.block_type == "parallel" else "gelu"
        if self.alibi_num_heads is None:
            self.alibi_num_heads = 4 if is_standard else 0
        if self.rotary_dim is None:
            self.rotary_dim = min(self.head_dim, max(self.head_dim // 2, 32)) if is_standard else self.head_dim
        if self.use_xpos is None:
            self.use_xpos = self.use_rotary and not (
                self.block_type == "hierarchical" and self.window_size is not None
            )
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.cross_attention_hidden_size is None:
            self.cross_attention_hidden_size = self.hidden_size
        if self.xpos_offset is None:
            self.xpos_offset = self.max_position_embeddings // 2
        self.rope_parameters = rope_parameters_from(name, self.rope_parameters, kwargs.pop("rope_theta", None))

        if not isinstance(self.xpos_offset, int) or isinstance(self.xpos_offset, bool):
            raise ValueError(f"{name}: `xpos_offset` must be an integer position, got {self.xpos_offset!r}.")
        if not isinstance(self.alibi_num_heads, int) or not 0 <= self.alibi_num_heads <= self.num_attention_heads:
            raise ValueError(
                f"{name}: `alibi_num_heads` ({self.alibi_num_heads!r}) must be between 0 and `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.use_rotary and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(
                f"{name}: `rotary_dim` ({self.rotary_dim}) must be even, positive and at most `head_dim` "
                f"({self.head_dim})."
            )
        for option_name in ("use_xpos", "rotate_values"):
            if getattr(self, option_name) and not self.use_rotary:
                raise ValueError(f"{name}: `{option_name}=True` needs `use_rotary=True`.")
        check_block_options(self)
        block_key_value_heads = 1 if self.block_type == "parallel" else self.num_attention_heads
        if self.num_key_value_heads is not None and self.num_key_value_heads != block_key_value_heads:
            raise ValueError(
                f"{name}: `block_type={self.block_type!r}` has {block_key_value_heads} key/value heads, got "
                f"`num_key_value_heads={self.num_key_value_heads}`."
            )
        self.num_key_value_heads = block_key_value_heads
        for token_name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            token_ids = getattr(self, token_name)
            for token_id in token_ids if isinstance(token_ids, list) else [token_ids]:
                if token_id is not None and (
                    not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < self.vocab_size
                ):
                    raise ValueError(
                        f"{name}: `{token_name}` must be None or a token id in [0, {self.vocab_size}), got "
                        f"{token_ids!r}."
                    )

        # The cache layout the hierarchical block needs, read by `DynamicCache(config=...)`/`StaticCache`; derived,
        # so a saved value must agree with the block options.
        layout = {}
        if self.block_type == "hierarchical":
            layer_type, layout["sliding_window"], layout["number_of_conv_states"] = hierarchical_cache_layout(
                self.window_size, self.compress_factor, self.stride
            )
            layout["layer_types"] = [layer_type] * self.num_hidden_layers
        for key in ("layer_types", "sliding_window", "number_of_conv_states"):
            given = kwargs.pop(key, None)
            if given is not None and given != layout.get(key):
                raise ValueError(
                    f"{name}: `{key}={given!r}` does not match the block options, which need {layout.get(key)!r}."
                )
            if key in layout:
                setattr(self, key, layout[key])

        # The tensor parallel plan of `PalmETextModel` for this block type, with cross-attention if the layers have it
        # (Transformers leaves it out of config.json). The standard layer's self-attention is split only without ALiBi:
        # `PalmETextModel` folds the ALiBi bias of every head into the one mask all layers share, which a rank holding
        # some of the heads could not use.
        self.base_model_tp_plan = dict(self.block_tp_plans[self.block_type])
        if is_standard and not self.alibi_num_heads:
            self.base_model_tp_plan.update(self.standard_attention_tp_plan)
        if self.add_cross_attention:
            self.base_model_tp_plan.update(self.cross_attention_tp_plan)
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """The text config a saved `config_dict` describes, upgraded first if palme-hf 0.1.0 saved it."""
        return super().from_dict(upgrade_saved_text_config(config_dict), **kwargs)


def rope_parameters_from(name: str, rope_parameters: dict | None, rope_theta: float | None) -> dict:
    """
    A text config's `rope_parameters`, `{"rope_type": "default", "rope_theta": ...}`, from those given and the flat
    `rope_theta` of earlier configs: PalmE's rotary embedding (with xpos) has no scaling, so any other RoPE type or key
    is refused, as are two different bases and a base that is not a positive number.
    """
    default = {"rope_type": "default", "rope_theta": 10000.0 if rope_theta is None else rope_theta}
    if rope_parameters is not None:
        if (
            not isinstance(rope_parameters, dict)
            or not set(rope_parameters) <= set(default)
            or rope_parameters.get("rope_type", "default") != "default"
        ):
            raise ValueError(
                f"{name}: `rope_parameters` must be {{'rope_type': 'default', 'rope_theta': ...}}: PalmE's rotary "
                f"embedding has no scaling (`rotary_dim` sets how many features rotate), got {rope_parameters!r}."
            )
        if rope_theta is not None and rope_parameters.get("rope_theta", rope_theta) != rope_theta:
            raise ValueError(f"{name}: `rope_theta={rope_theta!r}` contradicts `rope_parameters={rope_parameters!r}`.")
        default.update(rope_parameters)
    check_positive_numbers(name, rope_theta=default["rope_theta"])
    return default


def hierarchical_cache_layout(
    window_size: int | None, compress_factor: int, stride: int
) -> tuple[str, int | None, int]:
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


# The options only some block types have, with the value meaning "not used" (for `use_rotary`: the blocks always
# rotate). README.md's option table lists the same.
BLOCK_ONLY_OPTIONS = {
    "alibi_num_heads": ({"standard"}, 0),
    "rotate_values": ({"standard"}, False),
    "use_rotary": ({"standard"}, True),
    "qk_norm": ({"standard", "parallel"}, False),
    "attention_dropout": ({"standard", "parallel"}, 0.0),
    "window_size": ({"hierarchical"}, None),
    "compress_factor": ({"hierarchical"}, 1),
    "stride": ({"hierarchical"}, 1),
}


def check_block_options(config: "PalmETextConfig"):
    """Refuses an option that the text config's `block_type` does not have (it would be ignored), and invalid block
    geometry."""
    name, block_type = type(config).__name__, config.block_type
    for option_name, (block_types, unused) in BLOCK_ONLY_OPTIONS.items():
        if block_type not in block_types and getattr(config, option_name) != unused:
            raise ValueError(
                f"{name}: `block_type={block_type!r}` has no `{option_name}` (only {sorted(block_types)} do): it must "
                f"be {unused!r}, got {getattr(config, option_name)!r}."
            )
    if block_type != "standard" and config.rotary_dim != config.head_dim:
        raise ValueError(
            f"{name}: `block_type={block_type!r}` rotates the whole head: `rotary_dim` must be `head_dim` "
            f"({config.head_dim}), got {config.rotary_dim}."
        )
    if block_type == "parallel" and config.intermediate_size % config.hidden_size != 0:
        raise ValueError(
            f"{name}: the parallel block's feed-forward width is a multiple of `hidden_size` ({config.hidden_size}); "
            f"got `intermediate_size={config.intermediate_size}`."
        )
    if block_type == "hierarchical":
        window_size, compress_factor, stride = config.window_size, config.compress_factor, config.stride
        if window_size is not None and (
            isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0
        ):
            raise ValueError(
                f"{name}: `window_size` must be None (full attention) or an integer >= 0, got {window_size!r}."
            )
        check_positive_ints(name, compress_factor=compress_factor, stride=stride)
        if compress_factor & (compress_factor - 1):
            raise ValueError(f"{name}: `compress_factor` must be a power of two, got {compress_factor}.")
        if stride > compress_factor or compress_factor % stride:
            raise ValueError(
                f"{name}: `stride` ({stride}) must be a power of two dividing `compress_factor` ({compress_factor})."
            )


def upgrade_saved_text_config(config_dict: dict) -> dict:
    """
    Maps a text config saved by palme-hf 0.1.0 onto today's options, so that the model it describes computes what it
    computed then. 0.1.0 wrote no `num_key_value_heads`, and saved options its blocks ignored: `hidden_act="gelu"` for
    the parallel block (which always ran SwiGLU's silu) and `use_xpos=True` for the hierarchical block's window
    attention (which had no xpos).
    """
    if "num_key_value_heads" in config_dict or "chunk_size_feed_forward" not in config_dict:
        return config_dict  # today's, or written by hand
    config_dict = dict(config_dict)
    if config_dict.get("block_type") == "parallel":
        config_dict["hidden_act"] = "silu"
    if config_dict.get("block_type") == "hierarchical" and config_dict.get("window_size") is not None:
        config_dict["use_xpos"] = False
    return config_dict


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


# The largest size a zeta keyword argument may have: tensor dimensions and positions beyond int32 are not models.
MAX_ZETA_SIZE = 2**31 - 1


def check_zeta_value(key: str, value):
    """Refuses a zeta `PalmE` keyword argument of the wrong type (`null` in a JSON file), or a size beyond
    `MAX_ZETA_SIZE`, naming it."""
    if isinstance(ZETA_PALME_DEFAULTS[key], bool):
        if not isinstance(value, bool):
            raise ValueError(f"zeta's PalmE argument `{key}` must be true or false, got {value!r}.")
        return
    smallest = 0 if key == "alibi_num_heads" else 1
    if isinstance(value, bool) or not isinstance(value, int) or not smallest <= value <= MAX_ZETA_SIZE:
        raise ValueError(
            f"zeta's PalmE argument `{key}` must be an integer from {smallest} to {MAX_ZETA_SIZE}, got {value!r}."
        )


def is_own_tower(config, config_class: type[PreTrainedConfig]) -> bool:
    """
    Whether `config` is one of PalmE's own `config_class`, by `model_type`: with remote code the class may come from
    two copies of this module (a pipeline loads the config and the model separately), so `isinstance` can miss it.
    """
    return isinstance(config, PreTrainedConfig) and config.model_type == config_class.model_type


def sub_config_from(name: str, key: str, value, own_class: type[PreTrainedConfig]) -> PreTrainedConfig | dict:
    """
    `value` (a config, a dict or None) as a config: a dict names its class by `model_type`, as in a config.json
    (resolved through Transformers' `CONFIG_MAPPING`, as Llava's sub-configs are); without one, or with `own_class`'s
    `model_type`, it is `own_class`'s, which is returned as a dict for the caller to complete.
    """
    if value is None:
        return {}
    if is_own_tower(value, own_class):
        return value.to_dict()
    if isinstance(value, PreTrainedConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name}: `{key}` must be a config, a dict or None, got {type(value).__name__}.")
    model_type = value.get("model_type", own_class.model_type)
    if model_type == own_class.model_type:
        return dict(value)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{name}: `{key}` has `model_type={model_type!r}`, which Transformers does not know.")
    return CONFIG_MAPPING[model_type](**{k: v for k, v in value.items() if k != "model_type"})


def check_foreign_vision_config(name: str, config: PreTrainedConfig):
    """A Transformers vision encoder (`AutoModel` builds it) with square-patch geometry and a width."""
    if config.model_type not in MODEL_MAPPING_NAMES:
        raise ValueError(
            f"{name}: `vision_config` must be the config of a Transformers vision encoder that `AutoModel` builds "
            f"(ViTConfig, CLIPVisionConfig, SiglipVisionConfig, ...); got {type(config).__name__} "
            f"(`model_type={config.model_type!r}`)."
        )
    missing = [key for key in ("hidden_size", "image_size", "patch_size") if getattr(config, key, None) is None]
    if missing:
        raise ValueError(
            f"{name}: `vision_config` ({type(config).__name__}) has no {missing}: it must be a vision encoder's "
            "config (for a dual encoder such as CLIPConfig, give its `vision_config`)."
        )


def check_foreign_text_config(name: str, config: PreTrainedConfig, vision_integration: str):
    """A Transformers causal language model (`AutoModelForCausalLM`), which takes the image as a prefix."""
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.model_type not in MODEL_MAPPING_NAMES:
        raise ValueError(
            f"{name}: `text_config` must be the config of a Transformers causal language model (LlamaConfig, "
            f"GPT2Config, Qwen2Config, GemmaConfig, ...) or a PalmETextConfig; got {type(config).__name__} "
            f"(`model_type={config.model_type!r}`)."
        )
    head_options = [key for key in ("final_logit_softcapping", "logit_scale") if getattr(config, key, None)]
    if head_options:
        raise ValueError(
            f"{name}: {type(config).__name__} sets {head_options}, which its own head applies to the logits; PalmE's "
            "head is a plain linear map, so this language model is not supported."
        )
    if vision_integration != "prefix":
        raise ValueError(
            f"{name}: `vision_integration={vision_integration!r}` needs a decoder with cross-attention layers, which "
            f"{type(config).__name__} does not have: use `vision_integration='prefix'` (the PaLM-E paper's "
            "multimodal sentences), or a PalmETextConfig decoder."
        )


def num_patches_of(vision_config: PreTrainedConfig) -> int:
    """Patches of one image: `(image_size / patch_size) ** 2`, or the product over height and width."""
    if is_own_tower(vision_config, PalmEVisionConfig):
        return vision_config.num_patches
    sizes, patches = vision_config.image_size, vision_config.patch_size
    sizes = sizes if isinstance(sizes, (list, tuple)) else (sizes, sizes)
    patches = patches if isinstance(patches, (list, tuple)) else (patches, patches)
    return (sizes[0] // patches[0]) * (sizes[1] // patches[1])


def check_observation_options(
    name: str, kind: str, dim: int | None, num_tokens: int, token_id: int | None, config: "PalmEConfig"
):
    """
    The options of one kind of observation beside images (`kind` "state" or "object"): with `{kind}_dim` set, a
    positive width and number of tokens and a placeholder token of the vocabulary, other than the image placeholder,
    on the `"prefix"` route; without it, no placeholder (it would be ignored).
    """
    check_positive_ints(name, **{f"num_{kind}_tokens": num_tokens})
    if dim is None:
        if token_id is not None:
            raise ValueError(
                f"{name}: `{kind}_token_id` ({token_id!r}) is set but `{kind}_dim` is not: set `{kind}_dim`, the "
                f"width of the {kind} vectors, to give the model {kind} inputs."
            )
        return
    check_positive_ints(name, **{f"{kind}_dim": dim})
    if config.vision_integration != "prefix":
        raise ValueError(
            f"{name}: `{kind}_dim` needs `vision_integration='prefix'`: {kind} vectors enter the token sequence as "
            f"the images do there, got `vision_integration={config.vision_integration!r}`."
        )
    vocab_size = config.text_config.vocab_size
    if not (isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < vocab_size):
        raise ValueError(
            f"{name}: `{kind}_dim` needs `{kind}_token_id`, the id of its placeholder token in [0, {vocab_size}) "
            f"(added to the tokenizer as PalmEProcessor adds it), got {token_id!r}."
        )
    if token_id == config.image_token_id:
        raise ValueError(
            f"{name}: `{kind}_token_id` ({token_id}) is the image placeholder `image_token_id`: each kind of "
            "observation needs its own placeholder token."
        )


class PalmEConfig(SavedConfigMixin, NewestNamesPreTrainedConfig):
    r"""
    Configuration of a PalmE model: the image encoder (`vision_config`), the text decoder (`text_config`) and how the
    image reaches the text. To build what zeta's `PalmE(**kwargs)` builds, use [`~PalmEConfig.from_zeta_kwargs`].

    As in the PaLM-E paper, either tower may be a Transformers model: `vision_config` any vision encoder's config
    (`ViTConfig`, `CLIPVisionConfig`, `SiglipVisionConfig`, ...; the text receives its patch features, the last
    `num_patches` tokens of its `last_hidden_state`: a class token is left out) and `text_config` any causal
    language model's (`LlamaConfig`, `GPT2Config`, `Qwen2Config`, `GemmaConfig`, ...; with `"prefix"` integration).
    In a dict (a saved config.json), `model_type` names the class; without it the tower is PalmE's own.
    [`PalmEForConditionalGeneration.from_pretrained_towers`] builds a model from two pretrained towers.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*): the image encoder, [`PalmEVisionConfig`] by default.
        text_config (`dict` or `PreTrainedConfig`, *optional*): the text decoder, [`PalmETextConfig`] by default.
        vision_integration (`str`, defaults to `"cross_attention"`): how the image reaches the text.
            `"cross_attention"`: every decoder layer cross-attends to the image features (zeta's PalmE; PalmE's own
            decoder only). `"prefix"`: as in the PaLM-E paper, the image features are projected to the decoder width
            and replace `image_token_id` placeholder tokens of `input_ids` (one placeholder per image feature, any
            number of images at any positions).
        image_token_id (`int`, *optional*): the placeholder token of `"prefix"` integration (required there): the id
            of the `<image>` token added to the tokenizer, as [`PalmEProcessor`] adds it.
        num_latents (`int`, *optional*): when set, a Perceiver resampler (learned latents cross-attending to the
            patch features, `resampler_depth` [`PerceiverLayer`]s) turns each image into `num_latents` features
            before they reach the text, with either integration.
        resampler_depth (`int`, defaults to 2): layers of the Perceiver resampler.
        projector_type (`str`, defaults to `"linear"`): the map from image features to the decoder width with
            `"prefix"` integration: `"linear"`, the paper's affine projection, or `"mlp"`, linear-GELU-linear (as
            Llava's).
        tie_word_embeddings (`bool`, *optional*): `text_config.tie_word_embeddings`, where it is set; Transformers
            reads it here.
        state_dim (`int`, *optional*): when set, the text also takes state vectors of `state_dim` values (the PaLM-E
            paper's state estimates), each mapped by an MLP into `num_state_tokens` embeddings that replace as many
            `state_token_id` placeholders (`"prefix"` integration only). Off by default.
        num_state_tokens (`int`, defaults to 1): embeddings each state vector gives the text.
        state_token_id (`int`, *optional*): the state placeholder token, the id of the `<state>` token added to the
            tokenizer (required with `state_dim`).
        object_dim (`int`, *optional*): when set, the text also takes object vectors of `object_dim` values (the
            paper's object-centric representations, one vector per object), each mapped by an MLP into
            `num_object_tokens` embeddings that replace as many `object_token_id` placeholders (`"prefix"` integration
            only). Off by default.
        num_object_tokens (`int`, defaults to 1): embeddings each object vector gives the text.
        object_token_id (`int`, *optional*): the object placeholder token, the id of the `<obj>` token added to the
            tokenizer (required with `object_dim`).
    """

    model_type = "palme"
    sub_configs_defaults = {"vision_config": PalmEVisionConfig, "text_config": PalmETextConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_integration: Literal["cross_attention", "prefix"] = "cross_attention"
    image_token_id: int | None = None
    num_latents: int | None = None
    resampler_depth: int = 2
    projector_type: Literal["linear", "mlp"] = "linear"
    tie_word_embeddings: bool | None = None
    state_dim: int | None = None
    num_state_tokens: int = 1
    state_token_id: int | None = None
    object_dim: int | None = None
    num_object_tokens: int = 1
    object_token_id: int | None = None

    def __post_init__(self, **kwargs):
        name = type(self).__name__
        flat = sorted(set(kwargs) & (set(ZETA_PALME_DEFAULTS) | {"block_type"}))
        if flat and not READING_SAVED_CONFIG.flag.get():
            raise ValueError(
                f"{name} takes `vision_config` and `text_config`; {flat} are arguments of zeta's PalmE (or of a "
                f"sub-configuration). Build zeta's PalmE with `PalmEConfig.from_zeta_kwargs({flat[0]}=...)`, or set "
                "the option in `vision_config` / `text_config`."
            )
        check_declared_options(self)
        if self.projector_type != "linear" and self.vision_integration != "prefix":
            raise ValueError(
                f"{name}: `projector_type={self.projector_type!r}` needs `vision_integration='prefix'`: with "
                "cross-attention the image features are not projected."
            )
        if self.num_latents is not None:
            check_positive_ints(name, num_latents=self.num_latents, resampler_depth=self.resampler_depth)

        # A sub-config given as a config object is data already checked: its keys are read as a saved config's.
        vision_is_object = isinstance(self.vision_config, PreTrainedConfig)
        text_is_object = isinstance(self.text_config, PreTrainedConfig)
        vision_config = sub_config_from(name, "vision_config", self.vision_config, PalmEVisionConfig)
        if isinstance(vision_config, dict):
            with reading_saved_config(vision_is_object):
                vision_config = PalmEVisionConfig(**vision_config)
        else:
            check_foreign_vision_config(name, vision_config)
        self.vision_config = vision_config

        text_config = sub_config_from(name, "text_config", self.text_config, PalmETextConfig)
        if isinstance(text_config, dict):
            text_kwargs = upgrade_saved_text_config(text_config)
            add_cross_attention = self.vision_integration == "cross_attention"
            if text_kwargs.setdefault("add_cross_attention", add_cross_attention) != add_cross_attention:
                raise ValueError(
                    f"{name}: `text_config.add_cross_attention={text_kwargs['add_cross_attention']}` contradicts "
                    f"`vision_integration={self.vision_integration!r}`, which sets it."
                )
            text_kwargs.setdefault("cross_attention_hidden_size", self.vision_config.hidden_size)
            with reading_saved_config(text_is_object):
                text_config = PalmETextConfig(**text_kwargs)
        else:
            check_foreign_text_config(name, text_config, self.vision_integration)
        self.text_config = text_config

        vocab_size = self.text_config.vocab_size
        if self.vision_integration == "prefix" and self.image_token_id is None:
            raise ValueError(
                f"{name}: `vision_integration='prefix'` needs `image_token_id`, the id of the `<image>` token: add it "
                "to the tokenizer (PalmEProcessor does) and grow the vocabulary to hold it."
            )
        image_token_id = self.image_token_id
        if image_token_id is not None and not (isinstance(image_token_id, int) and 0 <= image_token_id < vocab_size):
            raise ValueError(f"{name}: `image_token_id` ({image_token_id!r}) must be a token id in [0, {vocab_size}).")
        # Transformers reads it here to tie the language-model head to the token embeddings: the decoder's option.
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = self.text_config.tie_word_embeddings
        elif self.tie_word_embeddings != self.text_config.tie_word_embeddings:
            raise ValueError(f"{name}: set `tie_word_embeddings` in `text_config`, the decoder's option.")
        check_observation_options(name, "state", self.state_dim, self.num_state_tokens, self.state_token_id, self)
        check_observation_options(name, "object", self.object_dim, self.num_object_tokens, self.object_token_id, self)
        if self.state_dim is not None and self.object_dim is not None and self.state_token_id == self.object_token_id:
            raise ValueError(
                f"{name}: `state_token_id` and `object_token_id` are both {self.state_token_id}: each kind of "
                "observation needs its own placeholder token."
            )
        super().__post_init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        """The text decoder's vocabulary, `text_config.vocab_size`, for libraries that read it on the top-level config
        (PEFT decides from it whether a LoRA adapter saves resized embeddings). Setting it sets the decoder's."""
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int):
        self.text_config.vocab_size = value

    @property
    def num_image_tokens(self) -> int:
        """How many features each image gives the text: one per latent with a resampler, else one per patch."""
        return self.num_latents if self.num_latents is not None else num_patches_of(self.vision_config)

    @classmethod
    def from_zeta_kwargs(cls, **zeta_kwargs) -> "PalmEConfig":
        """
        The configuration of zeta's `PalmE(**zeta_kwargs)`: its keyword arguments (`image_size`, `patch_size`,
        `encoder_dim`, `encoder_depth`, `encoder_heads`, `num_tokens`, `max_seq_len`, `decoder_dim`, `decoder_depth`,
        `decoder_heads`, `alibi_num_heads`, `use_abs_pos_emb`, `cross_attend`, `alibi_pos_bias`, `rotary_xpos`,
        `attn_flash`, `qk_norm`), missing ones at zeta's defaults, with what each means there:

        - `attn_flash` selects the kernel: `"sdpa"` when True, `"eager"` when False (same results);
        - `qk_norm` has no effect in zeta's PalmE, so query/key normalisation stays off;
        - `use_abs_pos_emb` adds absolute positions only without rotary embeddings (`rotary_xpos=False`), as zeta;
        - `cross_attend=False` (which zeta cannot run) gives `"prefix"` integration, with the image placeholder as a
          token added after zeta's `num_tokens` (`image_token_id = num_tokens`, vocabulary `num_tokens + 1`).

        The zeta converter adds the reference's quirks on top (value rotation, a fixed xpos offset).
        """
        unknown = sorted(set(zeta_kwargs) - set(ZETA_PALME_DEFAULTS))
        if unknown:
            raise ValueError(
                f"zeta's PalmE does not take the keyword arguments {unknown}; it takes {sorted(ZETA_PALME_DEFAULTS)}."
            )
        for key, value in zeta_kwargs.items():
            check_zeta_value(key, value)
        zeta = {**ZETA_PALME_DEFAULTS, **zeta_kwargs}
        rotary = zeta["rotary_xpos"]
        vision_config = {
            "image_size": zeta["image_size"],
            "patch_size": zeta["patch_size"],
            "hidden_size": zeta["encoder_dim"],
            "num_hidden_layers": zeta["encoder_depth"],
            "num_attention_heads": zeta["encoder_heads"],
        }
        text_config = {
            "vocab_size": zeta["num_tokens"] + (0 if zeta["cross_attend"] else 1),
            "max_position_embeddings": zeta["max_seq_len"],
            "hidden_size": zeta["decoder_dim"],
            "num_hidden_layers": zeta["decoder_depth"],
            "num_attention_heads": zeta["decoder_heads"],
            "cross_attention_hidden_size": zeta["encoder_dim"],
            "alibi_num_heads": zeta["alibi_num_heads"] if zeta["alibi_pos_bias"] else 0,
            "use_rotary": rotary,
            "use_xpos": rotary,
            "use_absolute_position_embeddings": zeta["use_abs_pos_emb"] and not rotary,
            "qk_norm": False,
        }
        return cls(
            vision_config=vision_config,
            text_config=text_config,
            vision_integration="cross_attention" if zeta["cross_attend"] else "prefix",
            image_token_id=None if zeta["cross_attend"] else zeta["num_tokens"],
            attn_implementation="sdpa" if zeta["attn_flash"] else "eager",
        )


__all__ = ["PalmEConfig", "PalmETextConfig", "PalmEVisionConfig"]
