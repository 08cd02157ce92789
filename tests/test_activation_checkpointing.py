"""trainer.activation_checkpointing: none, full and selective (per operator, as torchtitan's) give the
gradients of a run without checkpointing, bit for bit; full recomputes every operator of a block in
backward, selective all but attention and every other matmul, the outputs it says it keeps."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.models import family_of_preset
from nemo_lite.training.activation_checkpointing import ATTENTION, ac_mode, checkpoint_blocks
from nemo_lite.training.config import ConfigError, RecipeConfig, validate
from nemo_lite.training.loss import cross_entropy_sum

LAYERS = 2
LINEARS = 7  # q, k, v, o, gate, up, down: one mm each per block


class OpCounter(TorchDispatchMode):
    """Counts the operators run while it is active (below autograd: what actually executes)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def tiny(backend: str = "sdpa", mask_type: str = "causal"):
    family = family_of_preset("tiny")
    config = family.preset("tiny", num_hidden_layers=LAYERS, vocab_size=256, eos_token_id=3)
    model = family.build(config, attention=AttentionConfig(backend=backend, attn_mask_type=mask_type))
    model.init_weights(seed=0)
    return family, model


def run(mode: str, model=None):
    """One forward and backward in float32 (of ``model``, checkpointed already, or of a tiny model
    checkpointed with ``mode``); the gradients, and the operators the backward ran."""
    if model is None:
        family, model = tiny()
        checkpoint_blocks(family.blocks(model), mode)
    ids = torch.randint(4, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    loss = cross_entropy_sum(model.forward_hidden(ids), model.output_weight, ids)
    with OpCounter() as counter:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, counter.ops


def test_every_mode_gives_the_gradients_of_no_checkpointing_and_recomputes_what_it_says():
    grads, ops = {}, {}
    for mode in ("none", "full", "selective"):
        grads[mode], ops[mode] = run(mode)
    for mode in ("full", "selective"):
        assert grads[mode].keys() == grads["none"].keys()
        for name, grad in grads[mode].items():
            assert torch.equal(grad, grads["none"][name]), (mode, name)

    def recomputed(mode, ops_of):
        return sum(ops[mode][op] - ops["none"][op] for op in ops_of)

    mm = [torch.ops.aten.mm.default]
    attention = [op for op in ATTENTION if ops["full"][op]]
    assert attention, "the sdpa backend ran none of the attention kernels the policy knows"
    # full recomputes each block's forward: attention, and its matmuls up to the last (down's output is
    # needed by no gradient, and torch's checkpoint stops recomputing once it has what backward needs)
    assert recomputed("full", mm) == (LINEARS - 1) * LAYERS
    assert recomputed("full", attention) == LAYERS
    # selective keeps attention's output and the 1st, 3rd, 5th and 7th matmul's: k, o and up are recomputed
    assert recomputed("selective", mm) == 3 * LAYERS
    assert recomputed("selective", attention) == 0
    # and recomputes the cheap operators (norms, rotary, SiLU) as full does
    mul = [torch.ops.aten.mul.Tensor]
    assert recomputed("selective", mul) == recomputed("full", mul) > 0


def test_the_mode_is_checked_and_the_old_booleans_still_work():
    assert [ac_mode(v) for v in (True, False, "true", "false", "none", "full", "selective")] == [
        "full", "none", "full", "none", "none", "full", "selective"
    ]  # fmt: skip
    cfg = RecipeConfig()
    cfg.trainer.activation_checkpointing = "partial"
    msg = r"trainer.activation_checkpointing='partial' is not valid; choose one of: none, full, selective"
    with pytest.raises(ConfigError, match=msg):
        validate(cfg)


def test_the_recipe_key_reaches_the_blocks(monkeypatch):
    """The trainer hands the mode to the blocks' wrapper, and the blocks then recompute what selective says."""
    from nemo_lite.training import trainer as trainer_module

    seen = []
    wrap = trainer_module.apply_activation_checkpointing
    monkeypatch.setattr(trainer_module, "apply_activation_checkpointing", lambda b, m: seen.append(m) or wrap(b, m))
    family, model = tiny()
    fake = type("T", (), {"cfg": RecipeConfig(), "family": family, "raw_model": model, "dist": None})()
    fake.cfg.trainer.activation_checkpointing = "selective"
    fake.objective = type("O", (), {"frozen_models": ()})()
    fake.dist = type("D", (), {"enabled": False})()
    trainer_module.Trainer._parallelize(fake)
    assert seen == ["selective"]
    _, ops = run("selective", model)
    _, plain = run("none")
    assert ops[torch.ops.aten.mm.default] - plain[torch.ops.aten.mm.default] == 3 * LAYERS
    assert not any(ops[op] for op in ATTENTION)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex", "varlen"])
def test_checkpointed_blocks_compile_whole_on_a_cpu(backend):
    """Compiled, fully checkpointed blocks on packed documents train with no graph break: a block forward with a
    side effect (writing to the module or to the step's masks) would break the graph at the checkpoint and run
    the whole block uncompiled, silently slower. The gradients are those of the plain uncompiled model."""
    from torch._dynamo.utils import counters

    ids = torch.randint(4, 256, (2, 128), generator=torch.Generator().manual_seed(0))
    ids[:, 50] = 3  # an EOS: two documents a row
    grads = {}
    for mode, compiled in (("none", False), ("full", True)):
        torch._dynamo.reset()
        counters.clear()
        family, model = tiny(backend, "block_causal")
        checkpoint_blocks(family.blocks(model), mode)
        if compiled:
            for unit in family.compile_units(model):
                unit.compile()
        mask = model.build_attention_mask(ids)
        loss = cross_entropy_sum(model.forward_hidden(ids, attention_mask=mask), model.output_weight, ids)
        loss.backward()
        assert not counters["graph_break"], dict(counters["graph_break"])
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["full"].items():
        torch.testing.assert_close(grad, grads["none"][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_compiled_blocks_under_each_mode_give_the_same_gradients_on_a_gpu(backend):
    """Compiled blocks (the family's compile units, as trainer.compile=true) under bf16 autocast: full and
    selective recompute inside the compiled graphs, with no graph break (a break inside a checkpointed block
    runs that whole block uncompiled), and give the gradients of no checkpointing."""
    from torch._dynamo.utils import counters

    grads = {}
    ids = torch.randint(4, 256, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
    for mode in ("none", "full", "selective"):
        torch._dynamo.reset()
        counters.clear()
        family, model = tiny(backend)
        model.cuda()
        checkpoint_blocks(family.blocks(model), mode)
        for unit in family.compile_units(model):
            unit.compile()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy_sum(model.forward_hidden(ids), model.output_weight, ids)
        loss.backward()
        assert not counters["graph_break"], f"{mode}: {dict(counters['graph_break'])}"
        grads[mode] = {n: p.grad.float() for n, p in model.named_parameters()}
    for mode in ("full", "selective"):
        for name, grad in grads[mode].items():
            torch.testing.assert_close(grad, grads["none"][name], rtol=2e-2, atol=1e-3, msg=f"{mode} {name}")
