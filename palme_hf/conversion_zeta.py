"""Conversion of zeta `PalmE` checkpoints (`torch.save(model.state_dict())` plus the constructor keyword arguments)
into palme_hf models."""

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .configuration_palme import PalmEConfig
from .conversion_blocks import check_state_dict_shapes
from .io_palme import atomic_output_dir, check_output_dir, read_json_file
from .layers_palme import PalmERotaryEmbedding
from .modeling_palme import PalmEForConditionalGeneration

# zeta saves its decoder's rotary buffers; they are checked against the configuration, not loaded.
ZETA_ROTARY_PREFIX = "decoder.net.attn_layers.rotary_pos_emb."


def zeta_palme_config(zeta_kwargs: dict) -> PalmEConfig:
    """
    The [`PalmEConfig`] of a zeta `PalmE(**zeta_kwargs)` (missing arguments take zeta's defaults), with the
    reference's quirks switched on so the converted model computes what the reference computes:

    - values are rotated (with the key's xpos scale) in self-attention, `text_config.rotate_values=True`;
    - the xpos offset is fixed at `max_seq_len // 2` (the offset a model trained on full-length sequences saw),
      `text_config.xpos_offset`;
    - `qk_norm` is off whatever the kwargs say: the reference passes it where nothing reads it.
    """
    if not zeta_kwargs.get("cross_attend", True):
        raise ValueError(
            "`cross_attend=False`: zeta's PalmE cannot run such a model (its forward always passes the image as "
            "cross-attention context), so there is no trained behaviour to convert. Build a palme_hf model with "
            "`PalmEConfig.from_zeta_kwargs(cross_attend=False)` and train it instead."
        )
    config = PalmEConfig.from_zeta_kwargs(**zeta_kwargs)
    if config.text_config.use_rotary:
        config.text_config.rotate_values = True
        config.text_config.xpos_offset = config.text_config.max_position_embeddings // 2
    return config


def _zeta_key_map(config: PalmEConfig) -> dict[str, str]:
    """zeta state-dict key -> palme_hf state-dict key, for every parameter of the converted model."""
    mapping = {
        "encoder.pos_embedding": "model.vision_model.embeddings.position_embedding",
        "encoder.attn_layers.final_norm": "model.vision_model.post_layernorm",
        "decoder.net.token_emb.emb": "model.language_model.embed_tokens",
        "decoder.net.pos_emb.emb": "model.language_model.embed_positions",
        "decoder.net.attn_layers.final_norm": "model.language_model.norm",
        "decoder.net.to_logits": "lm_head",
    }
    for index, name in enumerate(("patch_norm", "patch_projection", "projection_norm")):
        mapping[f"encoder.patch_to_embedding.{index}"] = f"model.vision_model.embeddings.{name}"
    attention = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "o_proj"}
    feed_forward = {"ff.0.0": "fc1", "ff.2": "fc2"}

    # x-transformers numbers the sub-layers of each layer consecutively: (attention, feed-forward) in the encoder,
    # (self-attention, cross-attention, feed-forward) in the decoder. Each is `[norms, block, residual]`; here each
    # is (its norm, its module, the names inside it).
    self_attention = ("self_attn_layer_norm", "self_attn", attention)
    cross_attention = ("cross_attn.layer_norm", "cross_attn.attention", attention)
    mlp = ("mlp_layer_norm", "mlp", feed_forward)

    def add_layer(zeta_prefix: str, hf_prefix: str, sublayers: tuple, layer: int):
        for offset, (norm, module, names) in enumerate(sublayers):
            zeta = f"{zeta_prefix}.{layer * len(sublayers) + offset}"
            hf = f"{hf_prefix}.{layer}"
            mapping[f"{zeta}.0.0"] = f"{hf}.{norm}"
            for zeta_name, hf_name in names.items():
                mapping[f"{zeta}.1.{zeta_name}"] = f"{hf}.{module}.{hf_name}"

    for layer in range(config.vision_config.num_hidden_layers):
        add_layer("encoder.attn_layers.layers", "model.vision_model.layers", (self_attention, mlp), layer)
    for layer in range(config.text_config.num_hidden_layers):
        add_layer(
            "decoder.net.attn_layers.layers",
            "model.language_model.layers",
            (self_attention, cross_attention, mlp),
            layer,
        )
    return mapping


def convert_zeta_palme_state_dict(state_dict: dict[str, torch.Tensor], config: PalmEConfig) -> dict[str, torch.Tensor]:
    """
    Renames a zeta `PalmE` state dict into a [`PalmEForConditionalGeneration`] state dict.

    Raises:
        `ValueError` naming every missing, unexpected or wrongly shaped tensor.
    """
    try:
        with torch.device("meta"):
            expected_model = PalmEForConditionalGeneration(config)
    except (RuntimeError, TypeError, OverflowError) as error:
        raise ValueError(
            f"These kwargs describe tensors too large to build (with {config.text_config.vocab_size} tokens, "
            f"decoder width {config.text_config.hidden_size}): {str(error).splitlines()[0]}"
        ) from error
    expected = expected_model.state_dict()
    module_map = {hf: zeta for zeta, hf in _zeta_key_map(config).items()}
    hf_to_zeta = {}
    for hf_key in expected:
        if hf_key in module_map:  # a bare parameter, such as the encoder's positions
            hf_to_zeta[hf_key] = module_map[hf_key]
        else:
            module, _, leaf = hf_key.rpartition(".")
            hf_to_zeta[hf_key] = f"{module_map[module]}.{leaf}"
    zeta_to_hf = {zeta: hf for hf, zeta in hf_to_zeta.items()}

    rotary_buffers = {key: tensor for key, tensor in state_dict.items() if key.startswith(ZETA_ROTARY_PREFIX)}
    for key, tensor in rotary_buffers.items():
        _check_rotary_buffer(key, tensor, config)
    weights = {key: tensor for key, tensor in state_dict.items() if key not in rotary_buffers}
    expected_shapes = {zeta: tuple(expected[hf].shape) for zeta, hf in zeta_to_hf.items()}
    check_state_dict_shapes(weights, expected_shapes, "zeta's PalmE with these kwargs")
    return {zeta_to_hf[key]: tensor for key, tensor in weights.items()}


def _check_rotary_buffer(key: str, tensor: torch.Tensor, config: PalmEConfig):
    """
    The reference saves its rotary buffers; they must be the ones the converted configuration computes, at the
    checkpoint's precision (a float16 or bfloat16 checkpoint holds them rounded).
    """
    text_config = config.text_config
    if not text_config.use_rotary:
        raise ValueError(f"The checkpoint holds {key}, but its kwargs turn rotary embeddings off.")
    inv_freq, xpos_scale = PalmERotaryEmbedding(
        text_config.rotary_dim, base=text_config.rope_parameters["rope_theta"]
    ).compute_buffers()
    reference = {"inv_freq": inv_freq, "scale": xpos_scale}.get(key.rsplit(".", 1)[1])
    if reference is None or reference.shape != tensor.shape or not tensor.is_floating_point():
        raise ValueError(f"The checkpoint's rotary buffer {key} does not match the configuration's rotary embedding.")
    rounded = reference.to(tensor.dtype).float()
    if not torch.allclose(rounded, tensor.float(), rtol=max(1e-5, torch.finfo(tensor.dtype).eps)):
        raise ValueError(f"The checkpoint's rotary buffer {key} does not match the configuration's rotary embedding.")


def read_checkpoint(checkpoint_path: str) -> dict[str, torch.Tensor]:
    """
    The state dict in `checkpoint_path`: a `.safetensors` file, or else a `torch.save` file read with
    `weights_only=True`. A file that is neither (truncated, corrupt, text) is a one-line `ValueError` naming it.
    """
    if str(checkpoint_path).endswith(".safetensors"):
        try:
            return load_file(checkpoint_path)
        except SafetensorError as error:
            raise ValueError(
                f"{checkpoint_path} is not a readable safetensors file (truncated or corrupt): {error}"
            ) from error
    # What the unpickler trips over in a file that is not a checkpoint varies (KeyError, IndexError, ...).
    try:
        state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{checkpoint_path} is not a readable tensor checkpoint (truncated, or not saved with torch.save?): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    if not isinstance(state_dict, dict):
        raise ValueError(f"{checkpoint_path} holds a {type(state_dict).__name__}, not a state dict.")
    return state_dict


def checkpoint_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype of the checkpoint's weights; float32 when they mix several."""
    dtypes = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def load_zeta_palme(
    checkpoint_path: str, zeta_kwargs: dict, dtype: torch.dtype | None = None
) -> PalmEForConditionalGeneration:
    """
    Loads a zeta `PalmE` checkpoint (`torch.save(model.state_dict())`, read with `weights_only=True`, or a
    `.safetensors` file). The model is in the checkpoint's dtype (a float16 checkpoint gives a float16 model), or
    in `dtype` when given.
    """
    config = zeta_palme_config(zeta_kwargs)
    state_dict = read_checkpoint(checkpoint_path)
    converted = convert_zeta_palme_state_dict(state_dict, config)
    model = PalmEForConditionalGeneration(config)
    model.load_state_dict(converted, strict=False)
    return model.to(dtype or checkpoint_dtype(converted)).eval()


def convert_zeta_palme_checkpoint(
    checkpoint_path: str,
    kwargs_path: str,
    output_dir: str,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> PalmEForConditionalGeneration:
    """
    Converts a zeta checkpoint and its kwargs JSON into a `from_pretrained` folder (safetensors, config.json,
    generation_config.json, and the modelling code for `trust_remote_code`), saved in the checkpoint's dtype or in
    `dtype`.

    A non-empty `output_dir` is refused unless `overwrite`. The folder is written beside `output_dir` and renamed
    into place at the end, so a failure leaves `output_dir` as it was.
    """
    check_output_dir(output_dir, overwrite)  # before the load, which can take long
    try:
        zeta_kwargs = read_json_file(kwargs_path)
    except UnicodeDecodeError as error:
        raise ValueError(f"{kwargs_path} is not UTF-8 text, so not a JSON kwargs file: {error}") from error
    if not isinstance(zeta_kwargs, dict):
        raise ValueError(f"{kwargs_path} must hold a JSON object of zeta PalmE keyword arguments.")
    model = load_zeta_palme(checkpoint_path, zeta_kwargs, dtype)
    with atomic_output_dir(output_dir, overwrite) as temporary_dir:
        model.save_pretrained(temporary_dir)
    return model


__all__ = ["convert_zeta_palme_checkpoint", "convert_zeta_palme_state_dict", "load_zeta_palme", "zeta_palme_config"]
