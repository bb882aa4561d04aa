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

    @torch.no_grad()
    def forward(
        self, position_ids: torch.Tensor, xpos_offset: int = 0, dtype: torch.dtype = torch.float32
    ) -> RotaryTables:
        """
        Args:
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): positions of the tokens.
            xpos_offset (`int`): the position at which the xpos scale is 1.
            dtype (`torch.dtype`): the dtype of the states to rotate (under autocast, the autocast dtype is used); it
                bounds the xpos positions.

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
        if self.use_xpos and not torch.compiler.is_compiling():
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
    """Plain attention; keys and values may have fewer heads than queries (multi-query / grouped attention)."""
    if module.num_key_value_groups > 1:
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)
        value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    elif module.is_causal and query.shape[2] > 1:
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        causal = causal.tril(key.shape[2] - query.shape[2])
        attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def linear(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """
    `nn.functional.linear`, except for a single bfloat16 row on CPU (a decoding step at batch 1), which goes through
    `torch.mv`: there torch's matrix product reads a bfloat16 weight no faster than a float32 one, while its
    matrix-vector product takes about half the time (docs/speed.md). Compiled graphs keep the matrix product,
    which inductor lowers better than `torch.mv`.
    """
    if (
        not torch.compiler.is_compiling()
        and hidden_states.dtype == torch.bfloat16
        and hidden_states.device.type == "cpu"
        and hidden_states.numel() == hidden_states.shape[-1]
        and not hasattr(weight, "to_local")  # a tensor-parallel shard keeps its own path
    ):
        vector = hidden_states.reshape(-1)
        output = torch.mv(weight, vector) if bias is None else torch.addmv(bias, weight, vector)
        return output.view(*hidden_states.shape[:-1], -1)
    return nn.functional.linear(hidden_states, weight, bias)


class PalmELinear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys) computed by [`linear`]."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states @ weight.T + bias`: `(..., in_features)` to `(..., out_features)`."""
        return linear(hidden_states, self.weight, self.bias)


class PalmEAdaptableLinear(nn.Linear):
    """
    A bias-free `nn.Linear` (same parameters and state-dict keys) to which an adapter can be attached as `adapter`
    (e.g. a LoRA module): its output on the same input is then added. How `TransformerBlock`'s `finetune_modules`
    reach the attention projections; PEFT wraps it as any `nn.Linear`.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.adapter = None

    def attach(self, adapter: nn.Module | None):
        """Attaches `adapter` (`None` detaches) without registering it here: its owner keeps it and its parameters."""
        object.__setattr__(self, "adapter", adapter)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The projection of `hidden_states` (`(..., in_features)` to `(..., out_features)`), plus the adapter's
        output on `hidden_states` when one is attached."""
        output = linear(hidden_states, self.weight, self.bias)
        return output if self.adapter is None else output + self.adapter(hidden_states)


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

        self.q_proj = PalmEAdaptableLinear(hidden_size, num_heads * head_dim)
        self.k_proj = PalmEAdaptableLinear(key_value_size, self.num_key_value_heads * head_dim)
        self.v_proj = PalmEAdaptableLinear(key_value_size, self.num_key_value_heads * head_dim)
        self.o_proj = PalmEAdaptableLinear(num_heads * head_dim, hidden_size)
        self.q_norm = PalmEQKNorm(head_dim) if qk_norm else None
        self.k_norm = PalmEQKNorm(head_dim) if qk_norm else None

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head, on this rank: tensor parallelism splits the query heads, and the key/value
        heads too unless a single one is kept whole (multi-query attention)."""
        return local_out_features(self.q_proj) // local_out_features(self.k_proj)

    def project_queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(batch_size, seq_len, hidden_size)` -> `(batch_size, num_heads, seq_len, head_dim)`, normalised."""
        query = self.q_proj(hidden_states)
        query = query.view(*hidden_states.shape[:-1], -1, self.head_dim).transpose(1, 2)
        return query if self.q_norm is None else self.q_norm(query)

    def project_keys_values(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(batch_size, num_key_value_heads, kv_len, head_dim)` of their inputs; keys normalised."""
        key = self.k_proj(key_states).view(*key_states.shape[:-1], -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(value_states).view(*value_states.shape[:-1], -1, self.head_dim).transpose(1, 2)
        return (key if self.k_norm is None else self.k_norm(key)), value

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention kernel of `config._attn_implementation` and the output projection."""
        implementation = self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        batch_size, num_heads, query_length, head_dim = query.shape
        if implementation == "sdpa" and query_length == 1 and key.shape[1] == 1 < num_heads and attention_mask is None:
            # Multi-query decoding: the query heads of one token attend to the single key/value head as the rows of
            # one head, as Transformers' sdpa function itself does when a mask is given; without one it picks
            # `enable_gqa`, which sdpa's CPU kernel runs three times slower (8 heads over 1k keys at batch 8: 434
            # against 138 us). The rows are not causal to each other.
            query = query.view(batch_size, 1, num_heads, head_dim)
            kwargs["is_causal"] = False
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, query_length, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: RotaryTables | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`): the input.
            position_embeddings ([`RotaryTables`], *optional*): from [`PalmERotaryEmbedding`], computed once per
                forward pass.
            attention_mask (`torch.Tensor`, *optional*): boolean (True = attend) or additive float mask, broadcastable
                to `(batch_size, num_heads, seq_len, kv_len)`.
            cache (`Cache`, *optional*): self-attention keys/values of earlier steps, updated at `layer_idx`.

        Returns:
            The output `(batch_size, seq_len, hidden_size)` and the attention probabilities (eager only, else `None`).
        """
        query, key, value = self.project(hidden_states, position_embeddings, cache)
        return self.attend(query, key, value, attention_mask, **kwargs)

    def project(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: RotaryTables | None = None,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The first half of [`~PalmEAttention.forward`], for callers that attend in their own way: queries
        `(batch_size, num_heads, seq_len, head_dim)` and keys and values `(batch_size, num_key_value_heads, kv_len,
        head_dim)`, rotated, the keys and values those the cache returns after taking the new ones.
        """
        query = self.project_queries(hidden_states)
        key, value = self.project_keys_values(hidden_states, hidden_states)
        if position_embeddings is not None:
            query = apply_rotary_pos_emb(query, position_embeddings.query_cos, position_embeddings.query_sin)
            key = apply_rotary_pos_emb(key, position_embeddings.key_cos, position_embeddings.key_sin)
            if self.rotate_values:
                value = apply_rotary_pos_emb(value, position_embeddings.key_cos, position_embeddings.key_sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        return query, key, value


class PalmECrossAttention(PalmEAttention):
    """
    Cross-attention: queries from `hidden_states` (the text, or a Perceiver's latents), keys and values from the
    context (the image features). In an `EncoderDecoderCache` the context's keys/values are computed on the pass that
    gives the context (replacing any held before) and read back on passes that do not (a Python-level flag, so
    `torch.compile` traces a prefill graph and a decoding graph without breaks).

    Args: as [`PalmEAttention`], without `num_key_value_heads`, `is_causal` and `rotate_values`.
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
        super().__init__(
            config,
            hidden_size,
            num_heads,
            head_dim,
            key_value_size=key_value_size,
            is_causal=False,
            qk_norm=qk_norm,
            qk_norm_scale=qk_norm_scale,
            attention_dropout=attention_dropout,
            layer_idx=layer_idx,
        )

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
        query = self.project_queries(hidden_states)
        if key_value_states is not None:
            value_states = key_value_states if value_states is None else value_states
            key, value = self.project_keys_values(key_value_states, value_states)
            if cache is not None:
                if image_is_cached(cache, self.layer_idx):
                    # a context given with a cache that holds one replaces it: never attend to a stale image
                    cache.cross_attention_cache.layers[self.layer_idx].reset()
                key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        elif image_is_cached(cache, self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            key, value = layer.keys, layer.values
        else:
            raise ValueError(
                "Cross-attention needs `key_value_states` (the image features) when the cache holds none: "
                "pass `pixel_values` on the first forward pass."
            )
        return self.attend(query, key, value, attention_mask, **kwargs)


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
            self.gate_proj = PalmELinear(hidden_size, intermediate_size, bias=bias)
            self.up_proj = PalmELinear(hidden_size, intermediate_size, bias=bias)
            self.down_proj = PalmELinear(intermediate_size, hidden_size, bias=bias)
        else:
            self.fc1 = PalmELinear(hidden_size, intermediate_size, bias=bias)
            self.fc2 = PalmELinear(intermediate_size, hidden_size, bias=bias)
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
