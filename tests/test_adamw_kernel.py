"""nemo_lite's Triton AdamW kernel (FusedAdamW(kernel="triton"), the fast step's) gives torch's fused
AdamW (to float32 rounding), clip and skip included; with bf16 weight copies it gives the update of
autocast's float32 gradients bit for bit. On CPU the kernel runs in Triton's interpreter. Which step runs
where: tests/test_step.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from kernel_utils import interpreted

from nemo_lite.training.fast.optim import FusedAdamW, clip_factor

ADAMW_KERNEL = "nemo_lite.training.fast.adamw_kernel"


def torch_step(opt: torch.optim.AdamW, grad_norm: torch.Tensor, max_norm: float, found_inf: float) -> None:
    """One step of torch's own fused AdamW, clipped inside its kernel and skipped through ``found_inf`` as
    AMP's GradScaler does: it reads both as attributes of the optimizer."""
    opt.grad_scale = clip_factor(grad_norm, max_norm) if max_norm > 0 else None
    opt.found_inf = torch.tensor(found_inf, device=grad_norm.device)
    opt.step()
    del opt.grad_scale, opt.found_inf


def fused_step(opt: FusedAdamW, grad_norm: torch.Tensor, max_norm: float, found_inf: float) -> None:
    """The same step of FusedAdamW, which takes them as arguments (as FastStep.apply passes them)."""
    scale = clip_factor(grad_norm, max_norm) if max_norm > 0 else None
    opt.step(grad_scale=scale, found_inf=torch.tensor(found_inf, device=grad_norm.device))


def steps_of_both(device: str, steps: int = 4) -> tuple[list, list, dict, dict, list]:
    """Two groups (decayed matrices, undecayed vectors), odd sizes that leave partial blocks, a
    clipped step and a skipped one; torch's fused AdamW against FusedAdamW(kernel="triton")."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 41), (300,), (1,), (2, 1500)]
    init = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [[(3 * torch.randn(s, generator=gen)).to(device) for s in shapes] for _ in range(steps)]

    def run(make, step):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [
            {"params": [p for p in params if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        opt = make(groups, lr=1e-2, betas=(0.9, 0.95))
        for i, step_grads in enumerate(grads):
            for param, grad in zip(params, step_grads, strict=True):
                param.grad = grad.clone()
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in step_grads]))
            # Step 2 is clipped (norm ~ 130); step 3 is skipped through found_inf.
            step(opt, norm, 5.0 if i == 1 else 0.0, float(i == 2))
        return [p.detach() for p in params], opt.state_dict()["state"]

    want, want_state = run(lambda *a, **kw: torch.optim.AdamW(*a, fused=True, **kw), torch_step)
    got, got_state = run(lambda *a, **kw: FusedAdamW(*a, kernel="triton", **kw), fused_step)
    return got, want, got_state, want_state, init


def assert_close_to_torch(got, want, got_state, want_state, init) -> None:
    for a, b, start in zip(got, want, init, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a != start).all()  # every element moved: no part of a tensor was skipped
    for i in want_state:  # the same state layout: checkpoints do not depend on the kernel
        assert set(got_state[i]) == set(want_state[i])
        assert got_state[i]["step"].item() == want_state[i]["step"].item() == 3  # 4 steps, 1 skipped
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got_state[i][key], want_state[i][key], rtol=1e-5, atol=1e-6)


def test_triton_kernel_in_the_interpreter_matches_torchs_fused_adamw(monkeypatch):
    kernel = interpreted(monkeypatch, ADAMW_KERNEL)
    monkeypatch.setattr(kernel, "BLOCK", 256)  # several blocks per tensor, a partial last one
    assert_close_to_torch(*steps_of_both("cpu"))


@pytest.mark.gpu
def test_triton_kernel_on_a_gpu_matches_torchs_fused_adamw():
    assert_close_to_torch(*steps_of_both("cuda"))


def test_the_kernel_choice_is_checked(monkeypatch):
    """FusedAdamW names a kernel it does not have, and the triton kernel without triton; the copies and
    the rows need the triton kernel. (Which kernel the fast step picks where: tests/test_step.py.)"""
    param = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="kernel='cuda' is not valid; choose torch or triton"):
        FusedAdamW([param], kernel="cuda")
    opt = FusedAdamW([param])
    assert opt.kernel == "torch" and opt.param_groups[0]["fused"]
    with pytest.raises(ValueError, match="bf16 weight copies are written by the triton AdamW kernel"):
        opt.keep_weight_copies([(param, torch.zeros(4, 4, dtype=torch.bfloat16, requires_grad=True))])
    with pytest.raises(ValueError, match="grad_norm runs the triton kernels; with kernel=torch use"):
        opt.grad_norm()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(ValueError, match="the triton AdamW kernel needs the triton package"):
        FusedAdamW([param], kernel="triton")


def test_triton_kernel_refuses_what_it_does_not_support():
    pytest.importorskip("triton")
    param = torch.nn.Parameter(torch.zeros(4, 4))
    opt = FusedAdamW([param], kernel="triton")
    not_a_leaf = torch.zeros(4, 4, requires_grad=True).bfloat16()
    for bad in (torch.zeros(4, 4), torch.zeros(4, 5, dtype=torch.bfloat16), not_a_leaf):
        with pytest.raises(ValueError, match=r"a weight copy must be a bf16 leaf tensor shaped like its parameter"):
            opt.keep_weight_copies([(param, bad)])
    amsgrad = FusedAdamW([torch.nn.Parameter(torch.zeros(2))], kernel="triton", amsgrad=True)
    with pytest.raises(ValueError, match="grad_scale and found_inf need the fused step"):
        amsgrad.step(found_inf=torch.tensor(0.0))
    param.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"supports plain AdamW only \(float lr, no maximize/amsgrad\)"):
        FusedAdamW([param], kernel="triton", maximize=True).step()


def test_triton_kernel_refuses_a_gradient_it_cannot_read(monkeypatch):
    """After a good step (the block table exists), a transposed gradient, or one 4 bytes off alignment,
    is named, not misread."""
    interpreted(monkeypatch, ADAMW_KERNEL)
    param = torch.nn.Parameter(torch.randn(6, 4))
    opt = FusedAdamW([param], lr=1e-2, kernel="triton")
    param.grad = torch.randn(6, 4)
    opt.step()
    for bad in (torch.randn(4, 6).t(), torch.randn(25)[1:].view(6, 4)):
        param.grad = bad
        before = param.detach().clone()
        with pytest.raises(ValueError, match=r"aligned torch\.float32 gradient; got a (strided|contiguous) torch"):
            opt.step()
        assert torch.equal(param, before)


# ---- bf16 weight copies (the fast step's CopyLinear swap) -----------------------------------------


KINDS = {(37, 41): "copy", (300,): "plain", (2, 1500): "copy", (50, 24): "tied"}


def steps_with_and_without_copies(device: str, steps: int = 4):
    """The same FusedAdamW(kernel="triton") steps twice: with bf16 copies whose bf16 gradients the kernel
    reads (a "tied" matrix has a float32 gradient of its own as well, as a tied embedding), and without
    copies, fed what autocast hands a float32 master: the bf16 gradient upcast, added to the float32
    one. A clipped step and a skipped one included."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(device) for s in KINDS]
    grads = [
        [
            ((3 * torch.randn(s, generator=gen)).to(device), (3 * torch.randn(s, generator=gen)).bfloat16().to(device))
            for s in KINDS
        ]
        for _ in range(steps)
    ]

    def run(with_copies: bool):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [
            {"params": [p for p in params if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        opt = FusedAdamW(groups, lr=1e-2, betas=(0.9, 0.95), kernel="triton")
        copies = {i: torch.empty_like(p, dtype=torch.bfloat16).requires_grad_() for i, p in enumerate(params)}
        copies = {i: c for i, c in copies.items() if list(KINDS.values())[i] != "plain"}
        if with_copies:
            opt.keep_weight_copies([(params[i], c) for i, c in copies.items()])
            assert all(torch.equal(c, params[i].to(torch.bfloat16)) for i, c in copies.items())
        history = []
        for step, step_grads in enumerate(grads):
            for i, (kind, (g32, g16)) in enumerate(zip(KINDS.values(), step_grads, strict=True)):
                if not with_copies:
                    params[i].grad = {"plain": g32, "copy": g16.float(), "tied": g32 + g16.float()}[kind]
                    continue
                params[i].grad = None if kind == "copy" else g32.clone()
                if kind != "plain":
                    copies[i].grad = g16.clone()
            norm = opt.grad_norm()  # the kernel's sums of squares, bf16 and float32 gradients together
            summed = [sum(g.float() for g in opt.gradients(p)) for p in params]  # float32, as the kernel adds
            want = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in summed]))
            torch.testing.assert_close(norm.double(), want, rtol=1e-6, atol=0)
            if not with_copies:  # torch's kernels (the torch path) agree
                foreach = torch.nn.utils.get_total_norm([p.grad for p in params])
                torch.testing.assert_close(foreach.double(), want, rtol=1e-6, atol=0)
            # The clip factor from the same float64 norm in both runs: the kernels' sums of squares group the
            # elements by launch, so with and without copies they differ in the last bits. Step 3 is skipped.
            fused_step(opt, want.float(), 5.0 if step == 1 else 0.0, float(step == 2))
            opt.zero_grad()
            assert all(c.grad is None for c in copies.values()) and all(p.grad is None for p in params)
            history.append(([p.detach().clone() for p in params], {i: c.detach().clone() for i, c in copies.items()}))
        return history, opt.state_dict()["state"]

    return run(True), run(False)


def assert_copies_change_nothing(with_copies, without) -> None:
    (history, state), (reference, reference_state) = with_copies, without
    for (params, copies), (want, _) in zip(history, reference, strict=True):
        for a, b in zip(params, want, strict=True):
            assert torch.equal(a, b)  # bit for bit: the same bf16 values upcast, the same float32 sums
        for i, copy in copies.items():
            assert torch.equal(copy, params[i].to(torch.bfloat16))  # rounded as autocast's cast rounds
    assert torch.equal(history[2][1][0], history[1][1][0])  # the skipped step left the copies alone
    assert not torch.equal(history[3][1][0], history[2][1][0])
    for i in reference_state:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[i][key], reference_state[i][key])


def test_weight_copies_in_the_interpreter_give_the_same_update_bit_for_bit(monkeypatch):
    kernel = interpreted(monkeypatch, ADAMW_KERNEL)
    monkeypatch.setattr(kernel, "BLOCK", 256)
    assert_copies_change_nothing(*steps_with_and_without_copies("cpu"))


@pytest.mark.gpu
def test_weight_copies_on_a_gpu_give_the_same_update_bit_for_bit():
    assert_copies_change_nothing(*steps_with_and_without_copies("cuda"))


def test_the_optimizer_adds_up_what_autograd_adds_up_under_autocast():
    """A model converted as the fast step converts it (CopyLinear, the output projection's copy): under
    bf16 autocast, the gradients the optimizer reads for each parameter (bf16 on the copy, the embedding's
    own float32 one as well) add up to autocast's float32 gradient, bit for bit. (The converters
    themselves: tests/test_step.py.)"""
    pytest.importorskip("triton")
    from model_utils import tiny_twins

    from nemo_lite.training.fast.swaps import swap_in_weight_copies
    from nemo_lite.training.loss import cross_entropy_sum

    plain, copied = tiny_twins()
    config = plain.config
    opt = FusedAdamW(copied.parameters(), kernel="triton")
    copies = swap_in_weight_copies(copied, copied.output_weight)
    opt.keep_weight_copies(list(copies.items()))
    assert len(copies) == 7 * config.num_hidden_layers + 1  # q, k, v, o, gate, up, down; the (tied) head
    for param, weight_copy in copies.items():
        assert torch.equal(weight_copy, param.to(torch.bfloat16))  # filled by the optimizer
    ids = torch.randint(3, config.vocab_size, (2, 48))
    ids[:, [10, 30]] = config.eos_token_id
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = cross_entropy_sum(plain.forward_hidden(ids), plain.output_weight, ids)
        got = cross_entropy_sum(copied.forward_hidden(ids), copies[copied.output_weight], ids)
    assert torch.equal(got, want)
    want.backward()
    got.backward()
    for (name, param), copy_param in zip(plain.named_parameters(), copied.parameters(), strict=True):
        grads = opt.gradients(copy_param)
        kinds = [g.dtype for g in grads]
        if name.endswith("proj.weight"):  # the copy carried it all
            assert kinds == [torch.bfloat16], name
        elif name == "embed_tokens.weight":  # the lookup's own float32 gradient and the head's bf16 one
            assert kinds == [torch.float32, torch.bfloat16], name
        else:
            assert kinds == [torch.float32], name
        total = grads[0].float() if len(grads) == 1 else grads[0] + grads[1].float()
        assert torch.equal(total, param.grad), name  # what autograd added up under autocast
    opt.zero_grad()
    assert all(c.grad is None for c in copies.values()) and all(p.grad is None for p in copied.parameters())


def test_a_step_prepared_before_the_sync_is_the_same_step(monkeypatch):
    """prepare_step does the launch's host work early (the trainer calls it before its host sync); the step
    and the gradient norm are the same, a gradient replaced after it is the one used, and zero_grad drops
    the prepared work."""
    interpreted(monkeypatch, ADAMW_KERNEL)
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(5, 7, generator=gen)
    grads = [torch.randn(5, 7, generator=gen) for _ in range(3)]

    def run(prepare: bool):
        param = torch.nn.Parameter(init.clone())
        opt = FusedAdamW([param], lr=1e-2, kernel="triton")
        history = []
        for i, grad in enumerate(grads):
            param.grad = (2 * grad if i == 1 else grad).clone() if not prepare else grad.clone()
            if prepare:
                opt.prepare_step()
                if i == 1:  # replaced after prepare_step: the new tensor is the one read
                    param.grad = 2 * grad
                if i == 2:
                    opt.zero_grad()  # nothing prepared survives; this step re-prepares
                    assert opt._prepared is None
                    param.grad = grad.clone()
                # The norm reads the prepared tables while they are current, fresh ones otherwise.
                torch.testing.assert_close(opt.grad_norm(), param.grad.norm(), rtol=1e-6, atol=0)
            opt.step()
            history.append(param.detach().clone())
        return history

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


def test_the_one_shot_update_is_the_optimizers_step(monkeypatch):
    """adamw_ (prepare and launch in one call, as scripts/bench_optimizer.py uses it) gives the optimizer's step."""
    kernel = interpreted(monkeypatch, ADAMW_KERNEL)
    gen = torch.Generator().manual_seed(3)
    init, grad = torch.randn(9, 5, generator=gen), torch.randn(9, 5, generator=gen)
    param = torch.nn.Parameter(init.clone())
    opt = FusedAdamW([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, kernel="triton")
    param.grad = grad.clone()
    opt.step()
    state = opt.state[param]
    value, exp_avg, exp_avg_sq, step = init.clone(), torch.zeros(9, 5), torch.zeros(9, 5), torch.zeros(())
    kernel.adamw_(
        [value], [grad], [exp_avg], [exp_avg_sq], [step], lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1
    )
    assert step.item() == 1
    for a, b in ((value, param.detach()), (exp_avg, state["exp_avg"]), (exp_avg_sq, state["exp_avg_sq"])):
        assert torch.equal(a, b)
