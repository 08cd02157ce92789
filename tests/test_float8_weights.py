"""Float8 weights written by the fast step's AdamW (nemo_lite.training.fast.float8_weights): the kernel's
float8 copy and scale are torchao's own tensorwise cast of the updated weight, bit for bit (Triton's
interpreter on CPU); a Float8WeightLinear fed them gives torchao's Float8Linear's output and gradients bit
for bit (torchao's emulation: float8 rounding, high-precision matmuls); training with them is training
with the layers that cast themselves. The compiled path on a GPU: tests/test_float8_gpu.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from kernel_utils import interpreted
from torch import nn

pytest.importorskip("torchao")
pytest.importorskip("triton")

from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402
from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic  # noqa: E402
from torchao.float8.float8_training_tensor import LinearMMConfig  # noqa: E402

from nemo_lite.training.fast.float8_weights import (  # noqa: E402
    Float8WeightLinear,
    cast_,
    float8_weight,
    float8_weight_params,
    swap_in_float8_weights,
)
from nemo_lite.training.fast.optim import FusedAdamW, clip_factor  # noqa: E402

ADAMW_KERNEL = "nemo_lite.training.fast.adamw_kernel"


def torchao_cast(param: torch.Tensor):
    """torchao's dynamic tensorwise e4m3 cast of a float32 weight, as its Float8Linear does it: (bytes, scale)."""
    ref = hp_tensor_to_float8_dynamic(param.detach(), torch.float8_e4m3fn, LinearMMConfig())
    return ref._data.view(torch.uint8), ref._scale


def emulated_config(recipe: str = "tensorwise", **changes) -> Float8LinearConfig:
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=True, **changes)


# ---- the kernel ------------------------------------------------------------------------------------

# (shape, kind): a float8 weight, a bf16 copy, a plain float32 parameter; "zero" is a float8 weight that
# stays zero (zero gradients, no decay): its amax is 0 and torchao's floor under the amax sets the scale.
KINDS = [((37, 41), "float8"), ((64, 48), "float8"), ((300,), "plain"), ((24, 50), "copy"), ((16, 16), "zero")]


def steps_with_float8_weights(steps: int = 4):
    """The same FusedAdamW(kernel="triton") steps with float8 weights (and a bf16 copy) whose bf16 gradients
    the kernel reads, and without them, fed those gradients upcast: the updates must not differ. The
    float8 weights span twelve decades, so that their casts reach e4m3's subnormals and zero."""
    gen = torch.Generator().manual_seed(0)
    init = []
    for shape, kind in KINDS:
        decades = torch.randint(-7, 5, shape, generator=gen).float()
        init.append(torch.zeros(shape) if kind == "zero" else torch.randn(shape, generator=gen) * 10**decades)
    grads = [[torch.randn(s, generator=gen).bfloat16() * (k != "zero") for s, k in KINDS] for _ in range(steps)]

    def run(holders: bool):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [
            {"params": [p for p, (_, k) in zip(params, KINDS, strict=True) if k != "zero"], "weight_decay": 0.1},
            {"params": [p for p, (_, k) in zip(params, KINDS, strict=True) if k == "zero"], "weight_decay": 0.0},
        ]
        opt = FusedAdamW(groups, lr=1e-2, betas=(0.9, 0.95), kernel="triton")
        f8 = {i: float8_weight(p, LinearMMConfig()) for i, p in enumerate(params) if KINDS[i][1] in ("float8", "zero")}
        copies = {i: torch.empty_like(p, dtype=torch.bfloat16).requires_grad_() for i, p in enumerate(params)}
        copies = {i: c for i, c in copies.items() if KINDS[i][1] == "copy"}
        if holders:
            opt.keep_weight_copies([(params[i], c) for i, c in copies.items()])
            opt.keep_float8_weights([(params[i], w) for i, w in f8.items()])
        history = []
        for step, step_grads in enumerate(grads):
            for i, grad in enumerate(step_grads):
                holder = f8.get(i, copies.get(i))
                if holders and holder is not None:
                    holder.grad = grad.clone()
                else:
                    params[i].grad = grad.float()
            norm = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in step_grads])).float()
            scale = clip_factor(norm, 5.0) if step == 1 else None  # step 1 clipped, step 2 skipped
            opt.step(grad_scale=scale, found_inf=torch.tensor(float(step == 2)))
            opt.zero_grad()
            assert all(w.grad is None for w in f8.values())
            saved = {i: (w._data.view(torch.uint8).clone(), w._scale.clone()) for i, w in f8.items()}
            history.append(([p.detach().clone() for p in params], saved))
        return history

    return run(True), run(False)


def test_the_kernels_float8_weights_are_torchaos_cast_of_the_update_bit_for_bit(monkeypatch):
    kernel = interpreted(monkeypatch, ADAMW_KERNEL)
    monkeypatch.setattr(kernel, "BLOCK", 256)  # several blocks per tensor: the amax is folded across programs
    with_holders, without = steps_with_float8_weights()
    for (params, float8s), (want, _) in zip(with_holders, without, strict=True):
        for a, b in zip(params, want, strict=True):
            assert torch.equal(a, b)  # the same update, bit for bit
        for i, (data, scale) in float8s.items():
            want_data, want_scale = torchao_cast(params[i])
            assert torch.equal(scale, want_scale), (i, scale, want_scale)
            assert torch.equal(data, want_data), i
    first = with_holders[0][1]
    assert (first[0][0] & 0x7F).min() == 0 and ((first[0][0] & 0x78) == 0).sum() > 10  # zeros and subnormals
    assert first[4][1].item() == pytest.approx(448.0 / 1e-12, rel=1e-6)  # the all-zero weight's floor
    for i in first:  # the skipped step (2) left the float8 weights as step 1 wrote them
        assert torch.equal(with_holders[2][1][i][0], with_holders[1][1][i][0])
        assert torch.equal(with_holders[2][1][i][1], with_holders[1][1][i][1])
    assert not torch.equal(with_holders[3][1][0][0], with_holders[2][1][0][0])


@pytest.mark.gpu
def test_the_kernels_float8_weights_on_a_gpu_are_torchaos_cast_bit_for_bit():
    """As above on a GPU, where the tensors are small enough to run on the CPU and be copied over."""
    from nemo_lite.training.fast import adamw_kernel

    gen = torch.Generator().manual_seed(1)
    shapes = ((512, 384), (96, 64))
    params = [(torch.randn(s, generator=gen) * 10 ** torch.randint(-7, 5, s, generator=gen)).cuda() for s in shapes]
    grads = [torch.randn(p.shape, generator=gen).cuda() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros((), device="cuda") for _ in params]
    data = [torch.empty(p.shape, dtype=torch.float8_e4m3fn, device="cuda") for p in params]
    scales = [torch.empty((), device="cuda") for _ in params]
    adamw_kernel.adamw_(
        params, grads, *state, steps, float8s=data, float8_scales=scales, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
        weight_decay=0.1,
    )  # fmt: skip
    for param, d, s in zip(params, data, scales, strict=True):
        want_data, want_scale = torchao_cast(param)
        assert torch.equal(s, want_scale) and torch.equal(d.view(torch.uint8), want_data)


def test_the_optimizer_refuses_float8_weights_it_cannot_write():
    param = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="float8 weights are written by the triton AdamW kernel"):
        FusedAdamW([param]).keep_float8_weights([(param, float8_weight(param, LinearMMConfig()))])
    opt = FusedAdamW([param], kernel="triton")
    for bad in (torch.zeros(4, 4, dtype=torch.bfloat16), float8_weight(torch.zeros(4, 5), LinearMMConfig())):
        with pytest.raises(ValueError, match=r"must be a leaf e4m3 Float8TrainingTensor shaped \(4, 4\)"):
            opt.keep_float8_weights([(param, bad)])
    opt.keep_weight_copies([(param, torch.zeros(4, 4, dtype=torch.bfloat16, requires_grad=True))])
    with pytest.raises(ValueError, match="has a bf16 copy already: it cannot have both"):
        opt.keep_float8_weights([(param, float8_weight(param, LinearMMConfig()))])


# ---- the layer --------------------------------------------------------------------------------------


def twin_layers(bias: bool):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(64, 48, bias=bias), nn.ReLU(), nn.Linear(48, 32, bias=True))
    convert_to_float8_training(ref, config=emulated_config())
    mine = copy.deepcopy(ref)
    weights = swap_in_float8_weights(mine)
    cast_(weights)
    return ref, mine, weights


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_a_float8_weight_linear_gives_float8_linears_output_and_gradients(bias):
    ref, mine, weights = twin_layers(bias)
    assert [type(m) for m in mine] == [Float8WeightLinear, nn.ReLU, Float8WeightLinear] and len(weights) == 2
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)  # bf16, as autocast hands it on a GPU
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ref(xa), mine(xb)
    assert b.dtype == torch.bfloat16 and torch.equal(a, b)
    grad = torch.randn_like(a)
    a.backward(grad)
    b.backward(grad)
    assert torch.equal(xa.grad, xb.grad)
    for (name, p), q in zip(ref.named_parameters(), mine.parameters(), strict=True):
        if q in weights:  # its bf16 gradient is on the float8 weight; torchao's was upcast into .grad
            assert q.grad is None and weights[q].grad.dtype == torch.bfloat16, name
            assert torch.equal(p.grad, weights[q].grad.float()), name
        else:
            assert torch.equal(p.grad, q.grad), name
    # A float32 input takes torchao's own path: the float32 weight gradient lands on .grad.
    x32 = torch.randn(3, 64)
    assert torch.equal(ref(x32), mine(x32))
    mine(x32).sum().backward()
    assert mine[0].weight.grad is not None and mine[0].weight.grad.dtype == torch.float32


def test_the_swap_takes_only_the_layers_whose_cast_the_kernel_does():
    layers = {
        "tensorwise": Float8Linear.from_float(nn.Linear(32, 32), emulated_config()),
        "rowwise": Float8Linear.from_float(nn.Linear(32, 32), emulated_config("rowwise")),
        "fsdp_float8": Float8Linear.from_float(nn.Linear(32, 32), emulated_config(enable_fsdp_float8_all_gather=True)),
        "plain": nn.Linear(32, 32),
    }
    frozen = Float8Linear.from_float(nn.Linear(32, 32), emulated_config())
    frozen.weight.requires_grad_(False)
    model = nn.ModuleDict({**layers, "frozen": frozen})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert float8_weight_params(model) == ([layers["tensorwise"].weight], [])
    weights = swap_in_float8_weights(model)
    assert list(weights) == [layers["tensorwise"].weight]
    assert [name for name, m in model.items() if type(m) is Float8WeightLinear] == ["tensorwise"]
    after = model.state_dict()  # the same names and values: the float8 weight is no parameter or buffer
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


# ---- training --------------------------------------------------------------------------------------


def test_training_with_the_optimizers_float8_weights_is_training_with_self_cast_ones(monkeypatch):
    """The small float8 model of tests/test_float8.py twice, under bf16 autocast: torchao's layers (each
    casts its float32 weight) with the Triton AdamW reading their float32 gradients, and the fast step's
    swap with the kernel writing the float8 weights. Losses, gradients and weights agree bit for bit."""
    kernel = interpreted(monkeypatch, ADAMW_KERNEL)
    monkeypatch.setattr(kernel, "BLOCK", 16384)  # few programs: the interpreter's cost is per program
    from test_float8 import SMALL, small_model

    from nemo_lite.training.config import Float8Section
    from nemo_lite.training.converters.float8 import Float8Converter
    from nemo_lite.training.loss import cross_entropy_sum

    family, ref = small_model()
    Float8Converter(Float8Section(enabled=True), emulate=True).convert(ref, family)
    mine = copy.deepcopy(ref)
    weights = swap_in_float8_weights(mine)
    assert len(weights) == 4  # gate and up of both blocks
    optims = [FusedAdamW(m.parameters(), lr=3e-3, kernel="triton") for m in (ref, mine)]
    optims[1].keep_float8_weights(list(weights.items()))
    for model in (ref, mine):  # a bf16 input, as CUDA autocast gives torchao's layer (CPU autocast does not)
        for m in model.modules():
            if isinstance(m, Float8Linear):
                m.register_forward_pre_hook(lambda _, args: (args[0].bfloat16(),))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(4, SMALL["vocab_size"], (2, 32), generator=gen)
        losses = []
        for model in (ref, mine):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = cross_entropy_sum(model.forward_hidden(ids), model.output_weight, ids)
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
        for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
            assert torch.equal(p.grad, sum(g.float() for g in optims[1].gradients(q)))
        for opt in optims:
            opt.step()
            opt.zero_grad()
        for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
            assert torch.equal(p, q)


# ---- the fast step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("from_optimizer", [True, False], ids=["on", "off"])
def test_the_fast_step_names_the_float8_weights_part_and_what_it_needs(from_optimizer):
    """On a CPU the fast step runs none of its Triton parts: the float8 part is named off with the part it
    needs. float8.weights_from_optimizer=false marks the converted layers, which the swap then leaves alone."""
    from test_float8 import small_model

    from nemo_lite.training.config import Float8Section
    from nemo_lite.training.converters.float8 import Float8Converter
    from nemo_lite.training.fast.step import FastStep
    from nemo_lite.training.optimizers import OptimSection

    family, model = small_model()
    Float8Converter(Float8Section(enabled=True, weights_from_optimizer=from_optimizer), emulate=True).convert(
        model, family
    )
    step = FastStep(model, OptimSection(), device=torch.device("cpu"), distributed=False, autocast_bf16=True)
    assert "float8 weights written by AdamW (needs bf16 weight copies)" in step.description
    assert not step.on["float8 weights written by AdamW"] and not step.float8
    want = 4 if from_optimizer else 0
    assert len(float8_weight_params(model)[0]) == want and len(swap_in_float8_weights(model)) == want
    _, plain = small_model()
    plain_step = FastStep(plain, OptimSection(), device=torch.device("cpu"), distributed=False, autocast_bf16=True)
    assert "float8 weights" not in plain_step.description  # no float8 layer, no such part
