"""The attention core shared by every PalmE layer and block: rotary embeddings with xpos, ALiBi, query/key
normalisation, multi-head or multi-query attention, self- or cross-attention, through Transformers' attention
function registry and `Cache` classes."""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs


class RotaryTables(NamedTuple):
    """
    The rotary embeddings of a forward pass's positions, computed once for every layer: `cos` and `sin` of the
    angles, each of shape `(batch_size, 1, seq_len, rotary_dim)`, with the sign of the rotation folded into `sin`
    (its first half negated) and, with xpos, the scale folded into both (queries take `cos * scale`, `sin * scale`;
    keys, and values with `rotate_values`, `cos / scale`, `sin / scale`; without xpos both pairs are the same
    tensors).
    """

    query_cos: torch.Tensor
    query_sin: torch.Tensor
    key_cos: torch.Tensor
    key_sin: torch.Tensor


class PalmERotaryEmbedding(nn.Module):
    """
    Rotary position embedding over the first `rotary_dim` features of each head, with optional xpos scaling.

    The xpos factor of position `p` is `scale ** ((p - xpos_offset) / xpos_scale_base)` per frequency, with `scale` in
    `[2/7, 1)`: queries are multiplied by it and keys (and, with `rotate_values`, values) by its inverse, so the score
    of query `i` and key `j` carries `scale ** ((i - j) / xpos_scale_base)`, a decay with distance in which the offset
    cancels. The offset is kept fixed (rather than tied to the sequence length) so that outputs are prefix-consistent
    and a cache reproduces full recomputation.

    Long positions: angles and xpos exponents are computed in float64 (in float32, `position * inv_freq` is off by up
    to 4e-3 rad at position 64k), and casting the module to half precision leaves the frequencies as they are. The
    xpos factors themselves are exponential in `|p - xpos_offset|`: the first frequency's is `3.5 ** (|p - xpos_offset|
    / xpos_scale_base)` (or its inverse), 2**226 at 64k positions, beyond float32. A pass cannot choose its own offset
    nearer its positions: cached keys keep the factors of the offset they were written with, and with `rotate_values`
    the offset is part of the model. So xpos works within `max_xpos_distance(dtype)` positions of the offset, over
    forward passes spanning at most as many positions; beyond, the forward pass raises a `ValueError`. Plain rotary
    embeddings have no limit.

    Args:
        rotary_dim (`int`): number of rotated features of each head.
        base (`float`): rotary base.
        use_xpos (`bool`): xpos scaling.
        xpos_scale_base (`float`): xpos scale base.
        rotate_values (`bool`): the values are rotated and scaled too (it lowers the xpos limit in bfloat16 and
            float32).
    """

    def __init__(
        self,
        rotary_dim: int,
        base: float = 10000.0,
        use_xpos: bool = False,
        xpos_scale_base: float = 512.0,
        rotate_values: bool = False,
    ):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.use_xpos = use_xpos
        self.xpos_scale_base = xpos_scale_base
        self.rotate_values = rotate_values
        self.base = base
        inv_freq, xpos_scale = self.compute_buffers()
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.xpos_scale = nn.Buffer(xpos_scale, persistent=False)

    def compute_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse frequencies and the per-frequency xpos scales, each of shape `(rotary_dim // 2,)`."""
        half = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32)
        inv_freq = 1.0 / (self.base ** (half / self.rotary_dim))
        xpos_scale = (half + 0.4 * self.rotary_dim) / (1.4 * self.rotary_dim)
        return inv_freq, xpos_scale

    def _apply(self, fn, recurse=True):
        # Casting the module (`model.to(torch.bfloat16)`, `.half()`) moves the frequencies and xpos scales but keeps
        # their precision: rounded to bfloat16, angles at position 64k would be off by up to 28 rad.
        buffers = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in buffers.items():
            if self._buffers[name].dtype.itemsize < buffer.dtype.itemsize:
                self._buffers[name] = buffer.to(self._buffers[name].device)
        return self

    def max_xpos_distance(self, dtype: torch.dtype) -> int:
        """
        How far from `xpos_offset` rotary positions may be, and how many positions one forward pass may span, for xpos
        to stay finite and accurate in `dtype`: with `xpos_scale_base=512`, 2832 in float16, 34561 in bfloat16 and
        float32 (8640 with `rotate_values`).

        Every factor and its inverse stay within `[16 * tiny, 1 / (16 * tiny)]` (`tiny`: the smallest normal number of
        `dtype`, whose largest finite number is about `4 / tiny`), which leaves room for the features they multiply.
        So does the factor a masked attention score carries, a query's times a later key's: that of the distance
        between the two, hence the bound on the span. With `rotate_values` the values bring the factor into the hidden
        states, whose squares LayerNorm sums in float32 (in float64 for float64 states): there it also stays within
        the fourth root of that range.
        """
        largest_log_factor = -math.log(16 * torch.finfo(dtype).tiny)
        if self.rotate_values:
            norm_dtype = torch.promote_types(dtype, torch.float32)
            largest_log_factor = min(largest_log_factor, -math.log(16 * torch.finfo(norm_dtype).tiny) / 4)
        # the first frequency has the smallest scale, 0.4 / 1.4, hence the largest factors
        return int(self.xpos_scale_base * largest_log_factor / math.log(1.4 / 0.4))

    def check_xpos_positions(self, position_ids: torch.Tensor, xpos_offset: int, dtype: torch.dtype) -> None:
        """
        Raises a `ValueError` for rotary positions farther than `max_xpos_distance(dtype)` from `xpos_offset`, or
        spanning more than that.
        """
        first, last = torch.stack((position_ids.min(), position_ids.max())).tolist()
        farthest = first if xpos_offset - first > last - xpos_offset else last
        limit = self.max_xpos_distance(dtype)
        if abs(farthest - xpos_offset) > limit:
            raise ValueError(
                f"Rotary position {farthest} is {abs(farthest - xpos_offset)} positions from the xpos offset "
                f"({xpos_offset}); xpos factors grow exponentially with that distance and in {dtype} stay usable "
                f"within {limit} positions of the offset. Set `xpos_offset` near the middle of the sequence's "
                "positions (without `rotate_values`, outputs do not depend on it), use a wider dtype or turn xpos off."
            )
        if last - first > limit:
            raise ValueError(
                f"The rotary positions of this forward pass span {first} to {last}, {last - first} apart; in {dtype}, "
                f"xpos keeps masked attention scores finite over at most {limit} positions. Feed the sequence in "
                "shorter chunks through the cache, use a wider dtype or turn xpos off."
            )

    def xpos_positions_fit(self, first: int, last: int, xpos_offset: int, dtype: torch.dtype) -> bool:
        """Whether every position from `first` to `last` is within `max_xpos_distance(dtype)` of `xpos_offset`: a
        bound a model knows without reading its positions, so that a decoding step need not check them."""
        limit = self.max_xpos_distance(dtype)
        return xpos_offset - limit <= first and last <= xpos_offset + limit

    @torch.no_grad()
    def forward(
        self,
        position_ids: torch.Tensor,
        xpos_offset: int = 0,
        dtype: torch.dtype = torch.float32,
        check_positions: bool = True,
    ) -> RotaryTables:
        """
        Args:
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): positions of the tokens.
            xpos_offset (`int`): the position at which the xpos scale is 1.
            dtype (`torch.dtype`): the dtype of the states to rotate (under autocast, the autocast dtype is used); it
                bounds the xpos positions.
            check_positions (`bool`): with xpos, check the positions against that bound, which reads them on the
                host; a model that knows them to be within it (`xpos_positions_fit`) skips it.

        Returns:
            [`RotaryTables`] of shape `(batch_size, 1, seq_len, rotary_dim)`, in float32 (float64 for float64 states),
            the dtype [`apply_rotary_pos_emb`] rotates in.

        Raises:
            `ValueError`: with xpos, positions farther than `max_xpos_distance(dtype)` from `xpos_offset` or spanning
            more than that (not checked while compiling).
        """
        device_type = position_ids.device.type
        if torch.is_autocast_enabled(device_type):
            # the projections give queries, keys and values in the autocast dtype
            dtype = torch.get_autocast_dtype(device_type)
        if self.use_xpos and check_positions and not torch.compiler.is_compiling():
            self.check_xpos_positions(position_ids, xpos_offset, dtype)
        # MPS has no float64
        precise_dtype = torch.float32 if device_type == "mps" else torch.float64
        output_dtype = torch.promote_types(dtype, torch.float32)
        positions = position_ids[:, None, :, None].to(precise_dtype)
        freqs = positions * self.inv_freq.to(position_ids.device, precise_dtype)
        cos, sin = freqs.cos(), freqs.sin()
        # rotate_half(x) * sin == roll(x, rotary_dim // 2) * (-sin, sin): the sign goes into the table
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        if not self.use_xpos:
            cos, sin = cos.to(output_dtype), sin.to(output_dtype)
            return RotaryTables(cos, sin, cos, sin)
        power = (positions - xpos_offset) / self.xpos_scale_base
        scale = self.xpos_scale.to(position_ids.device, precise_dtype) ** power
        scale = torch.cat((scale, scale), dim=-1)
        return RotaryTables(
            (cos * scale).to(output_dtype),
            (sin * scale).to(output_dtype),
            (cos / scale).to(output_dtype),
            (sin / scale).to(output_dtype),
        )


def apply_rotary_pos_emb(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    Rotates the first `cos.shape[-1]` features of `states` `(batch, heads, seq_len, head_dim)` by one pair of
    [`RotaryTables`]: `x * cos + rotate_half(x) * sin`, with `rotate_half((x1, x2)) = (-x2, x1)` taken as a roll of
    the halves, whose sign `sin` carries. The other features pass through. Computed in the dtype of `cos` (float32,
    or float64 for float64 states), returned in the dtype of `states`.
    """
    rotary_dim = cos.shape[-1]
    partial = rotary_dim != states.shape[-1]
    rotated = (states[..., :rotary_dim] if partial else states).to(cos.dtype)
    rotated = torch.addcmul(rotated * cos, rotated.roll(rotary_dim // 2, dims=-1), sin).to(states.dtype)
    return torch.cat((rotated, states[..., rotary_dim:]), dim=-1) if partial else rotated


def alibi_slopes(num_alibi_heads: int, num_heads: int) -> torch.Tensor:
    """ALiBi slopes for the first `num_alibi_heads` heads (the geometric series of the ALiBi paper), 0 for the rest."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start**i for i in range(1, n + 1)]

    slopes = []
    if num_alibi_heads > 0:
        if math.log2(num_alibi_heads).is_integer():
            slopes = power_of_two_slopes(num_alibi_heads)
        else:
            closest = 2 ** math.floor(math.log2(num_alibi_heads))
            extra = power_of_two_slopes(2 * closest)[0::2][: num_alibi_heads - closest]
            slopes = power_of_two_slopes(closest) + extra
    return torch.tensor(slopes + [0.0] * (num_heads - num_alibi_heads), dtype=torch.float32)


class PalmEAlibiBias(nn.Module):
    """ALiBi: a bias of `-slope * |i - j|` between query `i` and key `j` on the first `num_alibi_heads` heads."""

    def __init__(self, num_alibi_heads: int, num_heads: int):
        super().__init__()
        self.num_alibi_heads = num_alibi_heads
        self.num_heads = num_heads
        self.slopes = nn.Buffer(alibi_slopes(num_alibi_heads, num_heads), persistent=False)

    def forward(self, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
        """
        Args:
            query_positions (`torch.LongTensor` of shape `(query_length,)`): cache indices of the queries.
            key_length (`int`): number of keys (cache indices `0 .. key_length - 1`).

        Returns:
            `torch.FloatTensor` of shape `(1, num_heads, query_length, key_length)`.
        """
        key_positions = torch.arange(key_length, device=query_positions.device)
        distance = (query_positions[:, None] - key_positions[None, :]).abs().to(torch.float32)
        return -(self.slopes.to(query_positions.device)[:, None, None] * distance).unsqueeze(0)


def add_bias_to_mask(attention_mask: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """
    Folds an additive bias (batch or 1, heads, query_length, key_length) into a boolean (True = attend) or additive
    float attention mask, giving an additive float mask in `dtype` that every attention implementation accepts.
    """
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask == 0
    min_value = torch.finfo(dtype).min
    return torch.where(allowed, bias.to(dtype), torch.tensor(min_value, dtype=dtype, device=bias.device))


class PalmEQKNorm(nn.Module):
    """l2-normalisation of each head's features with a learned per-feature gain (cosine-similarity attention)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Queries or keys `(..., head_dim)`, l2-normalised per head and scaled by the gains; the same shape."""
        return nn.functional.normalize(states, dim=-1) * self.weight


def split_cache(cache: Cache | None) -> tuple[Cache | None, EncoderDecoderCache | None]:
    """
    The one place a cache is taken apart: its self-attention part, and its cross-attention part (the
    `EncoderDecoderCache` itself, whose `cross_attention_cache` holds the image keys/values and whose `is_updated` says
    which layers hold them), `None` for a cache without one.
    """
    if isinstance(cache, EncoderDecoderCache):
        return cache.self_attention_cache, cache
    return cache, None


def image_is_cached(cache: EncoderDecoderCache | None, layer_idx: int) -> bool:
    """Whether the cross-attention part `cache` holds the image keys/values of layer `layer_idx`."""
    return cache is not None and cache.is_updated.get(layer_idx, False)


def local_out_features(linear: nn.Linear) -> int:
    """The output features `linear` computes on this rank: its shard of them when tensor parallelism splits it."""
    # A split weight is a DTensor; testing for its `to_local` rather than with `is_dtensor` keeps torch.compile quiet.
    return linear.weight.to_local().shape[0] if hasattr(linear.weight, "to_local") else linear.out_features


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention; keys and values may have fewer heads than queries (multi-query / grouped attention). The
    mask, prepared by the model, is additive or boolean (True = attend)."""
    if module.num_key_value_groups > 1:
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)
        value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(attention_mask, dtype=attn_weights.dtype).masked_fill(
                ~attention_mask, torch.finfo(attn_weights.dtype).min
            )
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class WindowedAttentionMask(NamedTuple):
    """
    The mask of [`windowed_attention_forward`], which a model prepares once per forward pass when banded causal
    attention over many keys runs chunk by chunk (the hierarchical block's window attention): query `i` attends to key
    `j` when `0 <= i - j <= span` and `i - j` is a multiple of the group size. A named tuple, so that accelerate moves
    its mask to each layer's device as it moves the other inputs.

    Attributes:
        mask (`torch.FloatTensor` of shape `(batch_size * num_chunks, 1, chunk_size, chunk_size + span)`): additive
            (0 = attend), the band of each chunk of queries over the keys it sees.
        query_start (`int`): sequence index of the first query (the tokens the cache held before).
        key_start (`int`): sequence index of the first key the cache returns.
        span (`int`): distance, in tokens, from a query to the farthest key it sees.
        chunk_size (`int`): queries per chunk.
    """

    mask: torch.Tensor
    query_start: int
    key_start: int
    span: int
    chunk_size: int


def in_windows(states: torch.Tensor, dim: int, left: int, num_chunks: int, span: int, chunk_size: int) -> torch.Tensor:
    """
    The windows of keys the chunks of queries of [`windowed_attention_forward`] see: `states` along `dim` are at
    sequence indices `left` onwards, counted from `span` before the first query; chunk `c` sees the
    `chunk_size + span` indices from `c * chunk_size` (zeros where `states` hold nothing).

    Returns:
        `torch.Tensor` of shape `(..., num_chunks, chunk_size + span)`: `states` with `dim` moved last, in windows.
    """
    length = span + num_chunks * chunk_size
    states = states.movedim(dim, -1)
    states = nn.functional.pad(states, (left, 0)) if left > 0 else states[..., -left:]
    states = nn.functional.pad(states[..., :length], (0, max(length - states.shape[-1], 0)))
    return states.unfold(-1, chunk_size + span, chunk_size)


def windowed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: WindowedAttentionMask,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """
    Banded causal attention in time and memory linear in the sequence length, with the signature of Transformers'
    attention functions: the queries are cut into chunks of `chunk_size`; each chunk sees the `chunk_size + span` keys
    ending at its last query, and all chunks go through the sdpa function of Transformers' registry as one batch,
    with one small mask.

    Args:
        query (`torch.FloatTensor` of shape `(batch_size, num_heads, seq_len, head_dim)`): at sequence indices
            `query_start + arange(seq_len)`.
        key, value (`torch.FloatTensor` of shape `(batch_size, num_key_value_heads, kv_len, head_dim)`): at sequence
            indices `key_start + arange(kv_len)`, with `key_start + kv_len >= query_start + seq_len`.
        attention_mask ([`WindowedAttentionMask`]): the band and the layout of the chunks.

    Returns:
        The output `(batch_size, seq_len, num_heads, head_dim)`, as Transformers' attention functions return it, and
        `None` for the attention probabilities.
    """
    mask, query_start, key_start, span, chunk_size = attention_mask
    batch_size, num_heads, seq_len, head_dim = query.shape
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
    output, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](
        module, chunked_query, batched_windows(key), batched_windows(value), mask, **kwargs
    )
    output = output.reshape(batch_size, padded_len, num_heads, head_dim)[:, :seq_len]
    return output, None


class PalmEAttention(nn.Module):
    """
    Self-attention, causal or not, of every PalmE layer and block: `num_heads` query heads and `num_key_value_heads`
    key/value heads (1 = multi-query), optional query/key l2-normalisation, rotary (xpos) embeddings on the first
    features of queries and keys (and of values, with `rotate_values`), keys/values kept in a Transformers `Cache`,
    and the kernel looked up in Transformers' attention-function registry at each call.

    Args:
        config: the model configuration; only its attention implementation (`config._attn_implementation`) is read.
        hidden_size (`int`): width of the input (the queries' input).
        num_heads (`int`): query heads.
        head_dim (`int`): width of each head.
        num_key_value_heads (`int`, *optional*): key/value heads, `num_heads` by default.
        key_value_size (`int`, *optional*): width of the key/value input, `hidden_size` by default.
        is_causal (`bool`): causal attention.
        qk_norm (`bool`): l2-normalise queries and keys, with learned gains; the scale is then `qk_norm_scale`.
        rotate_values (`bool`): also rotate the values (the zeta reference's behaviour).
        attention_dropout (`float`): dropout on attention probabilities while training.
        layer_idx (`int`, *optional*): the index of this layer in the cache.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        num_key_value_heads: int | None = None,
        key_value_size: int | None = None,
        is_causal: bool = True,
        qk_norm: bool = False,
        qk_norm_scale: float = 10.0,
        rotate_values: bool = False,
        attention_dropout: float = 0.0,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_key_value_heads = num_heads if num_key_value_heads is None else num_key_value_heads
        self.is_causal = is_causal
        self.rotate_values = rotate_values
        self.attention_dropout = attention_dropout
        self.layer_idx = layer_idx
        self.scaling = qk_norm_scale if qk_norm else head_dim**-0.5
        key_value_size = hidden_size if key_value_size is None else key_value_size

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(key_value_size, self.num_key_value_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(key_value_size, self.num_key_value_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = PalmEQKNorm(head_dim) if qk_norm else None
        self.k_norm = PalmEQKNorm(head_dim) if qk_norm else None

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head, on this rank: tensor parallelism splits the query heads, and the key/value
        heads too unless a single one is kept whole (multi-query attention)."""
        return local_out_features(self.q_proj) // local_out_features(self.k_proj)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: RotaryTables | None = None,
        attention_mask: torch.Tensor | WindowedAttentionMask | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`): the input.
            position_embeddings ([`RotaryTables`], *optional*): from [`PalmERotaryEmbedding`], computed once per
                forward pass.
            attention_mask (`torch.Tensor` or [`WindowedAttentionMask`], *optional*): the mask the model prepared:
                boolean (True = attend) or additive float, broadcastable to `(batch_size, num_heads, seq_len,
                kv_len)`; or the band of the chunked window kernel.
            cache (`Cache`, *optional*): self-attention keys/values of earlier steps, updated at `layer_idx`.

        Returns:
            The output `(batch_size, seq_len, hidden_size)` and the attention probabilities (eager only, else `None`).
        """
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.q_norm is not None:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)

        if position_embeddings is not None:
            query_states = apply_rotary_pos_emb(
                query_states, position_embeddings.query_cos, position_embeddings.query_sin
            )
            key_states = apply_rotary_pos_emb(key_states, position_embeddings.key_cos, position_embeddings.key_sin)
            if self.rotate_values:
                value_states = apply_rotary_pos_emb(
                    value_states, position_embeddings.key_cos, position_embeddings.key_sin
                )

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if isinstance(attention_mask, WindowedAttentionMask):
            # the model chose the chunked window kernel for this pass (sdpa only): it calls sdpa chunk by chunk
            attention_interface = windowed_attention_forward

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class PalmECrossAttention(nn.Module):
    """
    Cross-attention: queries from `hidden_states` (the text, or a Perceiver's latents), keys and values from the
    context (the image features). In an `EncoderDecoderCache` the context's keys/values are computed on the pass that
    gives the context (replacing any held before) and read back on passes that do not (a Python-level flag, so
    `torch.compile` traces a prefill graph and a decoding graph without breaks).

    Args:
        config: the model configuration; only its attention implementation (`config._attn_implementation`) is read.
        hidden_size (`int`): width of the queries' input.
        num_heads (`int`): attention heads.
        head_dim (`int`): width of each head.
        key_value_size (`int`, *optional*): width of the context, `hidden_size` by default.
        qk_norm (`bool`): l2-normalise queries and keys, with learned gains; the scale is then `qk_norm_scale`.
        attention_dropout (`float`): dropout on attention probabilities while training.
        layer_idx (`int`, *optional*): the index of this layer in the cache.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        key_value_size: int | None = None,
        qk_norm: bool = False,
        qk_norm_scale: float = 10.0,
        attention_dropout: float = 0.0,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.is_causal = False
        self.attention_dropout = attention_dropout
        self.layer_idx = layer_idx
        self.scaling = qk_norm_scale if qk_norm else head_dim**-0.5
        key_value_size = hidden_size if key_value_size is None else key_value_size

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(key_value_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(key_value_size, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = PalmEQKNorm(head_dim) if qk_norm else None
        self.k_norm = PalmEQKNorm(head_dim) if qk_norm else None

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head on this rank: 1, the context has as many heads as the queries."""
        return local_out_features(self.q_proj) // local_out_features(self.k_proj)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`): the queries' input.
            key_value_states (`torch.FloatTensor` of shape `(batch_size, kv_len, key_value_size)`, *optional*): the
                keys' (and values') input; may be omitted once the cache holds their keys/values.
            value_states (`torch.FloatTensor` of shape `(batch_size, kv_len, key_value_size)`, *optional*): the
                values' input, when it differs from the keys' input.
            attention_mask (`torch.Tensor`, *optional*): boolean (True = attend) or additive float mask over the
                context, broadcastable to `(batch_size, num_heads, seq_len, kv_len)`.
            cache (`EncoderDecoderCache`, *optional*): its `cross_attention_cache` holds the context's keys/values at
                `layer_idx`, and its `is_updated` says whether they are there.

        Returns:
            The output `(batch_size, seq_len, hidden_size)` and the attention probabilities (eager only, else `None`).
        """
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            query_states = self.q_norm(query_states)

        if key_value_states is not None:
            value_states = key_value_states if value_states is None else value_states
            context_shape = (*key_value_states.shape[:-1], -1, self.head_dim)
            key_states = self.k_proj(key_value_states).view(context_shape).transpose(1, 2)
            if self.k_norm is not None:
                key_states = self.k_norm(key_states)
            value_states = self.v_proj(value_states).view(context_shape).transpose(1, 2)
            if cache is not None:
                if image_is_cached(cache, self.layer_idx):
                    # a context given with a cache that holds one replaces it: never attend to a stale image
                    cache.cross_attention_cache.layers[self.layer_idx].reset()
                key_states, value_states = cache.cross_attention_cache.update(key_states, value_states, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        elif image_is_cached(cache, self.layer_idx):
            key_states = cache.cross_attention_cache.layers[self.layer_idx].keys
            value_states = cache.cross_attention_cache.layers[self.layer_idx].values
        else:
            raise ValueError(
                "Cross-attention needs `key_value_states` (the image features) when the cache holds none: "
                "pass `pixel_values` on the first forward pass."
            )

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class PalmETextCrossAttention(nn.Module):
    """Pre-norm cross-attention from the text to the image features, with its residual: the part of a decoder layer
    (of every block type) that sees the image when `config.add_cross_attention`."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = PalmECrossAttention(
            config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            key_value_size=config.cross_attention_hidden_size,
            qk_norm=config.qk_norm,
            qk_norm_scale=config.qk_norm_scale,
            attention_dropout=config.attention_dropout,
            layer_idx=layer_idx,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        cache: EncoderDecoderCache | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """
        `hidden_states` (batch_size, seq_len, hidden_size) attend to `encoder_hidden_states` (batch_size,
        num_image_tokens, cross_attention_hidden_size), or to their keys/values in the cross-attention part `cache`.
        With neither (a text-only forward pass) the layer is skipped, as Mllama skips its cross-attention layers.
        """
        if encoder_hidden_states is None and not image_is_cached(cache, self.attention.layer_idx):
            return hidden_states
        attn_output, _ = self.attention(
            self.layer_norm(hidden_states), key_value_states=encoder_hidden_states, cache=cache, **kwargs
        )
        return hidden_states + attn_output


class PalmEMLP(nn.Module):
    """
    The feed-forward of every PalmE layer and block. Plain: `fc2(dropout(act(fc1(x))))`; gated (PaLM's SwiGLU, with
    `hidden_act="silu"`): `down_proj(dropout(act(gate_proj(x)) * up_proj(x)))`.

    Args:
        hidden_size (`int`): width of the input and output.
        intermediate_size (`int`): width of the inner layer.
        hidden_act (`str`): the activation (of the gate, when gated), a key of Transformers' `ACT2FN`.
        bias (`bool`): biases in the linear layers.
        gated (`bool`): a gated linear unit (`gate_proj`, `up_proj`, `down_proj`) rather than `fc1`, `fc2`.
        dropout (`float`): dropout on the inner activations while training.
        output_dropout (`bool`): the same dropout on the output too (the Perceiver layer's feed-forward).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "gelu",
        bias: bool = True,
        gated: bool = False,
        dropout: float = 0.0,
        output_dropout: bool = False,
    ):
        super().__init__()
        self.gated = gated
        if gated:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        else:
            self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation_fn = ACT2FN[hidden_act]
        self.dropout = nn.Dropout(dropout)
        self.output_dropout = nn.Dropout(dropout) if output_dropout else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(batch_size, seq_len, hidden_size)` -> `(batch_size, seq_len, hidden_size)`."""
        if self.gated:
            inner = self.activation_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
            return self.output_dropout(self.down_proj(self.dropout(inner)))
        inner = self.activation_fn(self.fc1(hidden_states))
        return self.output_dropout(self.fc2(self.dropout(inner)))


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def check_hidden_states(name: str, states: torch.Tensor, dim: int) -> None:
    """Raises a `ValueError` naming `name` unless `states` has shape `(batch_size, seq_len, dim)`."""
    if states.ndim != 3 or states.shape[-1] != dim:
        raise ValueError(f"`{name}` must have shape (batch_size, seq_len, {dim}), got {tuple(states.shape)}.")


def block_attn_implementation(
    attn_implementation: str | None, config: PreTrainedConfig | None, default: str = "eager"
) -> str:
    """
    The attention implementation a documented block starts with: `attn_implementation` (`default` when not given),
    refused with `config`, whose `_attn_implementation` the block reads instead.
    """
    if config is not None and attn_implementation is not None:
        raise ValueError(
            f"Pass either `config` or `attn_implementation` ({attn_implementation!r}), not both: with `config`, "
            "the block uses `config._attn_implementation`."
        )
    attn_implementation = default if attn_implementation is None else attn_implementation
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"`attn_implementation` must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn_implementation!r}."
        )
    return attn_implementation


def share_attention_config(block: nn.Module, config: PreTrainedConfig | None):
    """Makes every attention of `block` read its kernel from `config` (a model's config the block is a layer of), when
    given: the block's own config keeps its geometry."""
    if config is None:
        return
    block.config = config
    for module in block.modules():
        if isinstance(module, (PalmEAttention, PalmECrossAttention)):
            module.config = config
