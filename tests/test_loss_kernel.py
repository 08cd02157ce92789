"""nemo_lite's Triton head loss (the fast step's) gives the cross-entropy sum and the gradients of the torch
path: loss to float32 rounding, gradients to the logits' dtype rounding, ignored labels contributing
nothing. On CPU the kernel runs in Triton's interpreter; on a GPU against the compiled torch path, as
training runs both. The fast step runs it where it can (one process on a GPU, loss not chunked), says why
when it does not, and then computes the plain step's loss."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_utils import interpreted

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.testing.step import dense_gradients
from nemo_lite.training.config import OptimSection
from nemo_lite.training.fast.step import FastStep
from nemo_lite.training.loss import IGNORE_INDEX, cross_entropy_sum
from nemo_lite.training.step import PlainStep

KERNEL = "nemo_lite.training.fast.cross_entropy_kernel"


@pytest.fixture
def kernel(monkeypatch):
    module = interpreted(monkeypatch, KERNEL)
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


def triton_loss(hidden_BSH, weight_VH, labels_BS, grad_scale=None):
    """The kernel called as FastStep.loss calls it: in autocast's dtype under autocast, tokens flattened."""
    device_type = hidden_BSH.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_BSH, weight_VH = hidden_BSH.to(dtype), weight_VH.to(dtype)
    hidden_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
    module = importlib.import_module(KERNEL)
    return module.linear_cross_entropy_sum(hidden_TH, weight_VH, labels_BS.reshape(-1), grad_scale)


def loss_and_grads(hidden_BSH, weight_VH, labels_BS, upstream: float, loss_fn=cross_entropy_sum, **kwargs):
    hidden_BSH = hidden_BSH.detach().clone().requires_grad_()
    weight_VH = weight_VH.detach().clone().requires_grad_()
    loss = loss_fn(hidden_BSH, weight_VH, labels_BS, **kwargs)
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
    got = loss_and_grads(*inputs, upstream, triton_loss, grad_scale=torch.tensor(upstream))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **tol)


def test_gradient_follows_the_upstream_one_when_the_scale_was_not_given(kernel):
    inputs = case("cpu", torch.float32)
    want = loss_and_grads(*inputs, 3.0)
    got = loss_and_grads(*inputs, 3.0, triton_loss)  # written for 1.0, rescaled in backward
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_evaluation_writes_no_gradient_and_bad_labels_give_nan(kernel):
    hidden_BSH, weight_VH, labels_BS = case("cpu", torch.float32)
    with torch.no_grad():
        want = cross_entropy_sum(hidden_BSH, weight_VH, labels_BS)
        got = triton_loss(hidden_BSH, weight_VH, labels_BS)
    torch.testing.assert_close(got, want)
    labels_BS[0, 2] = weight_VH.shape[0]  # one past the last class
    with torch.no_grad():
        assert triton_loss(hidden_BSH, weight_VH, labels_BS).isnan()


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


# ---- in the fast step ----------------------------------------------------------------------------


def tiny_model(device: str = "cpu"):
    """A one-layer "tiny" model (eager attention) and a packed batch with next-token labels."""
    from nemo_lite.components.models import LlamaForCausalLM, get_preset

    model = LlamaForCausalLM(
        get_preset("tiny", num_hidden_layers=1),
        attention=AttentionConfig(backend="eager", attn_mask_type="block_causal"),
    )
    model.to(device).init_weights(seed=0)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 11] = model.config.eos_token_id
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    return model, {"input_ids": ids.to(device), "labels": labels.to(device)}


def fast_step(model, device: str, **kwargs) -> FastStep:
    kwargs = {"distributed": False, "autocast_bf16": False, "loss_chunk_size": 0, **kwargs}
    return FastStep(model, OptimSection(), device=torch.device(device), **kwargs)


def test_the_fast_step_runs_the_triton_loss_only_unchunked_in_one_process_on_a_gpu():
    """Where the Triton loss is off the fast step says why (the decisions for a CUDA device are taken without
    running anything on it), and its loss is then the plain step's, bit for bit, chunked or not."""
    pytest.importorskip("triton")
    cases = {
        ("cuda", False, 0): "",
        ("cuda", False, 16): "trainer.loss_chunk_size=0",
        ("cuda", True, 0): "one process (FSDP2 shards the weights)",
        ("cpu", False, 0): "a CUDA device",
    }
    for (device, distributed, chunk), lacks in cases.items():
        step = fast_step(tiny_model()[0], device, distributed=distributed, loss_chunk_size=chunk)
        assert step.on["Triton loss"] == (not lacks)
        assert (f"Triton loss (needs {lacks})" in step.description) == bool(lacks)
    model, batch = tiny_model()
    mask = model.build_attention_mask(batch["input_ids"])
    for chunk in (0, 16):
        fast = fast_step(model, "cpu", autocast_bf16=True, loss_chunk_size=chunk)
        plain = PlainStep(model, OptimSection(), loss_chunk_size=chunk)
        assert torch.equal(fast.loss(model, batch, mask, 0.5), plain.loss(model, batch, mask))


def fast_and_plain_losses(device: str, autocast: bool, **fast_kw):
    """The fast step's loss (Triton loss on) and the plain step's, their gradients after the trainer's scaling."""
    model, batch = tiny_model(device)
    mask = model.build_attention_mask(batch["input_ids"])
    upstream = 1.0 / int((batch["labels"] != IGNORE_INDEX).sum())
    out = []
    for make in (
        lambda: PlainStep(model, OptimSection(), compile=device == "cuda"),
        lambda: fast_step(model, "cuda", **fast_kw),
    ):
        step = make()  # the fast step converts the model (with the copies): after the plain step's turn
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            scale = upstream if device == "cuda" else torch.tensor(upstream)  # the step makes a float a GPU tensor
            loss = step.loss(model, batch, mask, scale)
        (loss * upstream).backward()
        if isinstance(step, FastStep):
            grads = dense_gradients(step, model)
        else:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        out.append((loss.detach(), grads))
        step.optimizer.zero_grad(set_to_none=True)
    assert step.on["Triton loss"]
    return out


def test_the_fast_steps_triton_loss_is_the_plain_steps_loss(kernel):
    """The fast step's head loss as it runs on one GPU (its decisions taken for a CUDA device, the kernel run
    on CPU through the interpreter), given the gradient the trainer will give it: the plain step's loss to
    float32 rounding, and its gradients."""
    (want, want_grads), (got, got_grads) = fast_and_plain_losses("cpu", autocast=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_on_a_gpu_under_autocast_the_fast_steps_loss_is_the_plain_steps():
    """On a model under bf16 autocast, with the copies (the head multiplies by the output weight's): the
    compiled plain loss and its gradients, to the bf16 logits' rounding."""
    (want, want_grads), (got, got_grads) = fast_and_plain_losses("cuda", autocast=True, autocast_bf16=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-2, atol=1e-2 * grad.abs().max().item(), msg=name)


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
        got = loss_and_grads(hidden_BSH, weight_VH, labels_BS, upstream, triton_loss, grad_scale=scale)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a.dtype == b.dtype == torch.float32
        # bf16 gradients of the logits; the two paths' float32 log-sum-exps differ in the last bits
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())
