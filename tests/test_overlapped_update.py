"""The overlapped update: fused AdamW cut by module (on a side stream on GPU) is bitwise the one
fused step, each module waits for its own piece, and the trainer's results do not change."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from recipe_utils import tiny_config

from nemo_lite.components.models import LlamaForCausalLM, get_preset
from nemo_lite.training.config import ConfigError, validate
from nemo_lite.training.optim import AdamW, OverlappedUpdate, clipped_step
from nemo_lite.training.trainer import Trainer


def tiny_model(tied: bool, device: str = "cpu") -> LlamaForCausalLM:
    config = dataclasses.replace(get_preset("tiny"), vocab_size=96, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config, attention="sdpa", attn_mask_type="block_causal").to(device)
    model.init_weights(seed=0)
    return model


def module_order(model: LlamaForCausalLM) -> list[torch.nn.Module]:
    return [model.embed_tokens, *model.layers, model.norm] + ([model.lm_head] if model.lm_head is not None else [])


def optimizer_for(model: LlamaForCausalLM) -> AdamW:
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return AdamW(groups, lr=1e-2, fused=True)


def train(model: LlamaForCausalLM, update, steps: int = 3, max_norm: float = 0.5) -> list[float]:
    """A few steps on fixed random tokens; ``update(grad_norm, max_norm)`` steps the optimizer."""
    gen = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen).to(device)
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        update(norm, max_norm)
        for p in model.parameters():
            p.grad = None
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tied", [True, False])
def test_update_in_pieces_is_bitwise_the_fused_step(tied):
    whole, pieces = tiny_model(tied), tiny_model(tied)
    opt_whole, opt_pieces = optimizer_for(whole), optimizer_for(pieces)
    overlap = OverlappedUpdate(opt_pieces, module_order(pieces), torch.device("cpu"))
    pieces.before_module = overlap.wait
    # Large enough gradients that the 0.5 clip acts: the pieces must all see the one global scale.
    want = train(whole, lambda norm, max_norm: clipped_step(opt_whole, norm, max_norm))
    got = train(pieces, lambda norm, max_norm: clipped_step(opt_pieces, norm, max_norm))
    assert got == want
    for (name, a), b in zip(whole.state_dict().items(), pieces.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(opt_whole.state.values(), opt_pieces.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_each_module_waits_for_the_last_piece_holding_its_parameters():
    model = tiny_model(tied=True)
    overlap = OverlappedUpdate(optimizer_for(model), module_order(model), torch.device("cpu"))
    layers = len(model.layers)
    assert overlap.wait_unit[id(model.embed_tokens)] == 0  # the tied head's weight is the embedding's piece
    assert [overlap.wait_unit[id(layer)] for layer in model.layers] == list(range(1, layers + 1))
    assert overlap.wait_unit[id(model.norm)] == layers + 1
    seen = []
    model.before_module = seen.append
    model(torch.zeros(1, 4, dtype=torch.long))
    assert seen == module_order(model)  # the forward announces every module, in the order it runs them


def test_a_parameter_outside_the_modules_is_refused():
    model = tiny_model(tied=True)
    with pytest.raises(ValueError, match="belong to none of the given modules"):
        OverlappedUpdate(optimizer_for(model), [model.embed_tokens, model.norm], torch.device("cpu"))
    with pytest.raises(ValueError, match="fused AdamW"):
        OverlappedUpdate(torch.optim.AdamW(model.parameters()), module_order(model), torch.device("cpu"))


def test_overlap_needs_fused_adamw(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.optim.overlap_update, cfg.optim.fused = "true", "false"
    with pytest.raises(ConfigError, match="optim.overlap_update=true .* optim.fused=true"):
        validate(cfg)
    cfg.optim.overlap_update = "sometimes"
    with pytest.raises(ConfigError, match="optim.overlap_update='sometimes' is not valid; choose one of: auto, true"):
        validate(cfg)


def test_trainer_with_the_update_in_pieces_trains_and_resumes_exactly(tmp_path):
    """Auto is off on CPU; forced on, the trainer's losses, weights and checkpoints are unchanged."""

    def run(name: str, overlap: str, steps: int = 6, resume: str = "false"):
        cfg = tiny_config(tmp_path / name, "sdpa", steps=steps)
        cfg.optim.fused, cfg.optim.overlap_update = "true", overlap
        cfg.trainer.save_every, cfg.trainer.resume = 3, resume
        cfg.trainer.sample_tokens, cfg.trainer.export_hf = 0, False
        trainer = Trainer(cfg)
        trainer.setup()
        assert (trainer._overlap is not None) == (overlap == "true")
        return trainer, trainer.fit()

    plain, plain_result = run("plain", "auto")
    pieces, pieces_result = run("pieces", "true")
    assert pieces_result.losses == plain_result.losses
    for a, b in zip(plain.raw_model.state_dict().values(), pieces.raw_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    resumed, resumed_result = run("pieces", "true", resume="true")  # from the step-6 checkpoint: nothing to do
    assert resumed.step == 6 and resumed_result.losses == []
    _, from_3 = run("pieces", "true", resume=str(tmp_path / "pieces" / "checkpoints" / "step_000003"))
    assert from_3.losses == plain_result.losses[3:]


@pytest.mark.gpu
@pytest.mark.parametrize("tied", [True, False])
def test_overlapped_update_on_a_side_stream_is_bitwise_the_fused_step(tied):
    """On a GPU the pieces run on their own stream while the next forward waits module by module."""
    whole, pieces = tiny_model(tied, "cuda"), tiny_model(tied, "cuda")
    opt_whole, opt_pieces = optimizer_for(whole), optimizer_for(pieces)
    overlap = OverlappedUpdate(opt_pieces, module_order(pieces), torch.device("cuda"))
    assert overlap.stream is not None
    pieces.before_module = overlap.wait
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = train(whole, lambda norm, max_norm: clipped_step(opt_whole, norm, max_norm), steps=8)
        got = train(pieces, lambda norm, max_norm: clipped_step(opt_pieces, norm, max_norm), steps=8)
    overlap.wait_all()
    assert got == want
    for (name, a), b in zip(whole.state_dict().items(), pieces.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_trainer_overlapped_on_a_gpu_gives_the_serial_run_exactly(tmp_path):
    """The trainer's default on one GPU (overlapped update, its own higher-priority compute stream)
    against the update after the step: the same losses, weights and checkpoint."""
    from nemo_lite.components.datasets.synthetic import SyntheticPackedLoader

    def run(overlap: str):
        cfg = tiny_config(tmp_path / overlap, "flex", steps=8)
        cfg.model.vocab_from_tokenizer = False
        cfg.data.seq_len, cfg.optim.overlap_update = 128, overlap
        cfg.trainer.save_every, cfg.trainer.sample_tokens, cfg.trainer.export_hf = 4, 0, False
        loader = SyntheticPackedLoader(4, 128, vocab_size=256, eos_id=3, mean_doc=40, seed=1, pin_memory=True)
        trainer = Trainer(cfg, train_loader=loader)
        result = trainer.fit()
        assert (trainer._overlap is not None) == (overlap == "auto")
        return trainer, result

    serial, serial_result = run("false")
    overlapped, overlapped_result = run("auto")
    assert overlapped_result.losses == serial_result.losses
    for a, b in zip(serial.raw_model.state_dict().values(), overlapped.raw_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    from safetensors.torch import load_file

    saved = [load_file(r.last_checkpoint / "model.safetensors") for r in (serial_result, overlapped_result)]
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[1][key]), key
