"""nemo_lite's Triton AdamW kernel gives torch's fused AdamW (to float32 rounding), clip included, and
the optimizer picks it only where it can run. On CPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import importlib

import pytest
import torch

from nemo_lite.training.config import ConfigError, OptimSection, RecipeConfig, validate
from nemo_lite.training.optim import AdamW, build_optimizer, clipped_step


def steps_of_both(device: str, steps: int = 4) -> tuple[list, list, dict, dict, list]:
    """Two groups (decayed matrices, undecayed vectors), odd sizes that leave partial blocks, a
    clipped step and a skipped one; torch's fused AdamW against nemo_lite's AdamW(kernel="triton")."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 41), (300,), (1,), (2, 1500)]
    init = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [[(3 * torch.randn(s, generator=gen)).to(device) for s in shapes] for _ in range(steps)]

    def run(cls, **kwargs):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [
            {"params": [p for p in params if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        opt = cls(groups, lr=1e-2, betas=(0.9, 0.95), fused=True, **kwargs)
        for i, step_grads in enumerate(grads):
            for param, grad in zip(params, step_grads, strict=True):
                param.grad = grad.clone()
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in step_grads]))
            # Step 2 is clipped (norm ~ 130); step 3 is skipped through found_inf, as AMP's GradScaler does.
            opt.found_inf = torch.tensor(float(i == 2), device=device)
            clipped_step(opt, norm, 5.0 if i == 1 else 0.0)
            del opt.found_inf
        return [p.detach() for p in params], opt.state_dict()["state"]

    want, want_state = run(torch.optim.AdamW)
    got, got_state = run(AdamW, kernel="triton")
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
    if torch.cuda.is_available():
        pytest.skip("on a GPU the compiled kernel is tested instead")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import nemo_lite.training.adamw_kernel as kernel_module

    kernel = importlib.reload(kernel_module)  # decorated again, now for the interpreter
    monkeypatch.setattr(kernel, "BLOCK", 256)  # several blocks per tensor, a partial last one
    assert_close_to_torch(*steps_of_both("cpu"))


@pytest.mark.gpu
def test_triton_kernel_on_a_gpu_matches_torchs_fused_adamw():
    assert_close_to_torch(*steps_of_both("cuda"))


def test_kernel_choice_is_checked():
    cfg = RecipeConfig()
    cfg.optim.kernel = "cuda"
    with pytest.raises(ConfigError, match="optim.kernel='cuda' is not valid; choose one of: auto, torch, triton"):
        validate(cfg)
    cfg.optim.kernel, cfg.optim.fused = "triton", "false"
    with pytest.raises(ConfigError, match="optim.kernel=triton is a fused step"):
        validate(cfg)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="optim.kernel=triton runs on a GPU"):
        build_optimizer(model, OptimSection(kernel="triton", fused="true"))
    assert build_optimizer(model, OptimSection(fused="true")).kernel == "torch"  # auto on CPU


def test_triton_kernel_refuses_a_gradient_it_cannot_read(monkeypatch):
    """After a good step (the block table exists), a transposed gradient, or one 4 bytes off alignment,
    is named, not misread."""
    if torch.cuda.is_available():
        pytest.skip("checked on CPU through the interpreter")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import nemo_lite.training.adamw_kernel as kernel_module

    importlib.reload(kernel_module)
    param = torch.nn.Parameter(torch.randn(6, 4))
    opt = AdamW([param], lr=1e-2, fused=True, kernel="triton")
    param.grad = torch.randn(6, 4)
    opt.step()
    for bad in (torch.randn(4, 6).t(), torch.randn(25)[1:].view(6, 4)):
        param.grad = bad
        before = param.detach().clone()
        with pytest.raises(ValueError, match=r"contiguous, 16-byte aligned float32 tensors; got a torch\.\w+ tensor"):
            opt.step()
        assert torch.equal(param, before)
