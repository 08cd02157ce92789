"""Generation with a static KV cache: prefill the prompts through the model's attention backend, then decode one
token per step over the cache.

    from nemo_lite.components.models.generate import GenerationConfig, generate_ids

    config = GenerationConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0, eos_token_ids=(2,))
    out = generate_ids(model, [prompt_a_ids, prompt_b_ids], config)   # prompts of different lengths
    out.tokens[0]              # the new tokens of the first prompt (the stop token included)
    out.stop_reasons[0]        # "eos", "stop_string" or "length"

How it works, for a batch of ``B`` prompts (the longest ``P`` tokens) and ``N`` new tokens:

- :class:`KVCache`: one key and one value buffer ``[B, Hkv, P + N, D]`` per layer (``w + 1`` slots, a ring, in
  a layer with a sliding window ``w`` shorter than that), allocated once, after checking that the device has
  the memory for it. Prompts are right-padded, so every prompt starts at position 0 and row ``b`` writes its
  next key at its own position ``pos[b]``.
- Prefill: the prompts go through the model's layers with a *causal* view of the prompt (a run trained with
  block-causal masks would otherwise split a chat prompt at every end-of-turn token), through the model's
  own attention backend. Padding sits after each prompt, so no prompt token ever sees it.
- Decode: one token per row per step, with static shapes (the token ``[B]``, the positions ``[B]``, the whole
  cache), so a step compiles once and, on a GPU, is captured in a CUDA graph and replayed. Each query attends
  to the positions ``<= pos[b]`` the cache holds, and a sliding-window layer only to those within its window.
- Sampling on the logits of the last position: greedy (``temperature=0``), or temperature, top-k and top-p
  with a seeded generator. A row stops at any of ``eos_token_ids`` or a stop string; the others go on.

Everything here needs torch only; a tokenizer comes in as a ``decode`` function where stop strings need it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemo_lite.components.attention import AttentionMask
from nemo_lite.components.models.decoder import apply_rotary, rotary_cos_sin
from nemo_lite.errors import NemoLiteError


class GenerationError(NemoLiteError, ValueError):
    """A generation setting or its memory does not fit; one line naming the value and what would fit."""


@dataclass(kw_only=True)
class GenerationConfig:
    """How to continue a batch of prompts."""

    # New tokens per prompt at most (the stop token included).
    max_new_tokens: int = 64
    # 0 = greedy (argmax); > 0 divides the logits before sampling.
    temperature: float = 0.0
    # Sample among the k most likely tokens only (0 = all).
    top_k: int = 0
    # Sample among the most likely tokens whose probabilities add up to top_p (1 = all).
    top_p: float = 1.0
    # Seed of the sampling generator (None: torch's global generator).
    seed: int | None = None
    # A row stops after producing any of these ids (the EOS ids, the end-of-turn token).
    eos_token_ids: tuple[int, ...] = ()
    # A row stops once its decoded new text contains any of these (needs ``decode``).
    stop_strings: tuple[str, ...] = ()
    # Compile the decode step (torch.compile, static shapes).
    compile: bool = False
    # On CUDA, capture the decode step in a CUDA graph and replay it.
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        self.eos_token_ids = tuple(int(i) for i in self.eos_token_ids)
        self.stop_strings = tuple(self.stop_strings)
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k} must be >= 0 (0 = no top-k cut)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1] (1 = no top-p cut)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationOutput:
    """The new tokens of each prompt (through its stop token), why each stopped, and the timings."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # Decode steps run (each gives one token to every row still going).
    decode_steps: int = 0


# ---- the cache ----------------------------------------------------------------------------------------


def cache_lengths(config, max_len: int) -> tuple[int, ...]:
    """Slots per row of each layer's cache: ``max_len``, or ``w + 1`` for a layer whose sliding window ``w``
    makes older keys unreachable (its cache is then a ring)."""
    return tuple(min(max_len, w + 1) if w else max_len for w in config.layer_windows())


def kv_cache_bytes(config, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of the keys and values of every layer for ``batch_size`` rows of ``max_len`` tokens."""
    per_slot = 2 * batch_size * config.num_key_value_heads * config.head_dim
    return per_slot * sum(cache_lengths(config, max_len)) * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device) -> int | None:
    """What can still be allocated on ``device`` (None where it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


class KVCache(nn.Module):
    """Keys and values ``[B, Hkv, T_layer, D]`` of every layer, as buffers (a compiled step sees fixed addresses).

    Position ``p`` of a row lives in slot ``p % T_layer``. ``T_layer`` is ``max_len`` (slot = position), or
    ``w + 1`` in a layer with sliding window ``w`` shorter than that: a ring that keeps exactly the keys a query
    can still see. A query at position ``pos`` reads in slot ``s`` the latest position ``p <= pos`` with
    ``p % T_layer == s``, where ``p >= 0`` (and ``pos - p <= w``).
    """

    def __init__(self, config, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        device = torch.device(device)
        need = kv_cache_bytes(config, batch_size, max_len, dtype)
        free = free_memory_bytes(device)
        if free is not None and need > free:
            raise GenerationError(
                f"the KV cache for {batch_size} prompts x {max_len} tokens needs {need / 2**30:.2f} GiB and "
                f"{device} has {free / 2**30:.2f} GiB free; generate fewer prompts at once or fewer new tokens"
            )
        self.lengths = cache_lengths(config, max_len)
        for i, length in enumerate(self.lengths):
            shape = (batch_size, config.num_key_value_heads, length, config.head_dim)
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")


# ---- the model's layers, run over the cache ------------------------------------------------------------


def _qkv(attention: nn.Module, x_BSE: torch.Tensor, cos_B1SD: torch.Tensor, sin_B1SD: torch.Tensor):
    """q ``[B, H, S, D]``, k and v ``[B, Hkv, S, D]`` of one layer, as the decoder's Attention computes them."""
    batch, seq_len, _ = x_BSE.shape
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q_BSHD = attention.q_proj(x_BSE).view(batch, seq_len, heads, dim)
    k_BSKD = attention.k_proj(x_BSE).view(batch, seq_len, kv_heads, dim)
    v_BSKD = attention.v_proj(x_BSE).view(batch, seq_len, kv_heads, dim)
    if attention.q_norm is not None:
        q_BSHD, k_BSKD = attention.q_norm(q_BSHD), attention.k_norm(k_BSKD)
    q_BHSD = apply_rotary(q_BSHD.transpose(1, 2), cos_B1SD, sin_B1SD)
    k_BKSD = apply_rotary(k_BSKD.transpose(1, 2), cos_B1SD, sin_B1SD)
    return q_BHSD, k_BKSD, v_BSKD.transpose(1, 2)


def causal_view(model: nn.Module, batch_size: int, seq_len: int, device: torch.device) -> AttentionMask:
    """A causal mask of the model's own backend (whatever mask type it was trained with): one prompt per row."""
    backend = model.attention_backend
    return AttentionMask(
        backend=backend.name,
        attn_mask_type="causal",
        fixed_block_size=None,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        doc_ids=None,
    )


def _keep_prompt(cache: KVCache, i: int, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, lengths_B: torch.Tensor) -> None:
    """Write the prompt's keys and values of layer ``i``: all of them, or in a ring only each row's last ones."""
    k_cache, v_cache = cache.layer(i)
    length, seq_len = cache.lengths[i], k_BKSD.shape[2]
    if seq_len <= length:  # every position fits at its own slot
        k_cache[:, :, :seq_len].copy_(k_BKSD)
        v_cache[:, :, :seq_len].copy_(v_BKSD)
        return
    # the last `length` positions of each row (those before position 0 are clamped: their slots stay unread)
    wanted_BL = lengths_B[:, None] - length + torch.arange(length, device=lengths_B.device)
    wanted_BL = torch.where(wanted_BL < 0, wanted_BL + length, wanted_BL)  # distinct slots, never read
    index_BKLD = wanted_BL[:, None, :, None].expand(-1, k_BKSD.shape[1], -1, k_BKSD.shape[3])
    slots_BKLD = index_BKLD % length
    k_cache.scatter_(2, slots_BKLD, k_BKSD.gather(2, index_BKLD).to(k_cache.dtype))
    v_cache.scatter_(2, slots_BKLD, v_BKSD.gather(2, index_BKLD).to(v_cache.dtype))


def prefill(model: nn.Module, cache: KVCache, ids_BS: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """Run the right-padded prompts ``ids_BS`` through the model with a causal view, keep every layer's keys
    and values in ``cache`` (slots ``0 .. S-1``), and return the logits ``[B, vocab]`` of each prompt's last
    token (at ``lengths_B - 1``)."""
    batch, seq_len = ids_BS.shape
    mask = causal_view(model, batch, seq_len, ids_BS.device)
    positions_BS = torch.arange(seq_len, device=ids_BS.device)[None].expand(batch, seq_len)
    cos_B1SD, sin_B1SD = rotary_cos_sin(model.config, positions_BS)
    h_BSE = model.embed_tokens(ids_BS)
    for i, block in enumerate(model.layers):
        attention = block.attention
        q_BHSD, k_BKSD, v_BKSD = _qkv(attention, block.attention_norm(h_BSE), cos_B1SD, sin_B1SD)
        _keep_prompt(cache, i, k_BKSD, v_BKSD, lengths_B)
        out_BHSD = attention.backend(
            q_BHSD,
            k_BKSD,
            v_BKSD,
            sliding_window=attention.sliding_window,
            enable_gqa=True,
            attention_mask=mask,
            **({} if attention.sinks is None else {"sink_weights": attention.sinks}),
        )
        out_BSE = attention.o_proj(out_BHSD.transpose(1, 2).reshape(batch, seq_len, -1))
        h_BSE = h_BSE + out_BSE
        h_BSE = h_BSE + _feed_forward(block, h_BSE)
    last_BE = h_BSE[torch.arange(batch, device=ids_BS.device), lengths_B - 1]
    return F.linear(model.norm(last_BE), model.output_weight)


def _feed_forward(block: nn.Module, h_BSE: torch.Tensor) -> torch.Tensor:
    """The block's MLP on its normed input; a mixture-of-experts layer also returns routing statistics,
    which generation does not need."""
    out = block.mlp(block.mlp_norm(h_BSE))
    return out[0] if isinstance(out, tuple) else out


def _cached_attention(
    q_BH1D: torch.Tensor,
    k_BKTD: torch.Tensor,
    v_BKTD: torch.Tensor,
    allowed_BT: torch.Tensor,
    sinks_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per row against the whole cache; ``[B, Hkv, H / Hkv, D]``.

    The query heads of a KV head are stacked against it (query head h reads KV head h // (H / Hkv)), so the
    cache is read once per step and never repeated per query head; softmax in float32. ``sinks_H``: one
    learned logit per query head that takes part in the softmax with no value (gpt-oss)."""
    batch, heads, _, dim = q_BH1D.shape
    kv_heads = k_BKTD.shape[1]
    q_BKGD = q_BH1D.view(batch, kv_heads, heads // kv_heads, dim)
    scores_BKGT = torch.matmul(q_BKGD, k_BKTD.transpose(-1, -2)).float() * (1.0 / math.sqrt(dim))
    scores_BKGT = scores_BKGT.masked_fill(~allowed_BT[:, None, None, :], float("-inf"))
    if sinks_H is None:
        probs_BKGT = scores_BKGT.softmax(dim=-1)
    else:
        sink_BKG1 = sinks_H.float().view(1, kv_heads, heads // kv_heads, 1).expand(batch, -1, -1, -1)
        probs_BKGT = torch.cat([scores_BKGT, sink_BKG1], dim=-1).softmax(dim=-1)[..., :-1]
    return torch.matmul(probs_BKGT.to(v_BKTD.dtype), v_BKTD)


def decode_step(model: nn.Module, cache: KVCache, token_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
    """One token per row: ``token_B`` at position ``pos_B`` goes through every layer, its key and value are
    written to slot ``pos_B`` of the cache, and the logits ``[B, vocab]`` of the next token come back.

    Shapes never change from step to step (the whole cache is read, the slots beyond each row's position
    masked), so the step compiles once and can be replayed as a CUDA graph."""
    batch = token_B.shape[0]
    rows_B = torch.arange(batch, device=token_B.device)
    behind = {}  # per cache length: how far behind the query each slot's position lies (> pos: never written)
    for length in sorted(set(cache.lengths)):
        slots_T = torch.arange(length, device=token_B.device)
        behind[length] = (pos_B[:, None] - slots_T[None]) % length  # pos - p for p the latest position in slot
    cos_B1SD, sin_B1SD = rotary_cos_sin(model.config, pos_B[:, None])
    h_B1E = model.embed_tokens(token_B[:, None])
    for i, block in enumerate(model.layers):
        attention = block.attention
        q_BH1D, k_BK1D, v_BK1D = _qkv(attention, block.attention_norm(h_B1E), cos_B1SD, sin_B1SD)
        k_cache, v_cache = cache.layer(i)
        length = cache.lengths[i]
        k_cache[rows_B, :, pos_B % length] = k_BK1D[:, :, 0].to(k_cache.dtype)
        v_cache[rows_B, :, pos_B % length] = v_BK1D[:, :, 0].to(v_cache.dtype)
        behind_BT = behind[length]
        allowed_BT = behind_BT <= pos_B[:, None]  # that position is >= 0
        if attention.sliding_window:
            allowed_BT = allowed_BT & (behind_BT <= attention.sliding_window)
        out_BKGD = _cached_attention(q_BH1D.to(k_cache.dtype), k_cache, v_cache, allowed_BT, attention.sinks)
        h_B1E = h_B1E + attention.o_proj(out_BKGD.reshape(batch, 1, -1).to(h_B1E.dtype))
        h_B1E = h_B1E + _feed_forward(block, h_B1E)
    return F.linear(model.norm(h_B1E[:, 0]), model.output_weight)


# ---- sampling ---------------------------------------------------------------------------------------------


def sample_next(logits_BV: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: argmax when greedy, else a draw after temperature, top-k and top-p."""
    if config.greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / config.temperature
    if config.top_k:
        kth_B1 = torch.topk(logits_BV, min(config.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if config.top_p < 1:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # drop a token once the more likely ones before it already hold top_p (the most likely always stays)
        drop_BV = (probs_BV.cumsum(dim=-1) - probs_BV) >= config.top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


# ---- the loop ---------------------------------------------------------------------------------------------


class _Stepper:
    """The decode step as it runs: plain, compiled, or replayed from a CUDA graph over static buffers."""

    def __init__(self, model: nn.Module, cache: KVCache, batch: int, device: torch.device, config: GenerationConfig):
        self.model, self.cache = model, cache
        fn = decode_step
        if config.compile:
            fn = torch.compile(decode_step, fullgraph=True, dynamic=False)
        self.fn = fn
        self.graph = None
        if config.cuda_graphs and device.type == "cuda":
            self.token_B = torch.zeros(batch, dtype=torch.long, device=device)
            self.pos_B = torch.zeros(batch, dtype=torch.long, device=device)
            self._capture()

    def _capture(self) -> None:
        # Warm up on a side stream (compiles, allocator pools), then capture; the cache slots the warm-up
        # wrote are rewritten by prefill and every step before they are read.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.fn(self.model, self.cache, self.token_B, self.pos_B)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_BV = self.fn(self.model, self.cache, self.token_B, self.pos_B)

    def __call__(self, token_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.fn(self.model, self.cache, token_B, pos_B)
        self.token_B.copy_(token_B)
        self.pos_B.copy_(pos_B)
        self.graph.replay()
        return self.logits_BV


def cache_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype keys and values come out in: autocast's when it is on, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.embed_tokens.weight.dtype


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    decode: Callable[[list[int]], str] | None = None,
    on_tokens: Callable[[list[int | None]], None] | None = None,
) -> GenerationOutput:
    """Continue each prompt (token ids, of any lengths) under ``config``; see the module docstring.

    ``decode`` (ids -> text) is needed for ``config.stop_strings``. ``on_tokens`` is called after every step
    with each row's new token (None for a row that has stopped), for streaming. The model's training mode is
    restored afterwards.
    """
    config = config or GenerationConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token; got an empty prompt or no prompts")
    if config.stop_strings and decode is None:
        raise GenerationError("stop_strings need a decode function (token ids -> text); pass decode=")
    device = model.embed_tokens.weight.device
    lengths = [len(p) for p in prompts]
    batch, longest = len(prompts), max(lengths)
    max_len = longest + config.max_new_tokens
    ids_BS = torch.zeros(batch, longest, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids_BS[b, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
    ids_BS = ids_BS.to(device)
    lengths_B = torch.tensor(lengths, device=device)
    generator = None
    if config.seed is not None and not config.greedy:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config, batch, max_len, dtype=cache_dtype(model, device), device=device)
        stepper = _Stepper(model, cache, batch, device, config) if config.max_new_tokens > 1 else None
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        token_B = sample_next(prefill(model, cache, ids_BS, lengths_B), config, generator)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        reasons: list[str | None] = [None] * batch
        eos = set(config.eos_token_ids)

        def record(step_tokens: list[int]) -> None:
            streamed: list[int | None] = [None] * batch
            for b, tok in enumerate(step_tokens):
                if reasons[b] is not None:
                    continue
                tokens[b].append(tok)
                streamed[b] = tok
                if tok in eos:
                    reasons[b] = "eos"
                elif config.stop_strings and any(s in decode(tokens[b]) for s in config.stop_strings):
                    reasons[b] = "stop_string"
                elif len(tokens[b]) == config.max_new_tokens:
                    reasons[b] = "length"
            if on_tokens is not None:
                on_tokens(streamed)

        record(token_B.tolist())
        sync()
        prefill_seconds = time.perf_counter() - start
        start, steps = time.perf_counter(), 0
        pos_B = lengths_B.clone()
        while any(r is None for r in reasons):
            token_B = sample_next(stepper(token_B, pos_B), config, generator)
            pos_B = pos_B + 1
            steps += 1
            record(token_B.tolist())
        decode_seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    return GenerationOutput(
        tokens=tokens,
        stop_reasons=[r or "length" for r in reasons],
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        decode_steps=steps,
    )


def generate(
    model: nn.Module,
    input_ids_BS: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Greedy: append up to ``max_new_tokens`` tokens to ``input_ids_BS`` ``[B, S]``; returns ``[B, S + n]``.

    With ``eos_token_id`` (an id or a list), rows that stopped are padded with their stop token, as
    transformers pads them, and ``n`` is the longest row's count.
    """
    eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos)
    out = generate_ids(model, input_ids_BS.tolist(), config)
    longest = max(len(t) for t in out.tokens)
    rows = [t + [t[-1]] * (longest - len(t)) for t in out.tokens]
    new_BN = torch.tensor(rows, dtype=input_ids_BS.dtype, device=input_ids_BS.device)
    return torch.cat([input_ids_BS, new_BN], dim=1)
