"""The hierarchical decoder layer and `HierarchicalBlock` (zeta's documented block; original:
`simple_hierarchical_transformer.HierarchicalBlock`) over it, with the masks a model prepares for them once per forward
pass. Attention goes through [`PalmEAttention`], rotary embeddings through [`PalmERotaryEmbedding`]."""

from collections.abc import Mapping

import torch
from torch import nn
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .compat_palme import accept_past_key_values
from .configuration_palme import PalmETextConfig, check_positive_ints, hierarchical_cache_layout
from .conversion_blocks import load_hierarchical_block_reference
from .layers_palme import (
    PalmEAttention,
    PalmEMLP,
    PalmERotaryEmbedding,
    PalmETextCrossAttention,
    RotaryTables,
    WindowedAttentionMask,
    add_bias_to_mask,
    block_attn_implementation,
    check_hidden_states,
    in_windows,
    share_attention_config,
)


class HierarchicalRMSNorm(nn.Module):
    """RMS normalisation as the reference computes it: `x / max(||x||, 1e-12) * sqrt(dim) * weight`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.scale = hidden_size**0.5
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states` (`(..., hidden_size)`) normalised over the last dimension; the same shape."""
        return nn.functional.normalize(hidden_states, dim=-1) * self.scale * self.weight


def token_shift(
    hidden_states: torch.Tensor,
    distance: int,
    token_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
    layer_idx: int = 0,
    state_idx: int = 0,
) -> torch.Tensor:
    """
    Token shift (RWKV): the second half of each token's features is replaced by that of the token `distance` positions
    earlier (zeros before the first token, and from padding tokens); the first half is kept.

    With a cache, the shifted halves of the last `distance` tokens are kept in the conv state `state_idx` of the
    cache's layer `layer_idx`, in the conv-state layout `(batch_size, features, distance)`.

    Args:
        hidden_states (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`): the tokens after those in
            the cache.
        token_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): 1/True for tokens, 0/False for
            padding, whose features are not passed on.

    Returns:
        `torch.FloatTensor` of the same shape.
    """
    seq_len = hidden_states.shape[1]
    # `chunk(2)` split point, as in the reference (the first half is the larger one for an odd width)
    split = (hidden_states.shape[-1] + 1) // 2
    kept, to_shift = hidden_states[..., :split], hidden_states[..., split:]
    if token_mask is not None:
        to_shift = to_shift * token_mask[..., None].to(to_shift.dtype)
    to_shift = to_shift.transpose(1, 2)
    history = nn.functional.pad(to_shift, (distance, 0))
    if cache is not None:
        has_previous_state = cache.has_previous_state(layer_idx, state_idx)
        updated = cache.update_conv_state(to_shift, layer_idx, state_idx, conv_kernel_size=distance)
        if has_previous_state:
            history = updated  # the last `distance` tokens' halves, then the new ones
    shifted = history[..., :seq_len].transpose(1, 2)
    return torch.cat((kept, shifted), dim=-1)


def keys_are_tokens(
    attention_mask: torch.Tensor, sequence_length: int, key_start: int, kv_length: int
) -> torch.Tensor:
    """
    Which keys are tokens, `(batch_size, kv_length)`, from a 2-D padding mask `(batch_size, sequence_length)` over the
    cached and the new tokens, for the keys at sequence indices `key_start + arange(kv_length)`; keys beyond it (empty
    slots of a static cache) count as tokens: they are later than every query.
    """
    if attention_mask.shape[-1] != sequence_length:
        raise ValueError(
            f"A 2-D `attention_mask` must cover the cached and the new tokens: length {sequence_length}, "
            f"got shape {tuple(attention_mask.shape)}."
        )
    missing = max(key_start + kv_length - sequence_length, 0)
    return nn.functional.pad(attention_mask.bool(), (0, missing), value=True)[:, key_start : key_start + kv_length]


def hierarchical_attention_mask(
    query_start: int,
    seq_len: int,
    key_start: int,
    kv_length: int,
    group_size: int,
    window_size: int | None,
    attention_mask: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """
    The additive mask of the hierarchical attention: token `i` attends to token `j` when `j` is in the same group
    (`i - j` a multiple of `group_size`), not later (`j <= i`) and, with a window, at most `window_size` group steps
    back (`i - j <= window_size * group_size`); padding keys (from `attention_mask`) are masked too.

    Args:
        query_start, seq_len (`int`): the queries are at sequence indices `query_start + arange(seq_len)`.
        key_start, kv_length (`int`): the keys the cache returns are at sequence indices
            `key_start + arange(kv_length)`.
        attention_mask (`torch.Tensor`, *optional*): `(batch_size, past_len + seq_len)` with 1/True for tokens and
            0/False for padding, or a 4-D mask `(batch_size, 1, seq_len, kv_len)`, boolean (True = attend) or additive
            (0 = attend).

    Returns:
        `torch.FloatTensor` of shape `(batch_size or 1, 1, seq_len, kv_len)` in `dtype`: 0 where attending, the
        dtype's minimum elsewhere.
    """
    query_indices = torch.arange(seq_len, device=device) + query_start
    key_indices = torch.arange(kv_length, device=device) + key_start
    distance = query_indices[:, None] - key_indices[None, :]
    allowed = (distance >= 0) & (distance % group_size == 0)
    if window_size is not None:
        allowed = allowed & (distance <= window_size * group_size)
    allowed = allowed[None, None]

    if attention_mask is not None:
        if attention_mask.ndim == 2:
            is_token = keys_are_tokens(attention_mask, query_start + seq_len, key_start, kv_length)
            allowed = allowed & is_token[:, None, None, :]
        elif attention_mask.ndim == 4:
            if tuple(attention_mask.shape[-2:]) != tuple(allowed.shape[-2:]):
                raise ValueError(
                    f"A 4-D `attention_mask` must have shape (batch_size, 1, {allowed.shape[-2]}, "
                    f"{allowed.shape[-1]}) (queries, keys the cache returns), got {tuple(attention_mask.shape)}."
                )
            allowed = allowed & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
        else:
            raise ValueError(
                "`attention_mask` must be 2-D (batch_size, past_len + seq_len) or 4-D (batch_size, 1, seq_len, "
                f"kv_len), got shape {tuple(attention_mask.shape)}."
            )
    # Additive, because eager attention adds the mask to the scores (sdpa takes it as well).
    return add_bias_to_mask(allowed, torch.zeros((), device=allowed.device), dtype)


def windowed_attention_mask(
    batch_size: int,
    seq_len: int,
    kv_length: int,
    query_start: int,
    key_start: int,
    span: int,
    group_size: int,
    chunk_size: int,
    key_is_token: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """
    The band mask of [`windowed_attention_forward`]: query `i` attends to key `j` when `0 <= i - j <= span`, `i - j`
    is a multiple of `group_size` and `j` is a token the cache holds.

    Args:
        query_start (`int`): sequence index of the first of the `seq_len` queries.
        key_start (`int`): sequence index of the first of the `kv_length` keys the cache returns.
        key_is_token (`torch.BoolTensor` of shape `(batch_size, kv_length)`, *optional*): False for padding keys.

    Returns:
        `torch.FloatTensor` of shape `(batch_size * num_chunks, 1, chunk_size, chunk_size + span)` in `dtype`: 0 where
        attending, the dtype's minimum elsewhere.
    """
    num_chunks = -(-seq_len // chunk_size)
    window = chunk_size + span
    held = torch.ones(kv_length, dtype=torch.bool, device=device)
    key_allowed = in_windows(
        held if key_is_token is None else held & key_is_token,
        -1,
        left=key_start - (query_start - span),
        num_chunks=num_chunks,
        span=span,
        chunk_size=chunk_size,
    )
    if key_allowed.ndim == 2:
        key_allowed = key_allowed.expand(batch_size, -1, -1)
    distance = torch.arange(chunk_size, device=device)[:, None] - torch.arange(window, device=device) + span
    band = (distance >= 0) & (distance <= span) & (distance % group_size == 0)
    allowed = band & key_allowed.reshape(batch_size * num_chunks, 1, 1, window)
    return add_bias_to_mask(allowed, torch.zeros((), device=device), dtype)


def window_chunk_size(attention_span: int) -> int:
    """Queries per chunk of the window kernel: at least 64, and at least the span a query sees."""
    return max(attention_span, 64)


def check_hierarchical_cache(cache: Cache | None, layer_idx: int, layer_type: str):
    """Refuses a cache whose layer `layer_idx` cannot hold the hierarchical layer's token-shift state."""
    cache_layer = None
    if cache is not None and layer_idx < len(cache.layers):
        cache_layer = cache.layers[layer_idx]
    if cache is not None and not isinstance(cache_layer, LinearAttentionCacheLayerMixin):
        layer = "no layer" if cache_layer is None else type(cache_layer).__name__
        raise ValueError(
            f"HierarchicalBlock keeps token-shift state in the cache: its layer {layer_idx} must be of type "
            f"{layer_type!r} (build the cache with `DynamicCache(config=block.config)`), got {layer}."
        )


def create_hierarchical_mask(
    attn_implementation: str,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    window_size: int | None,
    group_size: int,
    layer_idx: int = 0,
) -> torch.Tensor | WindowedAttentionMask | None:
    """
    The attention mask of hierarchical layers (which share window, group size and cache layout, so that a model
    prepares it once per forward pass, as `create_causal_mask` for other layers), for the input `inputs_embeds`
    `(batch_size, seq_len, hidden_size)` after the tokens in `cache` (its layer `layer_idx`):

    - over more keys than a window needs, with the sdpa kernel and a padding mask or none: the band of the chunked
      window kernel, a [`WindowedAttentionMask`], in time and memory linear in the length;
    - when the queries see every key the cache returns causally, without groups or padding (a decoding step with no
      mask, or a full-attention sdpa prompt from an empty cache, or a window decoding step from a `DynamicCache`,
      which keeps just the window): `None`, plain causal attention;
    - else the dense additive mask of [`hierarchical_attention_mask`].

    `attention_mask` is as in [`HierarchicalBlock.forward`]. A compiled graph keeps the dense mask: the other two
    branch on the cache's fill. Nothing here reads a tensor's values on a decoding step (one query, or a padding
    mask), which would make the host wait for the device.
    """
    batch_size, seq_len = inputs_embeds.shape[:2]
    past_seen_tokens = cache.get_seq_length(layer_idx) if cache is not None else 0
    kv_length, kv_offset = (seq_len, 0) if cache is None else cache.get_mask_sizes(seq_len, layer_idx)
    padding_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
    span = None if window_size is None else window_size * group_size
    compiling = torch.compiler.is_compiling()
    if (
        not compiling
        and span is not None
        and kv_length > window_chunk_size(span) + span
        and (attention_mask is None or padding_mask is not None)
        and attn_implementation == "sdpa"
    ):
        chunk_size = window_chunk_size(span)
        key_is_token = None
        if padding_mask is not None:
            key_is_token = keys_are_tokens(padding_mask, past_seen_tokens + seq_len, kv_offset, kv_length)
        mask = windowed_attention_mask(
            batch_size,
            seq_len,
            kv_length,
            query_start=past_seen_tokens,
            key_start=kv_offset,
            span=span,
            group_size=group_size,
            chunk_size=chunk_size,
            key_is_token=key_is_token,
            dtype=inputs_embeds.dtype,
            device=inputs_embeds.device,
        )
        return WindowedAttentionMask(mask, past_seen_tokens, kv_offset, span, chunk_size)

    if (
        not compiling
        and attention_mask is None
        and group_size == 1
        and kv_offset + kv_length == past_seen_tokens + seq_len  # no empty static-cache slots
        # causal attention without a mask: one query sees every key; sdpa aligns a prompt from an empty cache itself
        and (seq_len == 1 or (kv_length == seq_len and attn_implementation == "sdpa"))
        and (span is None or kv_length - 1 <= span)
    ):
        return None
    return hierarchical_attention_mask(
        past_seen_tokens,
        seq_len,
        kv_offset,
        kv_length,
        group_size,
        window_size,
        attention_mask,
        inputs_embeds.dtype,
        inputs_embeds.device,
    )


class PalmEHierarchicalDecoderLayer(GradientCheckpointingLayer):
    """
    The hierarchical decoder layer (`block_type="hierarchical"`): causal attention (full, or over a local window of
    the last `window_size` steps of the token's group), then a feed-forward, each pre-normalised, fed through a token
    shift and added back to its input; then, with `add_cross_attention`, pre-norm cross-attention to the image features
    with its residual. Full attention is RMS-normalised, window attention LayerNorm-normalised; `window_size=0` means
    no attention. Groups (`compress_factor // stride` of them, interleaved) live in the mask the model prepares
    ([`create_hierarchical_mask`]) and in the rotary positions (steps of the group), so tokens stay in sequence order.
    """

    def __init__(self, config: PalmETextConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.window_size = config.window_size
        self.group_size = config.compress_factor // config.stride
        # distance, in tokens, from a query to the farthest key it sees
        self.attention_span = None if config.window_size is None else config.window_size * self.group_size
        self.cache_layer_type, _, self.num_token_shift_states = hierarchical_cache_layout(
            config.window_size, config.compress_factor, config.stride
        )
        self.self_attn_norm = None
        self.self_attn = None
        if config.window_size != 0:
            self.self_attn_norm = (
                HierarchicalRMSNorm(config.hidden_size)
                if config.window_size is None
                else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            )
            self.self_attn = PalmEAttention(
                config,
                hidden_size=config.hidden_size,
                num_heads=config.num_attention_heads,
                head_dim=config.head_dim,
                is_causal=True,
                layer_idx=layer_idx,
            )
        self.mlp_norm = HierarchicalRMSNorm(config.hidden_size)
        self.mlp = PalmEMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)
        self.cross_attn = PalmETextCrossAttention(config, layer_idx) if config.add_cross_attention else None

    @property
    def chunk_size(self) -> int | None:
        """Queries per chunk of the window kernel (`None` for full attention)."""
        return None if self.attention_span is None else window_chunk_size(self.attention_span)

    @accept_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | WindowedAttentionMask | None = None,
        position_embeddings: RotaryTables | None = None,
        cache: Cache | None = None,
        cross_attention_cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`): the tokens after those
                in the cache.
            encoder_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_image_tokens,
                cross_attention_hidden_size)`, *optional*): the image features, for cross-attention.
            attention_mask (`torch.Tensor` or [`WindowedAttentionMask`], *optional*): from
                [`create_hierarchical_mask`].
            position_embeddings ([`RotaryTables`], *optional*): the rotary tables of the tokens' group steps
                (`position_ids // group_size`).
            cache (`Cache`, *optional*): keys/values and token-shift state of earlier steps, at `layer_idx`.
            cross_attention_cache (`EncoderDecoderCache`, *optional*): the image keys/values.
            token_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): 1/True for the tokens, 0/False
                for padding, whose features the token shift does not pass on.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`.
        """
        check_hierarchical_cache(cache, self.layer_idx, self.cache_layer_type)
        if self.self_attn is not None:
            shifted = token_shift(hidden_states, self.group_size, token_mask, cache, self.layer_idx, state_idx=0)
            attn_output, _ = self.self_attn(
                self.self_attn_norm(shifted),
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
            hidden_states = hidden_states + attn_output
        shifted = token_shift(
            hidden_states, self.group_size, token_mask, cache, self.layer_idx, self.num_token_shift_states - 1
        )
        hidden_states = hidden_states + self.mlp(self.mlp_norm(shifted))
        if self.cross_attn is not None:
            hidden_states = self.cross_attn(hidden_states, encoder_hidden_states, cross_attention_cache, **kwargs)
        return hidden_states


class HierarchicalBlock(PalmEHierarchicalDecoderLayer):
    """
    The block of the simple hierarchical transformer (zeta's `HierarchicalBlock`, whose original is
    `simple_hierarchical_transformer.HierarchicalBlock`), over [`PalmEHierarchicalDecoderLayer`]: causal attention
    (full, or over a local window of the last `window_size` steps), then a feed-forward, each pre-normalised, fed
    through a token shift and added back to its input. The output is as long as the input.

    With `compress_factor > 1` the sequence is split axially into `group_size = compress_factor // stride` interleaved
    groups (token `i` in group `i % group_size`, at step `i // group_size` of it): attention, rotary positions and the
    token shift all stay inside a group. Rather than regrouping the tensors, the block keeps tokens in sequence order
    and expresses the groups in the attention mask, so one cache in sequence order serves full forward passes and
    token-by-token decoding alike.

    Attention: full attention is RMS-normalised with rotary/xpos embeddings (scale base 512) over the whole head;
    window attention is LayerNorm-normalised with plain rotary embeddings, each query seeing itself and the
    `window_size` previous steps of its group. `window_size=0` means no attention (feed-forward only).

    Caching: the cache layer at `layer_idx` must hold keys/values and token-shift state ("conv states"): build it
    with `DynamicCache(config=block.config)` (or `StaticCache(config=block.config, max_cache_len=...)`). Its layer
    type is `block.cache_layer_type`: `"hybrid"` (growing keys/values), `"hybrid_sliding"` (keys/values of the last
    `block.sliding_window` tokens, all that a window needs) or `"conv"` (no attention). A model using the block as a
    layer declares those in its config (`layer_types`, `sliding_window`, `number_of_conv_states`).

    Args:
        dim (`int`): width of the input and output.
        dim_head (`int`): width of each attention head.
        heads (`int`): attention heads.
        window_size (`int`, *optional*): local attention window in steps of a group; `None` for full attention, 0 for
            none.
        compress_factor (`int`): a power of two; with `stride`, sets the number of groups.
        stride (`int`): a power of two dividing `compress_factor`; `group_size = compress_factor // stride`.
        ff_mult (`int` or `float`): the feed-forward's inner width is `dim * ff_mult`, an integer.
        attn_implementation (`str`, *optional*, keyword-only): `"sdpa"` (default) or `"eager"`; the results are the
            same. Changeable later through `block.config._attn_implementation`.
        config (`PreTrainedConfig`, *optional*, keyword-only): a model config whose `_attn_implementation` is read at
            every call, for a block used as a layer of that model (then do not give `attn_implementation`).
        layer_idx (`int`, keyword-only): index of this block's layer in a `Cache`.
        xpos_offset (`int`, keyword-only): full attention only: the group step at which the xpos scale is 1. It
            cancels in attention scores (outputs do not depend on it); steps further from it than
            `rotary_emb.max_xpos_distance(dtype)` (2832 in float16, 34561 in float32 and bfloat16) are refused.
        rope_theta (`float`, keyword-only): rotary base.
        hidden_act (`str`, keyword-only): the feed-forward's activation (`"gelu"`, as the reference).
        use_xpos (`bool`, *optional*, keyword-only): xpos scaling of the rotated queries and keys; by default on for
            full attention and off for window attention, as in the reference.
        xpos_scale_base (`int`, keyword-only): xpos scale base (512, as the reference).
        layer_norm_eps (`float`, keyword-only): epsilon of the window attention's LayerNorm.
        own_rotary (`bool`, keyword-only): the block computes its rotary embeddings (`block.rotary_emb`, whose
            frequencies the state dict keeps, as the reference's). A model whose layers share one rotary embedding,
            computed once per forward pass, builds its blocks with `own_rotary=False` and passes
            `position_embeddings`.

    Attention kernels: over more keys than a window needs, window attention with sdpa runs chunk by chunk
    ([`windowed_attention_forward`]), in time and memory linear in the length; a 4-D `attention_mask` and the eager
    implementation (which returns attention probabilities) use the dense mask. Without groups or padding, queries
    that see every key the cache returns (a full-attention prompt from an empty cache, a decoding step of window
    attention from a `DynamicCache`, which keeps just the window) take plain causal attention, without a mask.
    [`create_hierarchical_mask`] makes that choice and builds the mask; a model of such layers calls it once per
    forward pass for all of them.

    Example:
        >>> block = HierarchicalBlock(dim=512, window_size=64, compress_factor=4)
        >>> block(torch.randn(1, 10, 512)).shape
        torch.Size([1, 10, 512])
    Example:
        >>> block = HierarchicalBlock(dim=512, window_size=64, compress_factor=4)
        >>> block(torch.randn(1, 10, 512)).shape
        torch.Size([1, 10, 512])
    """

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        window_size: int | None = None,
        compress_factor: int = 1,
        stride: int = 1,
        ff_mult: float = 4,
        *,
        attn_implementation: str | None = None,
        config: PreTrainedConfig | None = None,
        layer_idx: int = 0,
        xpos_offset: int = 0,
        rope_theta: float = 10000.0,
        hidden_act: str = "gelu",
        use_xpos: bool | None = None,
        xpos_scale_base: int = 512,
        layer_norm_eps: float = 1e-5,
        own_rotary: bool = True,
    ):
        check_positive_ints(dim=dim, dim_head=dim_head, heads=heads, compress_factor=compress_factor, stride=stride)
        if compress_factor & (compress_factor - 1) != 0:
            raise ValueError(f"`compress_factor` must be a power of two (1, 2, 4, ...), got {compress_factor}.")
        if stride > compress_factor or compress_factor % stride != 0:
            raise ValueError(
                f"`stride` must be a power of two no larger than `compress_factor` ({compress_factor}), got {stride}."
            )
        if window_size is not None and (
            isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0
        ):
            raise ValueError(f"`window_size` must be None (full attention) or an integer >= 0, got {window_size!r}.")
        if dim_head % 2 != 0:
            raise ValueError(f"`dim_head` must be even (rotary embeddings rotate feature pairs), got {dim_head}.")
        intermediate_size = round(dim * ff_mult)
        if intermediate_size <= 0 or abs(intermediate_size - dim * ff_mult) > 1e-6:
            raise ValueError(
                f"The feed-forward width `dim * ff_mult` must be a positive integer, got {dim} * {ff_mult!r}."
            )
        use_xpos = window_size is None if use_xpos is None else use_xpos
        # The configuration of a model of `layer_idx + 1` such layers: its cache layout (`layer_types`,
        # `sliding_window`, `number_of_conv_states`) is what `DynamicCache(config=block.config)` reads.
        layer_config = PalmETextConfig(
            block_type="hierarchical",
            hidden_size=dim,
            head_dim=dim_head,
            num_attention_heads=heads,
            intermediate_size=intermediate_size,
            num_hidden_layers=layer_idx + 1,
            window_size=window_size,
            compress_factor=compress_factor,
            stride=stride,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            rope_theta=rope_theta,
            use_xpos=use_xpos,
            xpos_scale_base=xpos_scale_base,
            xpos_offset=xpos_offset,
            add_cross_attention=False,
        )
        layer_config._attn_implementation = block_attn_implementation(attn_implementation, config, default="sdpa")
        super().__init__(layer_config, layer_idx)
        self.config = layer_config
        share_attention_config(self, config)
        self.xpos_offset = xpos_offset
        self.sliding_window = layer_config.sliding_window if window_size is not None else None
        self.rotary_emb = None
        if own_rotary and self.self_attn is not None:
            self.rotary_emb = PalmERotaryEmbedding(
                dim_head, base=rope_theta, use_xpos=use_xpos, xpos_scale_base=xpos_scale_base
            )
            # The reference keeps its rotary frequencies as state (a frozen parameter or a persistent buffer),
            # which a checkpoint carries: keep them in the state dict.
            self.rotary_emb.register_buffer("inv_freq", self.rotary_emb.inv_freq, persistent=True)

    @accept_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: RotaryTables | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, seq_len, dim)`): the input `x`, the tokens after
                those in the cache.
            attention_mask (`torch.Tensor`, *optional*): `(batch_size, past_len + seq_len)` with 1/True for tokens and
                0/False for padding (masked as keys and in the token shift), or a 4-D mask `(batch_size, 1, seq_len,
                kv_len)` (boolean, or additive with 0 = attend) over the keys the cache returns. Either is combined
                with the block's own causal/group/window mask.
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): sequence positions,
                `past_len + arange(seq_len)` by default; rotary embeddings use the step within the group,
                `position_ids // group_size`. Groups and the token shift follow the order of the sequence.
            cache (`Cache`, *optional*): keys/values and token-shift state of earlier steps, at
                `layer_idx` (see the class docstring for the layer type it needs).
            position_embeddings ([`RotaryTables`], *optional*): the rotary tables of `position_ids // group_size`,
                from a [`PalmERotaryEmbedding`] like `block.rotary_emb`, computed once for all layers of a model;
                required with `own_rotary=False`, else computed by the block.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, seq_len, dim)`.
        """
        check_hidden_states("hidden_states", hidden_states, self.hidden_size)
        check_hierarchical_cache(cache, self.layer_idx, self.cache_layer_type)
        batch_size, seq_len = hidden_states.shape[:2]
        token_mask = None
        if attention_mask is not None and attention_mask.ndim == 2:
            if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
                raise ValueError(
                    f"A 2-D `attention_mask` must have shape ({batch_size}, past_len + {seq_len}), got "
                    f"{tuple(attention_mask.shape)}."
                )
            # Padding tokens pass nothing on through the token shift, so outputs at tokens never depend on them.
            token_mask = attention_mask[:, -seq_len:]

        if self.self_attn is not None:
            if position_embeddings is None:
                if self.rotary_emb is None:
                    raise ValueError(
                        "This HierarchicalBlock was built with `own_rotary=False`: pass `position_embeddings` (of "
                        "`position_ids // group_size`)."
                    )
                if position_ids is None:
                    past_seen_tokens = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                    position_ids = torch.arange(seq_len, device=hidden_states.device) + past_seen_tokens
                    position_ids = position_ids.unsqueeze(0).expand(batch_size, -1)
                position_embeddings = self.rotary_emb(
                    position_ids // self.group_size, xpos_offset=self.xpos_offset, dtype=hidden_states.dtype
                )
            attention_mask = self.prepare_attention(hidden_states, attention_mask, cache)
        return super().forward(
            hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            token_mask=token_mask,
            **kwargs,
        )

    def prepare_attention(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Cache | None = None
    ) -> torch.Tensor | WindowedAttentionMask | None:
        """The mask [`create_hierarchical_mask`] prepares for this block's input `hidden_states` `(batch_size,
        seq_len, dim)` after the tokens in `cache`, with `attention_mask` as in [`~HierarchicalBlock.forward`]."""
        return create_hierarchical_mask(
            self.self_attn.config._attn_implementation,
            hidden_states,
            attention_mask,
            cache,
            self.window_size,
            self.group_size,
            self.layer_idx,
        )

    @classmethod
    def from_reference_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **kwargs) -> "HierarchicalBlock":
        """
        Builds the block from the reference's constructor keyword arguments and loads the reference's state dict
        (`torch.save(block.state_dict())` of simple-hierarchical-transformer's `HierarchicalBlock`). See
        [`~conversion_blocks.load_hierarchical_block_reference`].

        Raises:
            `ValueError`: missing, unexpected or wrongly shaped keys.
        """
        return load_hierarchical_block_reference(cls, state_dict, kwargs)
