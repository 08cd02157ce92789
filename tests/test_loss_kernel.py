"""nemo_lite's Triton head loss gives the cross-entropy sum and the gradients of the torch path: loss to
float32 rounding, gradients to the logits' dtype rounding, ignored labels contributing nothing. On CPU the
kernel runs in Triton's interpreter; on a GPU against the compiled torch path, as training runs both."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import interpreted

from nemo_lite.training.config import ConfigError, RecipeConfig, validate
from nemo_lite.training.loss import IGNORE_INDEX, cross_entropy_sum


@pytest.fixture
def kernel(monkeypatch):
    module = interpreted(monkeypatch, "nemo_lite.training.cross_entropy_kernel")
    monkeypatch.setattr(module, "BLOCK", 64)  # several blocks per row, a partial last one
    return module


def case(device: str, dtype: torch.dtype, tokens: int = 19, hidden: int = 24, vocab: int = 203):
    gen = torch.Generator().manual_seed(0)
    hidden_BSH = (2 * torch.randn(1, tokens, hidden, generator=gen)).to(device, dtype)
    weight_VH = torch.randn(vocab, hidden, generator=gen).to(device, dtype)
    labels_BS = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels_BS[0, [0, 5, 6]] = IGNORE_INDEX  # padding and document boundaries
    labels_BS[0, 7] = vocab - 1  # the last class, in the partial last block
    return hidden_BSH, weight_VH, labels_BS.to(device)


def loss_and_grads(hidden_BSH, weight_VH, labels_BS, upstream: float, **kwargs):
    hidden_BSH = hidden_BSH.detach().clone().requires_grad_()
    weight_VH = weight_VH.detach().clone().requires_grad_()
    loss = cross_entropy_sum(hidden_BSH, weight_VH, labels_BS, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), hidden_BSH.grad, weight_VH.grad


def test_rows_against_float64(kernel):
    gen = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(11, 150, generator=gen)
    labels = torch.randint(0, 150, (11,), generator=gen)
    labels[3] = IGNORE_INDEX
    want = torch.nn.functional.cross_entropy(logits.double(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    probs = logits.double().softmax(-1) - torch.nn.functional.one_hot(labels.clamp(min=0), 150)
    want_grad = 0.25 * probs * (labels != IGNORE_INDEX)[:, None]
    buffer = logits.clone()
    torch.testing.assert_close(kernel.cross_entropy_rows_(buffer, labels, None).double(), want)
    assert torch.equal(buffer, logits)  # no scale: the logits stay
    got = kernel.cross_entropy_rows_(buffer, labels, torch.tensor(0.25))
    torch.testing.assert_close(got.double(), want)
    assert got[3] == 0 and (buffer[3] == 0).all()  # an ignored row: no loss, no gradient
    torch.testing.assert_close(buffer.double(), want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradients_equal_the_torch_path(kernel, dtype):
    inputs = case("cpu", dtype)
    upstream = 1.0 / 16
    want = loss_and_grads(*inputs, upstream)
    got = loss_and_grads(*inputs, upstream, kernel="triton", grad_scale=torch.tensor(upstream))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **tol)


def test_gradient_follows_the_upstream_one_when_the_scale_was_not_given(kernel):
    inputs = case("cpu", torch.float32)
    want = loss_and_grads(*inputs, 3.0)
    got = loss_and_grads(*inputs, 3.0, kernel="triton")  # written for 1.0, rescaled in backward
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_evaluation_writes_no_gradient_and_bad_labels_give_nan(kernel):
    hidden_BSH, weight_VH, labels_BS = case("cpu", torch.float32)
    with torch.no_grad():
        want = cross_entropy_sum(hidden_BSH, weight_VH, labels_BS)
        got = cross_entropy_sum(hidden_BSH, weight_VH, labels_BS, kernel="triton")
    torch.testing.assert_close(got, want)
    labels_BS[0, 2] = weight_VH.shape[0]  # one past the last class
    with torch.no_grad():
        assert cross_entropy_sum(hidden_BSH, weight_VH, labels_BS, kernel="triton").isnan()


def test_bad_inputs_are_refused_by_name(kernel):
    logits = torch.zeros(4, 10)
    with pytest.raises(ValueError, match=r"labels must be int64 \[4\]; got torch.int32"):
        kernel.cross_entropy_rows_(logits, torch.zeros(4, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="contiguous classes"):
        kernel.cross_entropy_rows_(logits.t(), torch.zeros(10, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="scale must be a float32 0-d tensor"):
        kernel.cross_entropy_rows_(logits, torch.zeros(4, dtype=torch.int64), torch.ones(1))
    with pytest.raises(ValueError, match="one dtype"):
        kernel.linear_cross_entropy_sum(torch.zeros(2, 3), torch.zeros(5, 3, dtype=torch.bfloat16), torch.zeros(2))
    hidden_BSH, weight_VH, labels_BS = case("cpu", torch.float32)
    with pytest.raises(ValueError, match="not chunked"):
        cross_entropy_sum(hidden_BSH, weight_VH, labels_BS, kernel="triton", chunk_tokens=4)


def test_loss_kernel_choice_is_checked():
    cfg = RecipeConfig()
    cfg.trainer.loss_kernel = "cuda"
    want = "trainer.loss_kernel='cuda' is not valid; choose one of: auto, torch, triton"
    with pytest.raises(ConfigError, match=want):
        validate(cfg)
    cfg.trainer.loss_kernel, cfg.trainer.loss_chunk_size = "triton", 512
    with pytest.raises(ConfigError, match="trainer.loss_kernel=triton is not chunked"):
        validate(cfg)


@pytest.mark.gpu
def test_on_a_gpu_under_autocast_it_gives_the_compiled_paths_loss_and_gradients():
    """The 1B model's head at 2 x 1024 tokens: bf16 logits under autocast, float32 hidden and weight."""
    gen = torch.Generator().manual_seed(0)
    hidden_BSH = torch.randn(2, 1024, 2048, generator=gen).cuda()
    weight_VH = (0.02 * torch.randn(128256, 2048, generator=gen)).cuda()
    labels_BS = torch.randint(0, 128256, (2, 1024), generator=gen).cuda()
    labels_BS[:, ::97] = IGNORE_INDEX
    upstream = 1.0 / int((labels_BS != IGNORE_INDEX).sum())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = loss_and_grads(hidden_BSH, weight_VH, labels_BS, upstream, compiled=True)
        scale = torch.full((), upstream, dtype=torch.float32, device="cuda")
        got = loss_and_grads(hidden_BSH, weight_VH, labels_BS, upstream, kernel="triton", grad_scale=scale)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a.dtype == b.dtype == torch.float32
        # bf16 gradients of the logits; the two paths' float32 log-sum-exps differ in the last bits
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())
