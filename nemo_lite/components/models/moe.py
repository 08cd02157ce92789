"""Mixture of experts: a router, stacked experts, and the decoder built from them.

One MoE layer replaces a block's SwiGLU MLP. For each token the router scores every expert and keeps the
``top_k`` best; the token goes through those experts' SwiGLUs and their outputs are summed, weighted by the
router. Nothing is dropped: every token reaches each of its ``top_k`` experts, however many tokens pick the
same one (there is no capacity factor).

- :class:`Router`: logits ``x @ weight.T (+ bias)`` in float32, then either softmax over all experts and
  top-k (Qwen3-MoE, Mixtral; renormalized over the k when ``norm_topk_prob``) or top-k of the logits and a
  softmax over the k (gpt-oss, ``softmax_after_topk``).
- :class:`Experts`: every expert's weights stacked on a leading expert dimension, ``gate_up_proj [E, 2I, H]``
  and ``down_proj [E, H, I]`` (gpt-oss stores them input-major, ``[E, H, 2I]`` and ``[E, I, H]``, with gate
  and up interleaved: ``transposed`` and ``interleaved``). Two ways to run them, the same function:

  * ``grouped``: the ``T * top_k`` (token, expert) pairs are sorted by expert, so that each expert's tokens
    are one contiguous run of rows; ``offsets`` (the running count per expert) mark the runs, and one
    grouped GEMM per projection (``torch._grouped_mm``) multiplies every run by its expert's matrix. Then
    the rows go back to token order and each token's ``top_k`` rows are summed with the router's weights.
    No host sync and fixed shapes: ``torch.compile`` sees the same graph whatever the routing.
  * ``loop``: one matmul per expert over the tokens that chose it (the reference; each expert's token count
    is read on the host).

  ``impl="auto"`` takes ``grouped`` where ``torch._grouped_mm`` runs (a CUDA GPU of compute capability 8.0
  or later) and ``loop`` elsewhere (the CPU).
- :class:`MoEDecoderForCausalLM`: the shared decoder whose blocks hold a :class:`SparseMoE` where the
  family's config says (``config.is_moe_layer(i)``), and the router's load-balancing loss.

The load-balancing loss is the Switch Transformer's, computed as transformers computes it for these families:
over all MoE layers together, ``E * sum_e f_e * P_e`` where ``f_e`` is the share of the ``T * L`` (token,
layer) rows' top-k choices that went to expert ``e`` (summing to ``top_k``) and ``P_e`` the mean router
probability of ``e`` (softmax over all experts). The model adds ``router_aux_loss_coef`` times it to the
training loss when the config's ``output_router_logits`` is true (transformers' switch), through
:meth:`MoEDecoderForCausalLM.auxiliary`, which the trainer reads after each forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemo_lite.components.attention import AttentionMask
from nemo_lite.components.models.decoder import (
    MLP,
    Attention,
    DecoderBlock,
    DecoderConfig,
    DecoderForCausalLM,
    RMSNorm,
    decoder_family,
    rotary_cos_sin,
)
from nemo_lite.components.models.family import HFFacts, ModelFamily

EXPERT_IMPLS = ("auto", "grouped", "loop")


# ---- the grouped GEMM --------------------------------------------------------------------------------


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` by ``weight`` runs in here: the autocast dtype where autocast is on."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs these operands here: bf16 (what it supports under torch.compile) on a
    CUDA GPU of compute capability >= 8.0, every width a multiple of 8 (its rows must be 16-byte aligned). (Its
    CPU kernel, in recent torch, wants the same alignment, and the loop is as fast there.)"""
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda":
        return False
    aligned = all(size % 8 == 0 for size in weight.shape[1:])
    recent = torch.cuda.get_device_capability(x.device) >= (8, 0)
    return aligned and recent and compute_dtype(x, weight) == torch.bfloat16


def grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``out[rows of group e] = x[rows of group e] @ w[e]``, group ``e`` being rows ``offsets[e-1]:offsets[e]``
    (int32, the running row count; the last is ``N``). ``torch._grouped_mm`` is not autocast-aware: both
    operands are cast to the autocast dtype where autocast is on."""
    dtype = compute_dtype(x_NK, w_EKM)
    return torch._grouped_mm(x_NK.to(dtype), w_EKM.to(dtype), offs=offsets_E)


def grouped_mm_emulated(x_NK: torch.Tensor, w_EKM: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm` as one matmul per group (reads the offsets on the host): what the grouped path
    computes, on any device and shape; the tests run the grouped path's sorting and offsets through it."""
    ends = offsets_E.tolist()
    starts = [0, *ends[:-1]]
    parts = [x_NK[s:e] @ w_EKM[i].to(x_NK.dtype) for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    return torch.cat(parts)


# ---- router ----------------------------------------------------------------------------------------


class Router(nn.Module):
    """Scores the experts of each token and keeps the ``top_k`` best, in float32.

    ``forward(x_TH) -> (probs_TE, weights_TK, experts_TK)``: the softmax over all experts (what the
    load-balancing loss reads), the combine weights of the chosen experts and their indices.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        norm_topk_prob: bool,
        softmax_after_topk: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        self.top_k, self.num_experts = top_k, num_experts
        self.norm_topk_prob, self.softmax_after_topk = norm_topk_prob, softmax_after_topk
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The routing decision is made in float32 whatever the autocast: a bf16 logit flips near-ties.
        with torch.autocast(x_TH.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            logits_TE = F.linear(x_TH.float(), self.weight.float(), bias)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.softmax_after_topk:  # gpt-oss: the k best logits, then a softmax over those k
            top_logits_TK, experts_TK = torch.topk(logits_TE, self.top_k, dim=-1)
            return probs_TE, top_logits_TK.softmax(dim=-1), experts_TK
        weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return probs_TE, weights_TK, experts_TK


# ---- experts ---------------------------------------------------------------------------------------


class Experts(nn.Module):
    """``num_experts`` SwiGLU MLPs, their weights stacked under the Hugging Face names.

    ``gate_up_proj``: ``[E, 2I, H]`` (gate rows then up rows), or ``[E, H, 2I]`` when ``transposed``;
    ``down_proj``: ``[E, H, I]``, or ``[E, I, H]`` when ``transposed``. ``interleaved``: gate and up
    alternate along the 2I axis (gpt-oss) instead of being its two halves. ``bias``: ``gate_up_proj_bias
    [E, 2I]`` and ``down_proj_bias [E, H]``. ``swiglu_limit`` (gpt-oss): the clamped SwiGLU
    ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=l)``; None: ``silu(gate) *
    up``. ``impl``: ``auto``, ``grouped`` or ``loop`` (module docstring); an attribute that may be changed
    on a built model.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        transposed: bool = False,
        interleaved: bool = False,
        bias: bool = False,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size  # noqa: E741 (the usual names)
        self.num_experts, self.intermediate_size = E, I
        self.transposed, self.interleaved = transposed, interleaved
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty((E, H, 2 * I) if transposed else (E, 2 * I, H)))
        self.down_proj = nn.Parameter(torch.empty((E, I, H) if transposed else (E, H, I)))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(E, H)) if bias else None
        self.impl = impl

    @property
    def is_transposed(self) -> bool:
        """``transposed`` under the name PEFT's LoRA on stacked weights (``target_parameters``) reads to tell
        ``[E, in, out]`` from ``[E, out, in]``, as on transformers' expert modules."""
        return self.transposed

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in EXPERT_IMPLS:
            raise ValueError(f"experts impl={value!r} is not valid; choose one of: {', '.join(EXPERT_IMPLS)}")
        self._impl = value

    def input_major(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two weights as ``[E, in, out]`` (views; what a matmul ``x @ w[e]`` wants)."""
        if self.transposed:
            return self.gate_up_proj, self.down_proj
        return self.gate_up_proj.transpose(-2, -1), self.down_proj.transpose(-2, -1)

    def activation(self, gate_up_N2I: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            gate, up = gate_up_N2I[..., ::2], gate_up_N2I[..., 1::2]
        else:
            gate, up = gate_up_N2I.chunk(2, dim=-1)
        if self.swiglu_limit is None:
            return F.silu(gate) * up
        gate = gate.clamp(max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.swiglu_alpha))

    def forward(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] * expert_{experts[t, k]}(x[t])`` for every token ``t``."""
        impl = self.impl
        if impl == "auto":
            impl = "grouped" if grouped_mm_runs(x_TH, self.gate_up_proj) else "loop"
        if impl == "loop":
            return self.forward_loop(x_TH, weights_TK, experts_TK)
        return self.forward_grouped(x_TH, weights_TK, experts_TK)

    def forward_loop(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """The reference: for each expert, a matmul over the tokens that chose it."""
        gate_up_EHI, down_EIH = self.input_major()
        out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        for e in range(self.num_experts):
            token_N, slot_N = torch.where(experts_TK == e)
            if token_N.numel() == 0:
                continue
            h = x_TH[token_N] @ gate_up_EHI[e].to(x_TH.dtype)
            if self.gate_up_proj_bias is not None:
                h = h + self.gate_up_proj_bias[e].to(h.dtype)
            y = self.activation(h) @ down_EIH[e].to(h.dtype)
            if self.down_proj_bias is not None:
                y = y + self.down_proj_bias[e].to(y.dtype)
            out_TH.index_add_(0, token_N, y.float() * weights_TK[token_N, slot_N, None])
        return out_TH.to(x_TH.dtype)

    def forward_grouped(
        self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor, mm=None
    ) -> torch.Tensor:
        """Sort the (token, expert) pairs by expert, one grouped GEMM per projection, combine. ``mm``: the
        grouped GEMM (default :func:`grouped_mm`; the tests pass :func:`grouped_mm_emulated`)."""
        mm = grouped_mm if mm is None else mm
        tokens, top_k = experts_TK.shape
        expert_N = experts_TK.reshape(-1)  # N = tokens * top_k pairs, token-major
        order_N = torch.argsort(expert_N, stable=True)  # pairs of expert 0 first, then expert 1, ...
        sorted_expert_N = expert_N[order_N]
        # Running count of pairs per expert: the end of each expert's run of rows (fixed shape, no host sync).
        counts_E = torch.zeros(self.num_experts, dtype=torch.int32, device=x_TH.device)
        counts_E = counts_E.scatter_add(0, sorted_expert_N, torch.ones_like(sorted_expert_N, dtype=torch.int32))
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)
        gate_up_EHI, down_EIH = self.input_major()
        x_NH = x_TH[order_N // top_k]
        h_NI = mm(x_NH, gate_up_EHI, offsets_E)
        if self.gate_up_proj_bias is not None:
            h_NI = h_NI + self.gate_up_proj_bias[sorted_expert_N].to(h_NI.dtype)
        y_NH = mm(self.activation(h_NI), down_EIH, offsets_E)
        if self.down_proj_bias is not None:
            y_NH = y_NH + self.down_proj_bias[sorted_expert_N].to(y_NH.dtype)
        # Back to token order (the inverse permutation), then each token's top_k rows summed in float32.
        unsorted_NH = y_NH[torch.argsort(order_N)]
        out_TH = (unsorted_NH.float().view(tokens, top_k, -1) * weights_TK[..., None]).sum(dim=1)
        return out_TH.to(x_TH.dtype)


# ---- the MoE layer and its block ---------------------------------------------------------------------


class SparseMoE(nn.Module):
    """Router + experts: ``forward(x_BSH) -> (y_BSH, stats_2E)``, ``stats`` the layer's router statistics
    for the load-balancing loss and the load metric: row 0 the summed router probabilities of each expert
    (differentiable), row 1 the number of top-k choices each expert received."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        c = config
        self.router = Router(
            c.hidden_size,
            c.num_experts,
            c.num_experts_per_tok,
            norm_topk_prob=c.norm_topk_prob,
            softmax_after_topk=c.softmax_after_topk,
            bias=c.router_bias,
        )
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size, **c.experts_layout())

    def forward(self, x_BSH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        probs_TE, weights_TK, experts_TK = self.router(x_TH)
        y_TH = self.experts(x_TH, weights_TK, experts_TK)
        counts_E = torch.zeros_like(probs_TE[0]).scatter_add(
            0, experts_TK.reshape(-1), torch.ones_like(weights_TK).reshape(-1)
        )
        return y_TH.view_as(x_BSH), torch.stack([probs_TE.sum(dim=0), counts_E.detach()])


class MoEDecoderBlock(DecoderBlock):
    """The shared decoder's block with a :class:`SparseMoE` (or, where the config says, the dense MLP) as its
    MLP. ``forward`` returns ``(h, stats_2E)``, ``stats`` None in a dense layer."""

    def __init__(self, config: MoEConfig, attention: Attention, sparse: bool) -> None:
        nn.Module.__init__(self)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = attention
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config) if sparse else MLP(config)

    def forward(self, x_BSE, cos_B1SD, sin_B1SD, attention_mask: AttentionMask):
        h_BSE = x_BSE + self.attention(self.attention_norm(x_BSE), cos_B1SD, sin_B1SD, attention_mask)
        if isinstance(self.mlp, SparseMoE):
            y_BSE, stats_2E = self.mlp(self.mlp_norm(h_BSE))
            return h_BSE + y_BSE, stats_2E
        return h_BSE + self.mlp(self.mlp_norm(h_BSE)), None


@dataclass(kw_only=True)
class MoEConfig(DecoderConfig):
    """What every mixture-of-experts family adds to :class:`DecoderConfig` (Hugging Face's names)."""

    # Number of experts in each MoE layer (config.json: num_experts or num_local_experts).
    num_experts: int = 8
    # Experts each token is routed to (top-k).
    num_experts_per_tok: int = 2
    # Width of each expert's SwiGLU (intermediate_size is the dense MLP's, in layers without experts).
    moe_intermediate_size: int = 768
    # Renormalize the top-k router probabilities to sum to one.
    norm_topk_prob: bool = False
    # Add router_aux_loss_coef x the load-balancing loss to the training loss (transformers' switch).
    output_router_logits: bool = False
    # Weight of the load-balancing loss.
    router_aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}")

    # ---- what the MoE decoder builds (a family overrides the ones it changes) --------------------------

    @property
    def softmax_after_topk(self) -> bool:
        """Router: top-k of the logits then softmax over the k (gpt-oss), not softmax then top-k."""
        return False

    @property
    def router_bias(self) -> bool:
        return False

    def experts_layout(self) -> dict:
        """Keyword arguments of :class:`Experts` beyond the shape (layout, biases, activation)."""
        return {}

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` has experts (else the dense MLP of ``intermediate_size``)."""
        return True

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]


@dataclass
class Auxiliary:
    """What a model adds to the training step beyond the token loss, from its last forward."""

    # Added to the mean token loss (already weighted by its coefficient); None: nothing added.
    loss: torch.Tensor | None
    # Device scalars to log with the step (averaged over micro-batches).
    metrics: dict[str, torch.Tensor]


class MoEDecoderForCausalLM(DecoderForCausalLM):
    """The shared decoder with :class:`SparseMoE` layers. After each forward, :meth:`auxiliary` gives the
    load-balancing loss (when ``config.output_router_logits``) and the load metrics."""

    config_class = MoEConfig

    def build_block(self, index: int, sliding_window: int) -> nn.Module:
        attention = self.build_attention(index, sliding_window)
        return MoEDecoderBlock(self.config, attention, self.config.is_moe_layer(index))

    def build_attention(self, index: int, sliding_window: int) -> nn.Module:
        """Layer ``index``'s attention (a family with attention of its own, e.g. sinks, overrides it)."""
        return Attention(self.config, self.attention_backend, sliding_window)

    def forward_hidden(
        self,
        input_ids_BS: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """As :meth:`DecoderForCausalLM.forward_hidden`; also keeps the router statistics for :meth:`auxiliary`."""
        if attention_mask is None:
            attention_mask = self.build_attention_mask(input_ids_BS)
        if position_ids is None:
            position_ids = torch.arange(input_ids_BS.shape[1], device=input_ids_BS.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        cos_B1SD, sin_B1SD = rotary_cos_sin(self.config, position_ids)
        h_BSE = self.embed_tokens(input_ids_BS)
        stats = []
        for layer in self.layers:
            h_BSE, stats_2E = layer(h_BSE, cos_B1SD, sin_B1SD, attention_mask)
            if stats_2E is not None:
                stats.append(stats_2E)
        self._router_stats = (torch.stack(stats), input_ids_BS.numel()) if stats else None
        return self.norm(h_BSE)

    def load_balancing_loss(self) -> torch.Tensor:
        """The last forward's load-balancing loss, unweighted (transformers' ``aux_loss``)."""
        stats_L2E, tokens = self._router_stats
        rows = tokens * stats_L2E.shape[0]  # every (token, MoE layer) pair
        prob_share_E = stats_L2E[:, 0].sum(0) / rows
        choice_share_E = stats_L2E[:, 1].sum(0) / rows
        return self.config.num_experts * (choice_share_E * prob_share_E).sum()

    def auxiliary(self) -> Auxiliary | None:
        """The last forward's router loss (``router_aux_loss_coef`` x :meth:`load_balancing_loss` when
        ``output_router_logits``) and metrics: ``aux_loss`` (unweighted) and ``expert_load_imbalance``, the
        busiest expert's tokens over the mean, averaged over the MoE layers (1.0 = perfectly even)."""
        if getattr(self, "_router_stats", None) is None:
            return None
        counts_LE = self._router_stats[0][:, 1]
        imbalance = (counts_LE.max(dim=1).values / counts_LE.mean(dim=1).clamp(min=1e-9)).mean()
        aux = self.load_balancing_loss()
        loss = self.config.router_aux_loss_coef * aux if self.config.output_router_logits else None
        return Auxiliary(loss=loss, metrics={"aux_loss": aux.detach(), "expert_load_imbalance": imbalance})

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """:meth:`DecoderForCausalLM.init_weights`, and the routers, the stacked experts and the attention sinks
        (their own parameters): N(0, std), biases zero."""
        super().init_weights(seed)
        generator = None
        for module in self.modules():
            if isinstance(module, (Router, Experts)) or getattr(module, "sinks", None) is not None:
                for name, param in module.named_parameters(recurse=False):
                    if name.endswith("bias"):
                        param.zero_()
                        continue
                    if generator is None or generator.device != param.device:
                        generator = torch.Generator(device=param.device).manual_seed(seed + 1)
                    param.normal_(0.0, self.config.initializer_range, generator=generator)


# ---- what a family entry of this decoder says: parameter counts and FLOPs ---------------------------


def expert_parameters(config: MoEConfig) -> int:
    """Parameters of one expert (its share of the stacked weights and biases)."""
    c = config
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    if c.experts_layout().get("bias"):
        per_expert += 2 * c.moe_intermediate_size + c.hidden_size
    return per_expert


def num_parameters(config: MoEConfig, *, active: bool = False) -> int:
    """Parameters of the model ``config`` describes, counted without building it; ``active``: only the
    ``num_experts_per_tok`` experts a token goes through in each MoE layer."""
    from nemo_lite.components.models.decoder import num_parameters as dense_parameters

    c = config
    total = dense_parameters(c)  # as if every layer had the dense MLP
    dense_mlp = 3 * c.hidden_size * c.intermediate_size + (2 * c.intermediate_size + c.hidden_size) * c.mlp_bias
    experts = c.num_experts_per_tok if active else c.num_experts
    router = c.num_experts * (c.hidden_size + c.router_bias)
    moe = router + experts * expert_parameters(c)
    return total + len(c.moe_layers()) * (moe - dense_mlp)


def flops_per_token(model: nn.Module) -> int:
    """6 x the parameters that multiply each token, counting in each MoE layer the router and only the
    ``num_experts_per_tok`` experts the token goes through (the active parameters), as the dense decoder's
    count otherwise (the embedding lookup not counted, a tied output once)."""
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    idle_experts = c.num_experts - c.num_experts_per_tok
    total -= len(c.moe_layers()) * idle_experts * expert_parameters(c)
    if not c.tie_word_embeddings:
        total -= model.embed_tokens.weight.numel()
    return 6 * total


def moe_family(
    name: str, model_cls: type[MoEDecoderForCausalLM], presets: Mapping[str, MoEConfig], hf: HFFacts
) -> ModelFamily:
    """The entry of a mixture-of-experts family: the shared decoder's (blocks, FSDP2 plan, attention FLOPs) with
    the parameter count and the FLOPs of :mod:`moe` (MFU counts the active parameters)."""
    entry = decoder_family(name, model_cls, presets, hf)
    return dataclasses.replace(entry, num_parameters=num_parameters, flops_per_token=flops_per_token)


def experts_implementation(model: nn.Module, impl: str) -> None:
    """Set how every :class:`Experts` of ``model`` runs: ``auto``, ``grouped`` or ``loop``."""
    for module in model.modules():
        if isinstance(module, Experts):
            module.impl = impl


__all__ = [
    "EXPERT_IMPLS",
    "Auxiliary",
    "Experts",
    "MoEConfig",
    "MoEDecoderBlock",
    "MoEDecoderForCausalLM",
    "Router",
    "SparseMoE",
    "experts_implementation",
    "flops_per_token",
    "grouped_mm",
    "grouped_mm_emulated",
    "grouped_mm_runs",
    "moe_family",
    "num_parameters",
]
