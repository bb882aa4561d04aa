"""PaLM's parallel decoder layer, and the documented transformer blocks over it and over the attention core: PaLM's
parallel block with multi-query attention (`ParallelTransformerBlock`, `TransformerBlock`) and a Perceiver layer
(`PerceiverLayer`). Every attention goes through [`PalmEAttention`] and every rotary/xpos embedding through
[`PalmERotaryEmbedding`]."""

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .compat_palme import accept_past_key_values
from .configuration_palme import PalmETextConfig, PalmEVisionConfig, check_positive_ints
from .conversion_blocks import load_parallel_block_reference
from .layers_palme import (
    PalmEAttention,
    PalmECrossAttention,
    PalmEMLP,
    PalmERotaryEmbedding,
    PalmETextCrossAttention,
    RotaryTables,
    block_attn_implementation,
    check_hidden_states,
    share_attention_config,
)


def check_probability(name: str, value) -> None:
    """Raises a `ValueError` naming `name` unless `value` is a dropout probability, in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a dropout probability in [0, 1), got {value!r}.")


def check_finetune_modules(finetune_modules) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """`finetune_modules` as the tuple `(lora_q, lora_k, lora_v, lora_o)`; a `ValueError` unless it holds four."""
    if len(finetune_modules) != 4:
        raise ValueError(
            f"`finetune_modules` must be four modules (lora_q, lora_k, lora_v, lora_o), got {len(finetune_modules)}."
        )
    return tuple(finetune_modules)


class PalmEParallelDecoderLayer(GradientCheckpointingLayer):
    """
    PaLM's parallel decoder layer (`block_type="parallel"`): a bias-free LayerNorm feeds, in parallel, multi-query
    attention (one shared key/value head, rotary/xpos over the whole head, optional query/key l2-normalisation) and a
    SwiGLU feed-forward of width `intermediate_size`; both branches are added to the residual. Then, with
    `add_cross_attention`, pre-norm cross-attention to the image features with its residual.
    """

    def __init__(self, config: PalmETextConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)
        self.self_attn = PalmEAttention(
            config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            num_key_value_heads=1,
            is_causal=True,
            qk_norm=config.qk_norm,
            qk_norm_scale=config.qk_norm_scale,
            attention_dropout=config.attention_dropout,
            layer_idx=layer_idx,
        )
        self.mlp = PalmEMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False, gated=True)
        self.cross_attn = PalmETextCrossAttention(config, layer_idx) if config.add_cross_attention else None

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
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`): the input.
            encoder_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_image_tokens,
                cross_attention_hidden_size)`, *optional*): the image features, for cross-attention.
            attention_mask (`torch.Tensor`, *optional*): the causal mask the model prepared.
            position_embeddings ([`RotaryTables`], *optional*): the rotary tables the model computed.
            cache (`Cache`, *optional*): self-attention keys/values of earlier steps.
            cross_attention_cache (`EncoderDecoderCache`, *optional*): the image keys/values.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`.
        """
        normed = self.input_layernorm(hidden_states)
        attn_output, _ = self.self_attn(
            normed, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attn_output + self.mlp(normed)
        if self.cross_attn is not None:
            hidden_states = self.cross_attn(hidden_states, encoder_hidden_states, cross_attention_cache, **kwargs)
        return hidden_states


class ParallelTransformerBlock(PalmEParallelDecoderLayer):
    """
    PaLM's parallel transformer block, as zeta documents it (`zeta.structs.simple_transformer`), over
    [`PalmEParallelDecoderLayer`]: a bias-free LayerNorm feeds, in parallel, multi-query attention (`heads` query
    heads, one shared key/value head, rotary embeddings over the whole head) and a SwiGLU feed-forward; the block
    returns the sum of the two branches. The residual is added by the caller. The positional arguments are zeta's
    (causal, no xpos, no query/key normalisation, no dropout); the keyword-only ones are the options of PaLM's block,
    which [`TransformerBlock`] exposes in zeta's order and a `block_type="parallel"` model sets from its config.

    Args:
        dim (`int`): width of the input and output.
        dim_head (`int`): width of each attention head.
        heads (`int`): query heads (one shared key/value head).
        ff_mult (`int`): the feed-forward's inner width is `dim * ff_mult`.
        causal (`bool`, keyword-only): causal attention; xpos is only used when causal, as in the reference.
        qk_rmsnorm (`bool`, keyword-only): zeta's name for l2-normalising queries and keys per head (with learned
            gains; cosine-similarity attention, not an RMSNorm); the attention scale is then `qk_scale` instead of
            `dim_head ** -0.5`.
        qk_scale (`float`, keyword-only): attention scale with `qk_rmsnorm`.
        attn_dropout (`float`, keyword-only): dropout on attention probabilities while training.
        ff_dropout (`float`, keyword-only): dropout inside the feed-forward while training.
        use_xpos (`bool`, keyword-only): xpos length-extrapolation scaling of the rotated queries and keys.
        xpos_scale_base (`int`, keyword-only): xpos scale base.
        attn_implementation (`str`, *optional*, keyword-only): `"eager"` (default) or `"sdpa"`.
        config (`PreTrainedConfig`, *optional*, keyword-only): a model config whose `_attn_implementation` is read at
            every call, for a block used as a layer of that model (then do not give `attn_implementation`).
        layer_idx (`int`, keyword-only): index of this block's keys/values in a `Cache`.
        xpos_offset (`int`, keyword-only): the position at which the xpos scale is 1. It cancels in attention scores
            (outputs do not depend on it); positions further from it than `rotary_emb.max_xpos_distance(dtype)`
            (2832 in float16, 34561 in float32 and bfloat16) are refused.
        rope_theta (`float`, keyword-only): rotary base.
        hidden_act (`str`, keyword-only): activation of the SwiGLU gate (`"silu"`, as PaLM).
        layer_norm_eps (`float`, keyword-only): epsilon of the bias-free LayerNorm.
        own_rotary (`bool`, keyword-only): the block computes its rotary embeddings (`block.rotary_emb`). A model whose
            layers share one rotary embedding, computed once per forward pass, builds its blocks with
            `own_rotary=False` and passes `position_embeddings`.

    Example:
        >>> block = ParallelTransformerBlock(dim=512, dim_head=64, heads=8, ff_mult=4)
        >>> block(torch.randn(1, 10, 512)).shape
        torch.Size([1, 10, 512])
    """

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        *,
        causal: bool = True,
        qk_rmsnorm: bool = False,
        qk_scale: float = 8,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        use_xpos: bool = False,
        xpos_scale_base: int = 512,
        attn_implementation: str | None = None,
        config: PreTrainedConfig | None = None,
        layer_idx: int = 0,
        xpos_offset: int = 0,
        rope_theta: float = 10000.0,
        hidden_act: str = "silu",
        layer_norm_eps: float = 1e-5,
        own_rotary: bool = True,
    ):
        check_positive_ints(dim=dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult)
        if dim_head % 2 != 0:
            raise ValueError(f"`dim_head` must be even (rotary embeddings rotate feature pairs), got {dim_head}.")
        check_probability("attn_dropout", attn_dropout)
        check_probability("ff_dropout", ff_dropout)
        if use_xpos and causal and xpos_scale_base <= 0:
            raise ValueError(f"`xpos_scale_base` must be positive, got {xpos_scale_base!r}.")
        use_xpos = use_xpos and causal
        layer_config = PalmETextConfig(
            block_type="parallel",
            hidden_size=dim,
            head_dim=dim_head,
            num_attention_heads=heads,
            intermediate_size=dim * ff_mult,
            num_hidden_layers=layer_idx + 1,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            rope_theta=rope_theta,
            use_xpos=use_xpos,
            xpos_scale_base=xpos_scale_base,
            xpos_offset=xpos_offset,
            qk_norm=qk_rmsnorm,
            qk_norm_scale=qk_scale,
            attention_dropout=attn_dropout,
            add_cross_attention=False,
        )
        layer_config._attn_implementation = block_attn_implementation(attn_implementation, config)
        super().__init__(layer_config, layer_idx)
        self.config = layer_config
        share_attention_config(self, config)
        # zeta's options that a decoder layer's config does not carry
        self.self_attn.is_causal = causal
        self.mlp.dropout.p = ff_dropout
        self.xpos_offset = xpos_offset
        self.rotary_emb = (
            PalmERotaryEmbedding(dim_head, base=rope_theta, use_xpos=use_xpos, xpos_scale_base=xpos_scale_base)
            if own_rotary
            else None
        )

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
            hidden_states (`torch.FloatTensor` of shape `(batch_size, seq_len, dim)`): the input `x`.
            attention_mask (`torch.Tensor`, *optional*): `(batch_size, past_len + seq_len)` with 1/True for tokens and
                0/False for padding (the reference's `mask`), or a prepared 4-D mask (a model's causal mask).
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): rotary positions,
                `past_len + arange(seq_len)` by default.
            cache (`Cache`, *optional*): keys/values of earlier steps (the single multi-query head), updated
                at `layer_idx`; causal blocks only.
            position_embeddings ([`RotaryTables`], *optional*): the rotary tables of the tokens' positions, computed
                once per forward pass by a model whose layers share them (as in `modeling_llama.py`); `position_ids`
                is then not read. Without them the block computes them from `position_ids`.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, seq_len, dim)`: attention branch + feed-forward branch.
        """
        check_hidden_states("hidden_states", hidden_states, self.hidden_size)
        if cache is not None and not self.self_attn.is_causal:
            raise ValueError("`cache` needs a causal block (`causal=True`).")
        if position_embeddings is None and self.rotary_emb is None:
            raise ValueError(
                "This ParallelTransformerBlock was built with `own_rotary=False`: pass `position_embeddings` and "
                "the prepared `attention_mask`."
            )
        attention_mask, position_ids = self.prepare_mask_and_positions(
            hidden_states, attention_mask, position_ids, cache
        )
        if position_embeddings is None:
            position_embeddings = self.rotary_emb(
                position_ids, xpos_offset=self.xpos_offset, dtype=hidden_states.dtype
            )

        normed = self.input_layernorm(hidden_states)
        attn_output, _ = self.self_attn(
            normed, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache, **kwargs
        )
        return attn_output + self.mlp(normed)

    def prepare_mask_and_positions(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor | None, torch.LongTensor]:
        """
        The 4-D causal (or bidirectional) mask around a 2-D padding mask, unless the mask is already 4-D (a model's,
        prepared once per forward pass), and default positions `past_len + arange(seq_len)`.
        """
        batch_size, seq_len = hidden_states.shape[:2]
        past_seen_tokens = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        expected_mask_shape = (batch_size, past_seen_tokens + seq_len)
        if (
            attention_mask is not None
            and attention_mask.ndim == 2
            and tuple(attention_mask.shape) != expected_mask_shape
        ):
            raise ValueError(
                f"`attention_mask` must have shape (batch_size, past_len + seq_len) = {expected_mask_shape}, got "
                f"{tuple(attention_mask.shape)}."
            )
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=hidden_states.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0).expand(batch_size, -1)
        if attention_mask is not None and attention_mask.ndim == 4:
            return attention_mask, position_ids
        if self.self_attn.is_causal:
            attention_mask = create_causal_mask(
                self.config,
                hidden_states,
                attention_mask,
                cache,
                position_ids=position_ids,
                layer_idx=self.layer_idx,
            )
        else:
            attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
        return attention_mask, position_ids

    @classmethod
    def from_reference_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **kwargs) -> "ParallelTransformerBlock":
        """
        Builds the block from the reference's constructor keyword arguments and loads the reference's state dict
        (`torch.save(block.state_dict())`): zeta's `ParallelTransformerBlock` for this class, palm-rlhf-pytorch's
        `ParallelTransformerBlock` for [`TransformerBlock`]. See [`~conversion_blocks.load_parallel_block_reference`].

        Raises:
            `ValueError`: missing, unexpected or wrongly shaped keys, or a fixed buffer that differs from this block's.
        """
        return load_parallel_block_reference(cls, state_dict, kwargs)


class TransformerBlock(ParallelTransformerBlock):
    """
    zeta's `TransformerBlock`, whose working original is palm-rlhf-pytorch's `ParallelTransformerBlock`: PaLM's
    parallel block ([`ParallelTransformerBlock`]) with zeta's arguments, in zeta's order: causal, xpos on by default,
    optional query/key l2-normalisation, dropout, and LoRA `finetune_modules` added to the attention projections.
    The block returns attention branch + feed-forward branch; the residual is added by the caller.

    Args:
        dim, dim_head, causal, heads, qk_rmsnorm, qk_scale, ff_mult: as in [`ParallelTransformerBlock`].
        attn_dropout, ff_dropout, use_xpos, xpos_scale_base: as in [`ParallelTransformerBlock`] (`use_xpos` defaults
            to `True` here, as zeta's).
        flash_attn (`bool`): use PyTorch's scaled-dot-product attention (`attn_implementation="sdpa"`); same results.
        finetune_modules (`tuple` of four modules, *optional*): `(lora_q, lora_k, lora_v, lora_o)`, registered as
            submodules; their outputs are added to the query, key and value projections of the normalised input and
            to the output projection of the merged heads. `forward(..., finetune_modules=...)` overrides them for a
            call.
        attn_implementation (`str`, *optional*, keyword-only): `"eager"` or `"sdpa"`; `"sdpa"` if `flash_attn`, else
            `"eager"`.
        config, layer_idx, xpos_offset, rope_theta, hidden_act, layer_norm_eps: as in [`ParallelTransformerBlock`]
            (keyword-only; with `config`, give neither `attn_implementation` nor `flash_attn`).

    Example:
        >>> block = TransformerBlock(dim=512, dim_head=64, heads=8)
        >>> block(torch.randn(1, 10, 512)).shape
        torch.Size([1, 10, 512])
    """

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        causal: bool = True,
        heads: int = 8,
        qk_rmsnorm: bool = False,
        qk_scale: float = 8,
        ff_mult: int = 4,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        use_xpos: bool = True,
        xpos_scale_base: int = 512,
        flash_attn: bool = False,
        finetune_modules: Sequence[nn.Module] | None = None,
        *,
        attn_implementation: str | None = None,
        config: PreTrainedConfig | None = None,
        layer_idx: int = 0,
        xpos_offset: int = 0,
        rope_theta: float = 10000.0,
        hidden_act: str = "silu",
        layer_norm_eps: float = 1e-5,
    ):
        if flash_attn and config is not None:
            raise ValueError(
                "Pass either `config` or `flash_attn=True`, not both: with `config`, the block uses "
                "`config._attn_implementation`."
            )
        if flash_attn and attn_implementation not in (None, "sdpa"):
            raise ValueError(f"`flash_attn=True` means `attn_implementation='sdpa'`, got {attn_implementation!r}.")
        super().__init__(
            dim,
            dim_head=dim_head,
            heads=heads,
            ff_mult=ff_mult,
            causal=causal,
            qk_rmsnorm=qk_rmsnorm,
            qk_scale=qk_scale,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            use_xpos=use_xpos,
            xpos_scale_base=xpos_scale_base,
            attn_implementation="sdpa" if flash_attn else attn_implementation,
            config=config,
            layer_idx=layer_idx,
            xpos_offset=xpos_offset,
            rope_theta=rope_theta,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
        )
        self.finetune_modules = (
            None if finetune_modules is None else nn.ModuleList(check_finetune_modules(finetune_modules))
        )

    @accept_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        finetune_modules: Sequence[nn.Module] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """
        Args:
            hidden_states, attention_mask, position_ids, cache: as in [`ParallelTransformerBlock.forward`].
            finetune_modules (`tuple` of four modules, *optional*): `(lora_q, lora_k, lora_v, lora_o)` for this call,
                in place of those given to the constructor.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, seq_len, dim)`: attention branch + feed-forward branch.
        """
        adapters = self.finetune_modules if finetune_modules is None else check_finetune_modules(finetune_modules)
        if adapters is None:
            return super().forward(hidden_states, attention_mask, position_ids, cache, **kwargs)
        # Each adapter's output on a projection's input is added to the projection's output, for this call only.
        attention = self.self_attn
        hooks = [
            projection.register_forward_hook(lambda _, inputs, output, adapter=adapter: output + adapter(inputs[0]))
            for projection, adapter in zip(
                (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj), adapters
            )
        ]
        try:
            return super().forward(hidden_states, attention_mask, position_ids, cache, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()


class PalmEPerceiverSublayer(nn.Module):
    """
    One of the `depth` layers of [`PerceiverLayer`], pre-norm with residuals: multi-query self-attention over the
    query, cross-attention from the query to the keys and values, feed-forward.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        dim: int,
        heads: int,
        dim_head: int,
        dropout: float,
        ff_dropout: float,
        ff_mult: int,
        layer_idx: int,
    ):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = PalmEAttention(
            config,
            hidden_size=dim,
            num_heads=heads,
            head_dim=dim_head,
            num_key_value_heads=1,
            is_causal=False,
            attention_dropout=dropout,
        )
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn = PalmECrossAttention(
            config,
            hidden_size=dim,
            num_heads=heads,
            head_dim=dim_head,
            attention_dropout=dropout,
            layer_idx=layer_idx,
        )
        self.mlp_layer_norm = nn.LayerNorm(dim)
        self.mlp = PalmEMLP(dim, dim * ff_mult, dropout=ff_dropout, output_dropout=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_states: torch.Tensor | None,
        value_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: EncoderDecoderCache | None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, query_len, dim)`): the query.
            key_states, value_states (`torch.Tensor` of shape `(batch_size, kv_len, dim)`, or `None` when `cache`
                holds this layer's cross-attention keys/values): the context the query attends to.
            attention_mask (`torch.Tensor`, *optional*): the cross-attention mask over the context's positions.
            cache (`EncoderDecoderCache`, *optional*): keeps the context's keys/values across calls.

        Returns:
            `torch.Tensor` of shape `(batch_size, query_len, dim)`.
        """
        attn_output, _ = self.self_attn(self.self_attn_layer_norm(hidden_states))
        hidden_states = hidden_states + attn_output
        attn_output, _ = self.cross_attn(
            self.cross_attn_layer_norm(hidden_states),
            key_value_states=key_states,
            value_states=value_states,
            attention_mask=attention_mask,
            cache=cache,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.mlp_layer_norm(hidden_states))


class PerceiverLayer(nn.Module):
    """
    `depth` Perceiver layers: the query goes through self-attention, then cross-attends to the keys and values (keys
    from `k`, values from `v`), then through the feed-forward, each pre-norm with a residual. The output has the
    query's shape (as zeta documents; zetascale 2.8.8's own version returns the wrong shape).

    Args:
        dim (`int`): width of the query, keys and values.
        heads (`int`): attention heads (self-attention is multi-query: one shared key/value head).
        depth (`int`): number of layers.
        dim_head (`int`): width of each head.
        dropout (`float`): dropout on attention probabilities while training.
        ff_dropout (`float`): dropout inside the feed-forward while training.
        ff_mult (`int`): the feed-forward's inner width is `dim * ff_mult`.
        attn_implementation (`str`, *optional*, keyword-only): `"eager"` (default) or `"sdpa"`.
        config (`PreTrainedConfig`, *optional*, keyword-only): a model config whose `_attn_implementation` is read at
            every call, for a layer of that model.
        layer_idx (`int`, keyword-only): layer `i` keeps its cross-attention keys/values at cache index
            `layer_idx + i`.

    Example:
        >>> q, k, v = torch.randn(1, 32, 512), torch.randn(1, 32, 512), torch.randn(1, 32, 512)
        >>> layer = PerceiverLayer(512, 8, 6, 64)
        >>> layer(q, k, v).shape
        torch.Size([1, 32, 512])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        depth: int,
        dim_head: int = 64,
        dropout: float = 0.1,
        ff_dropout: float = 0.1,
        ff_mult: int = 4,
        *,
        attn_implementation: str | None = None,
        config: PreTrainedConfig | None = None,
        layer_idx: int = 0,
    ):
        super().__init__()
        check_positive_ints(dim=dim, heads=heads, depth=depth, dim_head=dim_head, ff_mult=ff_mult)
        check_probability("dropout", dropout)
        check_probability("ff_dropout", ff_dropout)
        attn_implementation = block_attn_implementation(attn_implementation, config)
        if config is None:
            # the layers' own configuration: the attention implementation they read at every call
            config = PalmEVisionConfig(
                hidden_size=dim,
                num_attention_heads=heads,
                head_dim=dim_head,
                intermediate_size=dim * ff_mult,
                attention_dropout=dropout,
            )
            config._attn_implementation = attn_implementation
        self.config = config
        self.hidden_size = dim
        self.layers = nn.ModuleList(
            [
                PalmEPerceiverSublayer(self.config, dim, heads, dim_head, dropout, ff_dropout, ff_mult, layer_idx + i)
                for i in range(depth)
            ]
        )

    @accept_past_key_values
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            q (`torch.FloatTensor` of shape `(batch_size, query_len, dim)`): the query (e.g. learned latents).
            k (`torch.FloatTensor` of shape `(batch_size, kv_len, dim)`): the keys' input (the context).
            v (`torch.FloatTensor` of shape `(batch_size, kv_len, dim)`): the values' input.
            mask (`torch.BoolTensor` of shape `(batch_size, kv_len)`, *optional*): True for key/value positions to
                attend to, False for those to ignore.
            cache (`Cache`, *optional*): holds each layer's cross-attention keys/values for a fixed context
                (the cross-attention part of an `EncoderDecoderCache`, or the cache itself): filled on the first call,
                reused on later ones, which may then omit `k` and `v`.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, query_len, dim)`.
        """
        check_hidden_states("q", q, self.hidden_size)
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            # A fresh wrapper marks the layers whose keys/values the given cache already holds.
            cache = EncoderDecoderCache(DynamicCache(), cache)
        is_cached = cache is not None and all(
            cache.is_updated.get(layer.cross_attn.layer_idx, False) for layer in self.layers
        )
        if (k is None) != (v is None):
            raise ValueError("Pass both `k` and `v`, or neither (when the cache holds their keys/values).")
        if k is None and not is_cached:
            raise ValueError("`k` and `v` are needed unless `cache` already holds their keys/values.")
        if k is not None:
            check_hidden_states("k", k, self.hidden_size)
            if v.shape != k.shape or k.shape[0] != q.shape[0]:
                raise ValueError(
                    f"`k` and `v` must both have shape (batch_size={q.shape[0]}, kv_len, {self.hidden_size}), got "
                    f"{tuple(k.shape)} and {tuple(v.shape)}."
                )

        attention_mask = None
        if mask is not None:
            kv_len = (
                k.shape[1]
                if k is not None
                else cache.cross_attention_cache.get_seq_length(self.layers[0].cross_attn.layer_idx)
            )
            if tuple(mask.shape) != (q.shape[0], kv_len):
                raise ValueError(
                    f"`mask` must have shape (batch_size, kv_len) = ({q.shape[0]}, {kv_len}), got {tuple(mask.shape)}."
                )
            min_value = torch.finfo(q.dtype).min
            attention_mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            attention_mask = attention_mask.masked_fill(~mask.to(device=q.device, dtype=torch.bool), min_value)
            attention_mask = attention_mask[:, None, None, :]

        hidden_states = q
        for layer in self.layers:
            hidden_states = layer(hidden_states, k, v, attention_mask, cache)
        return hidden_states
