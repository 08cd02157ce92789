"""The decoder every model family here shares: RMSNorm, rotary embedding, grouped-query attention, SwiGLU
MLP, blocks, and the family entry's helpers (FSDP2 plan, parameter and FLOP counts). Its config,
:class:`DecoderConfig` and :class:`RopeScaling`, is in ``decoder_config.py`` (which ``hf.py`` reads without
the model) and re-exported here.

The architecture reads top to bottom. Attention runs through a registered backend
(``nemo_lite.components.attention``) whose per-step mask is built once by
:meth:`DecoderForCausalLM.build_attention_mask` and handed to every layer. Hugging Face import and
export live in :mod:`nemo_lite.components.models.hf`; ``from_pretrained``/``save_pretrained`` below
only forward to it.

A family (``families/<name>.py``) is this decoder with a config class of its own, derived from
:class:`DecoderConfig`; the config says what differs through a few properties: biases on q/k/v, on o and
on the MLP (``qkv_bias``, ``o_bias``, ``mlp_bias``), an RMSNorm on each head of q and k before the rotary
embedding (``qk_norm``), each layer's sliding window (``layer_windows()``; the backend applies it), and the
rotary scaling (``rope_scaling``). The family's model class derives from :class:`DecoderForCausalLM` and
names its config class, so that a model says which family it is.

Numerics follow transformers' ``modeling_llama.py`` so that checkpoints give the same logits:
RMSNorm in float32 then cast back before the weight; the rotary embedding in Hugging Face's
rotate-half layout (not the interleaved complex layout of Meta's code).

    config = get_preset("tiny", num_hidden_layers=4)      # nemo_lite.components.models.get_preset: exact names
    model = get_model_family("llama").build(config, attention=AttentionConfig(backend="flex"))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nemo_lite.components.attention import (
    AttentionBackend,
    AttentionConfig,
    AttentionConfigError,
    AttentionMask,
    as_attention_config,
    get_attention_backend,
    list_attention_backends,
)
from nemo_lite.components.attention.masks import allowed_pairs
from nemo_lite.components.models.decoder_config import (  # noqa: F401  (the decoder's config, re-exported)
    ROPE_FIELDS,
    ROPE_TYPES,
    DecoderConfig,
    RopeScaling,
    window_from_hf,
)
from nemo_lite.components.models.family import HFFacts, ModelFamily

# ---- norm ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, normalized in float32 and cast back before the weight (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ---- rotary embedding ---------------------------------------------------------------------------


def rope_inv_freq(
    config: DecoderConfig, device: torch.device | str | None = None, seq_len: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in float32, op for op as transformers computes them.

    ``seq_len`` (a 0-d tensor: the longest position of the forward + 1) matters only to ``dynamic``
    scaling, which is the default rope up to ``max_position_embeddings`` (None: not beyond it).
    """
    dim = config.head_dim
    arange = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (config.rope_theta ** (arange / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":  # positions / factor, folded into the frequencies
        return inv_freq / scaling.factor
    if scaling.rope_type == "dynamic":
        return inv_freq if seq_len is None else _dynamic_inv_freq(config, inv_freq, arange, seq_len)
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(config, arange)
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    # Same formula and op order as transformers' _compute_llama3_parameters (bitwise equal on CPU).
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def _dynamic_inv_freq(
    config: DecoderConfig, inv_freq: torch.Tensor, arange: torch.Tensor, seq_len: torch.Tensor
) -> torch.Tensor:
    """NTK scaling for sequences longer than max_position_embeddings (transformers'
    _compute_dynamic_ntk_parameters), chosen on the device: no host sync."""
    dim, limit, factor = config.head_dim, config.max_position_embeddings, config.rope_scaling.factor
    longest = torch.maximum(seq_len, torch.tensor(limit, dtype=seq_len.dtype, device=seq_len.device))
    base = config.rope_theta * ((factor * longest / limit) - (factor - 1)) ** (dim / (dim - 2))
    scaled = 1.0 / (base ** (arange / dim))
    return torch.where(seq_len > limit, scaled, inv_freq)


def _yarn_inv_freq(config: DecoderConfig, arange: torch.Tensor) -> torch.Tensor:
    """YaRN (transformers' _compute_yarn_parameters, same op order): each frequency is blended between
    kept (extrapolation) and divided by factor (interpolation) by a linear ramp over the dimensions."""
    scaling, dim, base = config.rope_scaling, config.head_dim, config.rope_theta

    def correction_dim(num_rotations: float) -> float:  # the dimension that turns this often in the context
        context = scaling.original_max_position_embeddings
        return (dim * math.log(context / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a division by zero, as transformers does
    pos_freqs = base ** (arange / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (scaling.factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=arange.device) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    return inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor


def rope_attention_factor(config: DecoderConfig) -> float:
    """The multiplier of cos and sin: YaRN's attention factor, 1 for every other rope."""
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    return 1.0 if scaling.factor <= 1 else 0.1 * math.log(scaling.factor) + 1.0


def rotary_cos_sin(config: DecoderConfig, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[B, 1, S, head_dim]`` in float32 for the given positions (computed once per forward).

    The inverse frequencies are recomputed here (a handful of ops on ``head_dim // 2`` numbers)
    rather than kept in a buffer, so meta-device construction, ``to_empty`` and ``.to(bfloat16)``
    can never leave them uninitialized or rounded.
    """
    seq_len = None
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "dynamic":
        seq_len = position_ids_BS.max() + 1  # stays on the device
    inv_freq_D2 = rope_inv_freq(config, position_ids_BS.device, seq_len)
    freqs_BSD2 = position_ids_BS[..., None].float() * inv_freq_D2
    emb_BSD = torch.cat((freqs_BSD2, freqs_BSD2), dim=-1)
    cos_BSD, sin_BSD = emb_BSD.cos(), emb_BSD.sin()
    attention_factor = rope_attention_factor(config)
    if attention_factor != 1.0:
        cos_BSD, sin_BSD = cos_BSD * attention_factor, sin_BSD * attention_factor
    return cos_BSD[:, None], sin_BSD[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BHSD: torch.Tensor, cos_B1SD: torch.Tensor, sin_B1SD: torch.Tensor) -> torch.Tensor:
    """Rotate in float32 and cast back (in float32 this is exactly transformers' apply_rotary_pos_emb)."""
    x32 = x_BHSD.float()
    return (x32 * cos_B1SD + rotate_half(x32) * sin_B1SD).to(x_BHSD.dtype)


# ---- attention, MLP, block ----------------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query attention: q/k/v projections, (per-head q/k norm,) RoPE on q and k, the backend
    (within this layer's sliding window, if any), the output projection."""

    def __init__(self, config: DecoderConfig, backend: AttentionBackend, sliding_window: int = 0) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_bias)
        # qk_norm: each head of q and k is RMS-normalized (one weight of head_dim shared by the heads).
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        # attention_sinks: one learned logit per query head that takes softmax mass without a value.
        if config.attention_sinks and not backend.supports_sinks:
            can = [n for n in list_attention_backends() if get_attention_backend(n).supports_sinks]
            raise AttentionConfigError(
                f"this model has attention sinks, which attention={backend.name} cannot carry; use one of: "
                f"{', '.join(can)}"
            )
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if config.attention_sinks else None
        # nemo_lite's convention: a query sees keys with q - k <= sliding_window (0 = no window).
        self.sliding_window = sliding_window
        self.backend = backend  # shared by every layer; it has no parameters

    def forward(
        self,
        x_BSE: torch.Tensor,
        cos_B1SD: torch.Tensor,
        sin_B1SD: torch.Tensor,
        attention_mask: AttentionMask,
    ) -> torch.Tensor:
        batch, seq_len, _ = x_BSE.shape
        q_BSHD = self.q_proj(x_BSE).view(batch, seq_len, self.num_heads, self.head_dim)
        k_BSKD = self.k_proj(x_BSE).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v_BSKD = self.v_proj(x_BSE).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHD, k_BSKD = self.q_norm(q_BSHD), self.k_norm(k_BSKD)
        q_BHSD = apply_rotary(q_BSHD.transpose(1, 2), cos_B1SD, sin_B1SD)
        k_BKSD = apply_rotary(k_BSKD.transpose(1, 2), cos_B1SD, sin_B1SD)
        v_BKSD = v_BSKD.transpose(1, 2)
        # KV heads are not repeated here: the backend reads KV head h // (H / K) for query head h.
        out_BHSD = self.backend(
            q_BHSD,
            k_BKSD,
            v_BKSD,
            sink_weights=self.sinks,
            sliding_window=self.sliding_window,
            enable_gqa=True,
            attention_mask=attention_mask,
        )
        return self.o_proj(out_BHSD.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``."""

    def __init__(self, config: DecoderConfig, backend: AttentionBackend, sliding_window: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, backend, sliding_window)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x_BSE: torch.Tensor,
        cos_B1SD: torch.Tensor,
        sin_B1SD: torch.Tensor,
        attention_mask: AttentionMask,
    ) -> torch.Tensor:
        h_BSE = x_BSE + self.attention(self.attention_norm(x_BSE), cos_B1SD, sin_B1SD, attention_mask)
        return h_BSE + self.mlp(self.mlp_norm(h_BSE))


# ---- decoder ------------------------------------------------------------------------------------


class DecoderForCausalLM(nn.Module):
    """Token embedding, ``layers`` (an ``nn.ModuleList`` of :class:`DecoderBlock`), final norm, output.

    Build a family's own class (``LlamaForCausalLM``, or ``get_model_family(name).model_cls``), which takes
    that family's config.

    Args:
        config: the architecture (an instance of the class's ``config_class``).
        attention: the attention spec (backend, mask type, fixed block size, the backend's options);
            None = sdpa with causal masks. A bad one is refused with a one-line ``AttentionConfigError``.

    Parameters start with PyTorch's default init; call :meth:`init_weights` before training from
    scratch, or load a checkpoint with :meth:`from_pretrained`.
    """

    # The config class this model class takes (each family's class sets its own).
    config_class: type[DecoderConfig] = DecoderConfig

    def __init__(
        self,
        config: DecoderConfig,
        *,
        attention: AttentionConfig | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got a {type(config).__name__}"
            )
        self.config = config
        self.attention_backend = as_attention_config(attention).build()  # shared by every layer
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        windows = config.layer_windows()
        self.layers = nn.ModuleList(self.build_block(i, window) for i, window in enumerate(windows))
        # The distinct sliding windows of the layers (0 = none): each gets its mask built once per step.
        self.sliding_windows: tuple[int, ...] = tuple(sorted(set(windows)))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied: the output projection *is* the embedding matrix, so there is no second parameter to tie.
        tied = config.tie_word_embeddings
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Directory of the tokenizer that goes with these weights (set by from_pretrained).
        self.tokenizer_dir: Path | None = None

    def build_block(self, index: int, sliding_window: int) -> nn.Module:
        """Block ``index`` of the model (a family whose blocks differ, e.g. mixture-of-experts, overrides it)."""
        return DecoderBlock(self.config, self.attention_backend, sliding_window)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection ``[vocab, hidden]`` (the embedding matrix when tied).

        For a chunked cross-entropy: ``logits = hidden @ model.output_weight.T`` chunk by chunk.
        """
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def build_attention_mask(
        self, input_ids_BS: torch.Tensor, eos_id: int | None = None, position_ids: torch.Tensor | None = None
    ) -> AttentionMask:
        """The step's mask, built once by the model's backend (eos_id defaults to config.eos_token_id;
        ``position_ids`` are read by the shared_prompt rule)."""
        eos_id = self.config.eos_token_id if eos_id is None else eos_id
        return self.attention_backend.build_mask(
            input_ids_BS, eos_id, sliding_windows=self.sliding_windows, position_ids_BS=position_ids
        )

    def forward_hidden(
        self,
        input_ids_BS: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states ``[B, S, hidden]``.

        ``position_ids`` ``[B, S]`` (or ``[S]``) may restart at each packed document; default
        ``arange(S)``. ``attention_mask`` is the step's mask from :meth:`build_attention_mask`; when
        None it is built here from ``input_ids`` and ``config.eos_token_id``.
        """
        if position_ids is None:
            position_ids = torch.arange(input_ids_BS.shape[1], device=input_ids_BS.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if attention_mask is None:
            attention_mask = self.build_attention_mask(input_ids_BS, position_ids=position_ids.expand_as(input_ids_BS))
        cos_B1SD, sin_B1SD = rotary_cos_sin(self.config, position_ids)  # once, shared by every layer
        h_BSE = self.embed_tokens(input_ids_BS)
        for layer in self.layers:
            h_BSE = layer(h_BSE, cos_B1SD, sin_B1SD, attention_mask)
        return self.norm(h_BSE)

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, S, vocab]`` in the parameters' dtype."""
        hidden_BSE = self.forward_hidden(input_ids_BS, position_ids=position_ids, attention_mask=attention_mask)
        return F.linear(hidden_BSE, self.output_weight)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """From-scratch init, as transformers' Llama init: every Linear and the embedding ~ N(0, std),
        std = ``config.initializer_range``; biases zero; norm weights one.

        Output projections (``o_proj``, ``down_proj``) are *not* scaled by depth, matching transformers
        so that loss curves compare with a transformers baseline. Deterministic given ``seed`` and the
        device. On a model built on the meta device, call ``to_empty(device=...)`` first.
        """
        if any(p.is_meta for p in self.parameters()):
            raise RuntimeError("parameters are on the meta device: call model.to_empty(device=...) first")
        std = self.config.initializer_range
        generators: dict[torch.device, torch.Generator] = {}

        def normal_(t: torch.Tensor) -> None:
            if t.device not in generators:
                generators[t.device] = torch.Generator(device=t.device).manual_seed(seed)
            t.normal_(0.0, std, generator=generators[t.device])

        for module in self.modules():
            if isinstance(module, nn.Linear):
                normal_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                normal_(module.weight)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    # ---- Hugging Face checkpoints (implemented in hf.py) ---------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        attention: AttentionConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> DecoderForCausalLM:
        """Load a Hugging Face directory of this class's family (config.json + safetensors), or a hub
        id (``org/name`` or ``org/name@revision``, through the Hugging Face cache); see
        ``hf.load_pretrained``. For any family: ``AutoModelForCausalLM.from_pretrained``."""
        from nemo_lite.components.models import hf

        return hf.load_pretrained(cls, path, attention=attention, dtype=dtype, device=device)

    def save_pretrained(
        self,
        path: str | Path,
        *,
        max_shard_size: int | str = "2GB",
        tokenizer_dir: str | Path | None = None,
        **export: Any,
    ) -> Path:
        """Write a Hugging Face directory of this model's family atomically; ``export`` (dtype, generation,
        chat_template) and the rest: see ``hf.save_pretrained``."""
        from nemo_lite.components.models import hf

        return hf.save_pretrained(self, path, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir, **export)


# ---- what a family entry of this decoder says: FSDP2 plan, parameter and FLOP counts ---------------


def shard(model: DecoderForCausalLM, *, mp_policy=None, reshard_after_forward: bool = True, mesh=None) -> None:
    """FSDP2: one ``fully_shard`` unit per decoder block, then the root (embedding, final norm, head).

    ``reshard_after_forward=False`` keeps each block's gathered parameters from its forward to its
    backward: one all-gather fewer per block and step, for the memory of the unsharded blocks.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    if mesh is not None:  # a 2-D (replicate, shard) mesh makes it HSDP; default: FSDP over every rank
        kwargs["mesh"] = mesh
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root keeps its parameters unsharded after forward (FSDP2's default for the root), so the
    # head loss reads the full output weight after forward_hidden returns.
    fully_shard(model, **kwargs)
    # Training calls forward_hidden (then the head loss), not forward: gather around it too.
    register_fsdp_forward_method(model, "forward_hidden")


def set_embedding_padding(model: nn.Module, pad_id: int | None) -> None:
    """Give every token embedding of ``model`` ``padding_idx=pad_id``, as transformers builds it from config.json's
    pad_token_id: that row then gets no gradient from the lookup (None: every row does). The forward is unchanged."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.padding_idx = pad_id


def num_parameters(config: DecoderConfig) -> int:
    """Parameters of the decoder ``config`` describes, counted without building it (the same number as
    ``sum(p.numel() for p in model.parameters())``)."""
    c = config
    hidden, q_width, kv_width = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = 2 * hidden * q_width + 2 * hidden * kv_width
    attention += (q_width + 2 * kv_width) * c.qkv_bias + hidden * c.o_bias + 2 * c.head_dim * c.qk_norm
    attention += c.num_attention_heads * c.attention_sinks
    mlp = 3 * hidden * c.intermediate_size + (2 * c.intermediate_size + hidden) * c.mlp_bias
    per_layer = attention + mlp + 2 * hidden  # + the two norms
    embeddings = c.vocab_size * hidden * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * per_layer + embeddings + hidden


def flops_per_token(model: nn.Module) -> int:
    """6 x the parameters that take part in a matmul per token: all but the input embedding lookup (a tied
    output projection is counted once, as the output projection). Norm weights and biases (a few per
    thousand of the total) are counted too."""
    total = sum(p.numel() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        total -= model.embed_tokens.weight.numel()
    return 6 * total


def attention_flops(config: DecoderConfig, mask: AttentionMask) -> torch.Tensor:
    """Attention FLOPs of one forward + backward over the step's ``mask``, every layer and query head (a
    float64 device scalar: no host sync). ``4 * head_dim`` per allowed (query, key) pair forward (QK^T and
    PV), x3 with backward; a layer with a sliding window counts only the pairs its window allows."""
    per_pair = 3 * 4 * config.head_dim * config.num_attention_heads
    windows = config.layer_windows()
    pairs = sum(windows.count(w) * allowed_pairs(mask, w).to(torch.float64) for w in sorted(set(windows)))
    return per_pair * pairs


def decoder_family(
    name: str,
    model_cls: type[DecoderForCausalLM],
    presets: Mapping[str, DecoderConfig],
    hf: HFFacts,
) -> ModelFamily:
    """The entry of a family of this decoder: its own class, config, presets and Hugging Face facts; the
    decoder's blocks, FSDP2 plan, parameter count and FLOPs."""
    return ModelFamily(
        name=name,
        model_cls=model_cls,
        config_cls=model_cls.config_class,
        presets=presets,
        hf=hf,
        load_pretrained=model_cls.from_pretrained,
        blocks=lambda model: list(model.layers),
        # The final norm too: eager, it is ~15 small float32 kernels a step.
        compile_units=lambda model: [*model.layers, model.norm],
        shard=shard,
        num_parameters=num_parameters,
        flops_per_token=flops_per_token,
        attention_flops=attention_flops,
    )
