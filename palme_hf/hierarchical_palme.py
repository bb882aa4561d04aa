"""`HierarchicalBlock` (zeta's documented block; original: `simple_hierarchical_transformer.HierarchicalBlock`) as a
cache-aware Transformers layer. Attention goes through [`PalmEAttention`], rotary embeddings through
[`PalmERotaryEmbedding`]."""

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .blocks_palme import attention_config, check_hidden_states
from .compat_palme import accept_past_key_values
from .configuration_palme import check_positive_ints, hierarchical_cache_layout
from .conversion_blocks import load_hierarchical_block_reference
from .layers_palme import PalmEAttention, PalmEMLP, PalmERotaryEmbedding, RotaryTables, add_bias_to_mask


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


def keys_are_tokens(attention_mask: torch.Tensor, sequence_length: int, key_indices: torch.Tensor) -> torch.Tensor:
    """
    Which keys are tokens, `(batch_size, kv_len)`, from a 2-D padding mask `(batch_size, sequence_length)` over the
    cached and the new tokens; keys beyond it (empty slots of a static cache) count as tokens: they are later than
    every query.
    """
    if attention_mask.shape[-1] != sequence_length:
        raise ValueError(
            f"A 2-D `attention_mask` must cover the cached and the new tokens: length {sequence_length}, "
            f"got shape {tuple(attention_mask.shape)}."
        )
    missing = max(int(key_indices[-1]) + 1 - sequence_length, 0)
    return nn.functional.pad(attention_mask.bool(), (0, missing), value=True)[:, key_indices]


def hierarchical_attention_mask(
    query_indices: torch.Tensor,
    key_indices: torch.Tensor,
    group_size: int,
    window_size: int | None,
    attention_mask: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """
    The additive mask of the block's attention: token `i` attends to token `j` when `j` is in the same group
    (`i - j` a multiple of `group_size`), not later (`j <= i`) and, with a window, at most `window_size` group steps
    back (`i - j <= window_size * group_size`); padding keys (from `attention_mask`) are masked too.

    Args:
        query_indices (`torch.LongTensor` of shape `(seq_len,)`): sequence indices of the queries.
        key_indices (`torch.LongTensor` of shape `(kv_len,)`): sequence indices of the keys the cache returns.
        attention_mask (`torch.Tensor`, *optional*): `(batch_size, past_len + seq_len)` with 1/True for tokens and
            0/False for padding, or a 4-D mask `(batch_size, 1, seq_len, kv_len)`, boolean (True = attend) or additive
            (0 = attend).

    Returns:
        `torch.FloatTensor` of shape `(batch_size or 1, 1, seq_len, kv_len)` in `dtype`: 0 where attending, the
        dtype's minimum elsewhere.
    """
    distance = query_indices[:, None] - key_indices[None, :]
    allowed = (distance >= 0) & (distance % group_size == 0)
    if window_size is not None:
        allowed = allowed & (distance <= window_size * group_size)
    allowed = allowed[None, None]

    if attention_mask is not None:
        if attention_mask.ndim == 2:
            is_token = keys_are_tokens(attention_mask, int(query_indices[-1]) + 1, key_indices)
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


def in_windows(states: torch.Tensor, dim: int, left: int, num_chunks: int, span: int, chunk_size: int) -> torch.Tensor:
    """
    The windows of keys the chunks of queries of [`windowed_attention`] see: `states` along `dim` are at sequence
    indices `left` onwards, counted from `span` before the first query; chunk `c` sees the `chunk_size + span` indices
    from `c * chunk_size` (zeros where `states` hold nothing).

    Returns:
        `torch.Tensor` of shape `(..., num_chunks, chunk_size + span)`: `states` with `dim` moved last, in windows.
    """
    length = span + num_chunks * chunk_size
    states = states.movedim(dim, -1)
    states = nn.functional.pad(states, (left, 0)) if left > 0 else states[..., -left:]
    states = nn.functional.pad(states[..., :length], (0, max(length - states.shape[-1], 0)))
    return states.unfold(-1, chunk_size + span, chunk_size)


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
    The band mask of [`windowed_attention`]: query `i` attends to key `j` when `0 <= i - j <= span`, `i - j` is a
    multiple of `group_size` and `j` is a token the cache holds.

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


def windowed_attention(
    attention: PalmEAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    query_start: int,
    key_start: int,
    span: int,
    chunk_size: int,
    **kwargs: Unpack[TransformersKwargs],
) -> torch.Tensor:
    """
    Banded causal attention in time and memory linear in the sequence length: query `i` attends to key `j` when
    `0 <= i - j <= span` and `i - j` is a multiple of `group_size` (the mask [`hierarchical_attention_mask`] builds
    densely, for `span = window_size * group_size`). The queries are cut into chunks of `chunk_size`; each chunk sees
    the `chunk_size + span` keys ending at its last query, and all chunks go through `attention.attend` (the registered
    kernel and the output projection) as one batch, with one small mask.

    Args:
        query (`torch.FloatTensor` of shape `(batch_size, num_heads, seq_len, head_dim)`): at sequence indices
            `query_start + arange(seq_len)`.
        key, value (`torch.FloatTensor` of shape `(batch_size, num_key_value_heads, kv_len, head_dim)`): at sequence
            indices `key_start + arange(kv_len)`, with `key_start + kv_len >= query_start + seq_len`.
        mask (`torch.FloatTensor` of shape `(batch_size * num_chunks, 1, chunk_size, chunk_size + span)`): from
            [`windowed_attention_mask`].

    Returns:
        `torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`, the attention's output.
    """
    batch_size, _, seq_len, _ = query.shape
    num_chunks = -(-seq_len // chunk_size)
    padded_len = num_chunks * chunk_size
    # keys at sequence indices `query_start - span` to `query_start + padded_len`: positions the cache does not hold
    # are zeros and masked
    left = key_start - (query_start - span)

    def batched_windows(states: torch.Tensor) -> torch.Tensor:
        # (batch, heads, kv_len, head_dim) -> (batch * num_chunks, heads, window, head_dim)
        # contiguous: with a strided last dimension (a view of the unfolded windows) sdpa falls back to its math kernel
        windows = in_windows(states, 2, left, num_chunks, span, chunk_size).permute(0, 3, 1, 4, 2).contiguous()
        return windows.view(batch_size * num_chunks, states.shape[1], chunk_size + span, states.shape[-1])

    chunked_query = nn.functional.pad(query, (0, 0, 0, padded_len - seq_len))
    chunked_query = chunked_query.unflatten(2, (num_chunks, chunk_size)).transpose(1, 2).flatten(0, 1)
    output, _ = attention.attend(chunked_query, batched_windows(key), batched_windows(value), mask, **kwargs)
    return output.reshape(batch_size, padded_len, -1)[:, :seq_len]


class HierarchicalAttentionMask(NamedTuple):
    """
    The attention mask of one forward pass of hierarchical blocks, from [`HierarchicalBlock.prepare_attention`]. The
    blocks of a model share window, group size and cache layout, so the model prepares it once for all its layers. A
    named tuple, so that accelerate moves its mask to each layer's device as it moves the other inputs.

    Attributes:
        mask (`torch.FloatTensor`, *optional*): additive (0 = attend): for the dense kernel, of shape
            `(batch_size or 1, 1, seq_len, kv_len)` over the keys the cache returns; for the windowed kernel, the band
            mask of [`windowed_attention_mask`]; `None` for plain causal attention.
        windowed (`bool`): whether the chunked window kernel [`windowed_attention`] runs.
        query_start (`int`): windowed kernel: sequence index of the first query (the tokens the cache held before).
        key_start (`int`): windowed kernel: sequence index of the first key the cache returns.
    """

    mask: torch.Tensor | None
    windowed: bool = False
    query_start: int = 0
    key_start: int = 0


class HierarchicalBlock(GradientCheckpointingLayer):
    """
    The block of the simple hierarchical transformer (zeta's `HierarchicalBlock`, whose original is
    `simple_hierarchical_transformer.HierarchicalBlock`): causal attention (full, or over a local window of the last
    `window_size` steps), then a feed-forward, each pre-normalised, fed through a token shift and added back to its
    input. The output is as long as the input.

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

    Attention kernels: over more keys than a window needs, window attention runs chunk by chunk
    ([`windowed_attention`]), in time and memory linear in the length; a 4-D `attention_mask` and the eager
    implementation (which returns attention probabilities) use the dense mask. Without groups or padding, queries
    that see every key the cache returns (a full-attention prompt from an empty cache, a decoding step of window
    attention from a `DynamicCache`, which keeps just the window) take plain causal attention, without a mask.
    [`~HierarchicalBlock.prepare_attention`] makes that choice and builds the mask; a model of such blocks does it
    once per forward pass and passes the result to every block (`hierarchical_mask`).

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
        super().__init__()
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

        self.hidden_size = dim
        self.window_size = window_size
        self.group_size = compress_factor // stride
        self.layer_idx = layer_idx
        self.xpos_offset = xpos_offset
        self.has_attention = window_size != 0
        # distance, in tokens, from a query to the farthest key it sees; window attention runs in chunks of queries
        self.attention_span = None if window_size is None else window_size * self.group_size
        self.chunk_size = None if window_size is None else max(self.attention_span, 64)
        self.cache_layer_type, self.sliding_window, self.num_token_shift_states = hierarchical_cache_layout(
            window_size, compress_factor, stride
        )

        self.config = attention_config(attn_implementation, config, default="sdpa")
        if config is None:
            # The cache layout of a model of `layer_idx + 1` such blocks, for `DynamicCache(config=block.config)`.
            self.config.num_hidden_layers = layer_idx + 1
            self.config.layer_types = [self.cache_layer_type] * (layer_idx + 1)
            self.config.sliding_window = self.sliding_window
            self.config.number_of_conv_states = self.num_token_shift_states

        self.self_attn_norm = None
        self.rotary_emb = None
        self.self_attn = None
        if self.has_attention:
            is_full_attention = window_size is None
            self.self_attn_norm = (
                HierarchicalRMSNorm(dim) if is_full_attention else nn.LayerNorm(dim, eps=layer_norm_eps)
            )
            if own_rotary:
                self.rotary_emb = PalmERotaryEmbedding(
                    dim_head,
                    base=rope_theta,
                    use_xpos=is_full_attention if use_xpos is None else use_xpos,
                    xpos_scale_base=xpos_scale_base,
                )
                # The reference keeps its rotary frequencies as state (a frozen parameter or a persistent buffer),
                # which a checkpoint carries: keep them in the state dict.
                self.rotary_emb.register_buffer("inv_freq", self.rotary_emb.inv_freq, persistent=True)
            self.self_attn = PalmEAttention(
                self.config, hidden_size=dim, num_heads=heads, head_dim=dim_head, is_causal=True, layer_idx=layer_idx
            )
        self.mlp_norm = HierarchicalRMSNorm(dim)
        self.mlp = PalmEMLP(dim, intermediate_size, hidden_act, bias=False)

    @accept_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: RotaryTables | None = None,
        hierarchical_mask: HierarchicalAttentionMask | None = None,
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
            hierarchical_mask ([`HierarchicalAttentionMask`], *optional*): the attention mask
                [`~HierarchicalBlock.prepare_attention`] builds from `hidden_states`, `attention_mask` and `cache`,
                prepared once for all layers of a model; else the block prepares it.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, seq_len, dim)`.
        """
        check_hidden_states("hidden_states", hidden_states, self.hidden_size)
        self.check_cache(cache)
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
            if hierarchical_mask is None:
                hierarchical_mask = self.prepare_attention(hidden_states, attention_mask, cache)
            shifted = token_shift(hidden_states, self.group_size, token_mask, cache, self.layer_idx, state_idx=0)
            hidden_states = hidden_states + self.self_attention(
                self.self_attn_norm(shifted), position_embeddings, hierarchical_mask, cache, **kwargs
            )

        shifted = token_shift(
            hidden_states, self.group_size, token_mask, cache, self.layer_idx, self.num_token_shift_states - 1
        )
        return hidden_states + self.mlp(self.mlp_norm(shifted))

    def check_cache(self, cache: Cache | None):
        """Refuses a cache whose layer `layer_idx` cannot hold the block's token-shift state."""
        cache_layer = None
        if cache is not None and self.layer_idx < len(cache.layers):
            cache_layer = cache.layers[self.layer_idx]
        if cache is not None and not isinstance(cache_layer, LinearAttentionCacheLayerMixin):
            layer = "no layer" if cache_layer is None else type(cache_layer).__name__
            raise ValueError(
                f"HierarchicalBlock keeps token-shift state in the cache: its layer {self.layer_idx} must be of type "
                f"{self.cache_layer_type!r} (build the cache with `DynamicCache(config=block.config)`), got {layer}."
            )

    def prepare_attention(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Cache | None = None
    ) -> HierarchicalAttentionMask | None:
        """
        The attention mask of the kernel that fits (see the class docstring), for the block's input `hidden_states`
        `(batch_size, seq_len, dim)` after the tokens in `cache`, with `attention_mask` as in
        [`~HierarchicalBlock.forward`]. Blocks of one window, group size and cache layout share it: a model of such
        blocks prepares it once per forward pass and passes it to each as `hierarchical_mask`.

        Returns:
            [`HierarchicalAttentionMask`], or `None` for a block without attention (`window_size=0`).
        """
        if self.self_attn is None:
            return None
        self.check_cache(cache)
        batch_size, seq_len = hidden_states.shape[:2]
        past_seen_tokens = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        kv_length, kv_offset = (seq_len, 0) if cache is None else cache.get_mask_sizes(seq_len, self.layer_idx)
        padding_mask = attention_mask is not None and attention_mask.ndim == 2
        # A compiled graph keeps the dense mask: the shortcuts below branch on the cache's fill.
        compiling = torch.compiler.is_compiling()
        if (
            not compiling
            and self.window_size is not None
            and kv_length > self.chunk_size + self.attention_span
            and (attention_mask is None or padding_mask)
            and self.config._attn_implementation != "eager"
        ):
            key_indices = torch.arange(kv_length, device=hidden_states.device) + kv_offset
            mask = windowed_attention_mask(
                batch_size,
                seq_len,
                kv_length,
                query_start=past_seen_tokens,
                key_start=kv_offset,
                span=self.attention_span,
                group_size=self.group_size,
                chunk_size=self.chunk_size,
                key_is_token=(
                    keys_are_tokens(attention_mask, past_seen_tokens + seq_len, key_indices) if padding_mask else None
                ),
                dtype=hidden_states.dtype,
                device=hidden_states.device,
            )
            return HierarchicalAttentionMask(mask, windowed=True, query_start=past_seen_tokens, key_start=kv_offset)

        if (
            not compiling
            and self.group_size == 1
            and kv_offset + kv_length == past_seen_tokens + seq_len  # no empty static-cache slots
            # causal attention without a mask is aligned at the start: one query, or no past
            and (seq_len == 1 or kv_length == seq_len)
            and (self.window_size is None or kv_length - 1 <= self.attention_span)
            and (attention_mask is None or (padding_mask and attention_mask.all()))
        ):
            return HierarchicalAttentionMask(None)  # every key the query sees, causally: what every kernel does
        query_indices = torch.arange(seq_len, device=hidden_states.device) + past_seen_tokens
        key_indices = torch.arange(kv_length, device=hidden_states.device) + kv_offset
        mask = hierarchical_attention_mask(
            query_indices, key_indices, self.group_size, self.window_size, attention_mask, hidden_states.dtype
        )
        return HierarchicalAttentionMask(mask)

    def self_attention(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: RotaryTables,
        hierarchical_mask: HierarchicalAttentionMask,
        cache: Cache | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """The attention branch on the normalised, shifted `hidden_states` `(batch_size, seq_len, dim)`, with the
        kernel and mask `hierarchical_mask` prepared."""
        if hierarchical_mask.windowed:
            query, key, value = self.self_attn.project(hidden_states, position_embeddings, cache)
            return windowed_attention(
                self.self_attn,
                query,
                key,
                value,
                hierarchical_mask.mask,
                query_start=hierarchical_mask.query_start,
                key_start=hierarchical_mask.key_start,
                span=self.attention_span,
                chunk_size=self.chunk_size,
                **kwargs,
            )
        attn_output, _ = self.self_attn(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=hierarchical_mask.mask,
            cache=cache,
            **kwargs,
        )
        return attn_output

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
