"""The training step's strategies (nemo_lite.training.step, nemo_lite.training.fast): the plain step is
torch's clip and AdamW bit for bit and skips a non-finite step; ``build_step`` picks a step and says
why; the fast step's module swaps change no names, state or float32 outputs; and the fast step (Triton
AdamW, bf16 weight copies, lookup rows) gives torch's update on a tiny model, on CPU through Triton's
interpreter."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from kernel_utils import interpreted
from torch import nn

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.models import LlamaForCausalLM, get_preset
from nemo_lite.testing.step import dense_gradients
from nemo_lite.training.config import ConfigError, OptimSection, RecipeConfig
from nemo_lite.training.fast.optim import FusedAdamW, clip_factor
from nemo_lite.training.fast.step import FastStep
from nemo_lite.training.fast.swaps import CopyLinear, RowsEmbedding, swap_in_lookup_rows, swap_in_weight_copies
from nemo_lite.training.launch import check_overrides
from nemo_lite.training.loss import IGNORE_INDEX, cross_entropy_sum
from nemo_lite.training.optimizers import param_groups
from nemo_lite.training.step import PlainStep
from nemo_lite.training.step_choice import build_step

ADAMW_KERNEL = "nemo_lite.training.fast.adamw_kernel"
OPTIM = OptimSection(lr=1e-2, weight_decay=0.1)
PARTS = ("Triton AdamW", "bf16 weight copies", "Triton loss", "embedding gradient as rows")
# A loss chunk longer than any batch here: the torch loss, unchunked, with the Triton loss off
# (the Triton loss against the torch one: tests/test_loss_kernel.py).
UNCHUNKED = 1 << 20


def twins(device: str = "cpu", **overrides) -> list[LlamaForCausalLM]:
    """Two one-layer "tiny" models holding the same weights (eager attention: deterministic on a GPU too)."""
    config = get_preset("tiny", num_hidden_layers=1, **overrides)
    models = []
    for _ in range(2):
        model = LlamaForCausalLM(config, attention=AttentionConfig(backend="eager", attn_mask_type="block_causal")).to(
            device
        )
        model.init_weights(seed=0)
        models.append(model)
    return models


def batches(model: nn.Module, n: int, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Packed rows of two documents each; next-token labels, the last position ignored."""
    config = model.config
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, config.vocab_size, (2, 32), generator=gen)
        ids[:, 13] = config.eos_token_id
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = ids[:, 1:]
        out.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return out


def run_step(step, model, batch, clip: float, *, autocast: bool = False, poison: str = "", before_apply=None):
    """What Trainer.train_step does with one micro-batch in one process: the loss scaled to the step's
    mean, backward, the norm, then ``apply`` with the step's report. ``poison``: make the loss ("loss")
    or one gradient ("gradient") non-finite."""
    device = batch["input_ids"].device.type
    mask = model.build_attention_mask(batch["input_ids"])
    loss_scale = 1.0 / int((batch["labels"] != IGNORE_INDEX).sum())
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = step.loss(model, batch, mask, loss_scale)
    if poison == "loss":
        loss = loss * float("nan")
    (loss * loss_scale).backward()
    if poison == "gradient":
        with torch.no_grad():
            model.norm.weight.grad[0] = float("inf")
    norm = step.grad_norm()
    if before_apply is not None:
        before_apply()
    report = torch.stack([loss.detach().double(), norm.double()])
    return step.apply(report, norm, clip)


def fast_step(model: nn.Module, device: str = "cpu", **kwargs) -> FastStep:
    kwargs = {"distributed": False, "autocast_bf16": True, "loss_chunk_size": UNCHUNKED, **kwargs}
    return FastStep(model, OPTIM, device=torch.device(device), **kwargs)


# ---- the plain step ------------------------------------------------------------------------------


def test_the_plain_step_is_clip_grad_norm_and_torchs_adamw_bit_for_bit():
    """Three steps, clipping off, binding and not binding: the same parameters, state and values as
    ``clip_grad_norm_`` + ``torch.optim.AdamW`` (decay on matrices only) in the usual order."""
    model, reference = twins()
    clips = (0.0, 0.05, 100.0)
    step = PlainStep(model, OPTIM)
    got = [run_step(step, model, batch, clip) for batch, clip in zip(batches(model, 3), clips, strict=True)]
    assert all(p.grad is None for p in model.parameters())  # apply cleared them
    assert got[1][1] > 2 * clips[1] and got[2][1] < clips[2] / 2  # the clip bound, then did not
    assert step.description.startswith("plain step:")

    matrices = [p for p in reference.parameters() if p.dim() >= 2]
    vectors = [p for p in reference.parameters() if p.dim() < 2]
    assert matrices and vectors
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": OPTIM.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=OPTIM.lr,
        betas=(OPTIM.beta1, OPTIM.beta2),
        eps=OPTIM.eps,
    )
    want = []
    for batch, clip in zip(batches(reference, 3), clips, strict=True):
        ids, labels = batch["input_ids"], batch["labels"]
        hidden = reference.forward_hidden(ids, attention_mask=reference.build_attention_mask(ids))
        loss = cross_entropy_sum(hidden, reference.output_weight, labels)
        (loss * (1.0 / int((labels != IGNORE_INDEX).sum()))).backward()
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        opt.step()
        opt.zero_grad()
        want.append([loss.item(), norm.item()])
    assert got == want
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name
    got_state, want_state = step.optimizer.state_dict()["state"], opt.state_dict()["state"]
    assert got_state.keys() == want_state.keys()
    for i in want_state:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got_state[i][key], want_state[i][key]), (i, key)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
@pytest.mark.parametrize("impl", ["plain", "fast"])
def test_a_non_finite_step_changes_nothing(impl, poison):
    """After a good step, a step with a NaN loss (or an infinite gradient, so an infinite norm) leaves the
    parameters and the optimizer's state (step counts included) as they were, reports the values it saw,
    and clears the gradients. The plain step skips on the host; the fast step (on CPU: torch's fused AdamW)
    inside the kernel, through ``found_inf``, before the host reads the values."""
    model, _ = twins()
    step = PlainStep(model, OPTIM) if impl == "plain" else fast_step(model)
    good, bad = batches(model, 2)
    run_step(step, model, good, 1.0)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = copy.deepcopy(step.optimizer.state_dict())

    values = run_step(step, model, bad, 1.0, poison=poison)
    assert math.isfinite(values[0]) == (poison == "gradient") and not math.isfinite(values[1])
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert p.grad is None, name
    after = step.optimizer.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for i, tensors in state["state"].items():
        for key, value in tensors.items():
            assert torch.equal(after["state"][i][key], value), (i, key)

    run_step(step, model, good, 1.0)  # and the next good step updates again
    assert not torch.equal(model.norm.weight, params["norm.weight"])


# ---- choosing the step ---------------------------------------------------------------------------


def test_build_step_resolves_plain_auto_and_fast():
    """``plain`` is the plain step; ``auto`` is the plain step on a CPU and says why; ``fast`` on a CPU is the
    fast step with only its fused torch AdamW (its Triton parts named off for want of a CUDA device), and
    is refused in one line where it cannot run at all."""
    model, _ = twins()
    kw = {"distributed": False, "autocast_bf16": True, "compile": False, "loss_chunk_size": 0}
    cpu = torch.device("cpu")
    assert type(build_step(model, OPTIM, impl="plain", device=cpu, **kw)) is PlainStep
    auto = build_step(model, OPTIM, impl="auto", device=cpu, **kw)
    assert type(auto) is PlainStep and auto.description.startswith("plain step:")
    assert "the fast step's kernels need a CUDA device; this run is on cpu" in auto.description
    fast = build_step(model, OPTIM, impl="fast", device=cpu, **kw)
    assert type(fast) is FastStep and fast.on == {"fused AdamW": True, **dict.fromkeys(PARTS, False)}
    assert isinstance(fast.optimizer, FusedAdamW) and fast.optimizer.kernel == "torch"
    assert fast.description.startswith("fast step: fused AdamW (cpu); off: ")
    for part in PARTS[:3]:
        assert f"{part} (needs a CUDA device)" in fast.description
    assert not any(isinstance(m, CopyLinear | RowsEmbedding) for m in model.modules())  # nothing swapped

    meta = torch.device("meta")
    want = r"trainer.step_impl=fast needs a CUDA device or the CPU \(this run is on meta\); use trainer.step_impl=auto"
    with pytest.raises(ConfigError, match=want):
        build_step(model, OPTIM, impl="fast", device=meta, **kw)
    with pytest.raises(ValueError, match=r"the fast step needs a CUDA device or the CPU \(this run is on meta\)"):
        FastStep(model, OPTIM, device=meta, distributed=False, autocast_bf16=True)
    with pytest.raises(ConfigError, match="trainer.step_impl='fastest' is not valid; choose one of: auto, fast, plain"):
        build_step(model, OPTIM, impl="fastest", device=cpu, **kw)


@pytest.mark.parametrize("impl", ["auto", "fast"])
def test_the_trainer_says_in_one_line_which_step_runs_on_a_cpu(tmp_path, capsys, impl):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU resolution")
    from nemo_lite.training.trainer import Trainer

    cfg = RecipeConfig()
    cfg.run_dir = str(tmp_path)
    cfg.model.overrides = {"num_hidden_layers": 1}
    cfg.trainer.step_impl = impl
    trainer = Trainer(cfg)
    trainer.setup()
    assert type(trainer.step_impl) is (PlainStep if impl == "auto" else FastStep)
    assert trainer.optimizer is trainer.step_impl.optimizer
    logged = [line for line in capsys.readouterr().err.splitlines() if "step:" in line]
    assert logged == [f"[nemo_lite] {trainer.step_impl.description}"]
    assert "need a CUDA device" in logged[0] or "needs a CUDA device" in logged[0]


@pytest.mark.parametrize(
    "knob", ["optim.weight_copies", "optim.kernel", "optim.fused", "optim.lookup_gradient", "trainer.loss_kernel"]
)
def test_the_speed_knobs_that_trainer_step_impl_replaced_are_refused_by_name(knob):
    with pytest.raises(ConfigError, match=f"unknown config key '{knob}'"):
        check_overrides([f"{knob}=true"])


LACKS_ONE_PROCESS = "one process (FSDP2 shards the weights)"


@pytest.mark.parametrize(
    "setting, off",
    [
        ({}, {}),
        (
            {"autocast_bf16": False},
            {"bf16 weight copies": "bf16 autocast", "embedding gradient as rows": "bf16 weight copies"},
        ),
        ({"loss_chunk_size": 512}, {"Triton loss": "trainer.loss_chunk_size=0"}),
        (
            {"distributed": True},
            {**dict.fromkeys(PARTS[:3], LACKS_ONE_PROCESS), "embedding gradient as rows": "bf16 weight copies"},
        ),
        ({"triton": False}, {**dict.fromkeys(PARTS[:3], "triton"), "embedding gradient as rows": "bf16 weight copies"}),
    ],
    ids=["all-on", "no-bf16-autocast", "chunked-loss", "distributed", "no-triton"],
)
def test_the_fast_step_on_a_gpu_says_which_parts_are_on_and_why_the_others_are_off(monkeypatch, setting, off):
    """The parts' decisions for a CUDA device (the model stays on the CPU: building the step runs nothing
    on the device), and the module swaps applied exactly where their part is on."""
    pytest.importorskip("triton")
    model, _ = twins()
    setting = dict(setting)
    if not setting.pop("triton", True):
        find_spec = importlib.util.find_spec
        without_triton = lambda name, *a: None if name == "triton" else find_spec(name, *a)  # noqa: E731
        monkeypatch.setattr(importlib.util, "find_spec", without_triton)
    step = fast_step(model, "cuda", **{"loss_chunk_size": 0, **setting})
    assert step.on == {"fused AdamW": True, **{part: part not in off for part in PARTS}}
    where = "on local shards, cuda" if setting.get("distributed") else "cuda"
    assert step.description.startswith(f"fast step: fused AdamW ({where})")
    for part in PARTS:
        assert part in step.description
    for part, lacks in off.items():
        assert f"{part} (needs {lacks})" in step.description
    assert ("; off: " in step.description) == bool(off) and "\n" not in step.description
    assert isinstance(step.optimizer, FusedAdamW)
    assert step.optimizer.kernel == ("triton" if step.on["Triton AdamW"] else "torch")
    assert isinstance(model.layers[0].mlp.up_proj, CopyLinear) == step.on["bf16 weight copies"]
    assert isinstance(model.embed_tokens, RowsEmbedding) == step.on["embedding gradient as rows"]
    assert (step.output_copy is not None) == step.on["bf16 weight copies"]


@pytest.mark.parametrize("hook", ["register_hook", "register_post_accumulate_grad_hook"])
def test_the_fast_step_refuses_a_gradient_hook_on_a_parameter_whose_gradient_it_keeps_off_grad(hook):
    """With the copies and rows (on a CUDA device; the model stays on the CPU, nothing runs), a hook on a
    swapped parameter is refused by name; on a CPU nothing is swapped and hooks are fine."""
    pytest.importorskip("triton")
    model = twins()[0]
    for param in (model.embed_tokens.weight, model.layers[0].mlp.up_proj.weight, model.norm.weight):
        getattr(param, hook)(lambda *args: None)
    want = (
        r"the fast step keeps the gradients of embed_tokens\.weight, layers\.0\.mlp\.up_proj\.weight off \.grad "
        r"\(bf16 weight copies, lookup rows\), so their gradient hooks would never run; use trainer\.step_impl=plain$"
    )
    with pytest.raises(ValueError, match=want):  # the norm's gradient stays on .grad: its hook is not named
        fast_step(model, "cuda")
    for device, autocast_bf16 in (("cpu", True), ("cuda", False)):
        model = twins()[0]
        getattr(model.layers[0].mlp.up_proj.weight, hook)(lambda *args: None)
        assert not fast_step(model, device, autocast_bf16=autocast_bf16).on["bf16 weight copies"]


# ---- the module swaps ------------------------------------------------------------------------------


def fill_copies(copies: dict[torch.Tensor, torch.Tensor]) -> None:
    """What the optimizer does when it takes the copies (FusedAdamW.keep_weight_copies)."""
    with torch.no_grad():
        for param, weight_copy in copies.items():
            weight_copy.copy_(param)


def test_module_swaps_keep_names_state_and_float32_outputs():
    plain, model = twins()
    names, keys, params = [n for n, _ in model.named_parameters()], list(model.state_dict()), list(model.parameters())
    copies = swap_in_weight_copies(model, model.output_weight)
    rows = swap_in_lookup_rows(model)
    fill_copies(copies)
    # q, k, v, o, gate, up, down per layer; the (tied) output projection, which is the embedding matrix
    assert len(copies) == 7 * model.config.num_hidden_layers + 1 and model.embed_tokens.weight in copies
    assert all(c.dtype == torch.bfloat16 and c.is_leaf and c.requires_grad for c in copies.values())
    assert list(rows) == [model.embed_tokens.weight]
    assert isinstance(model.layers[0].attention.q_proj, CopyLinear) and isinstance(model.embed_tokens, RowsEmbedding)
    assert [n for n, _ in model.named_parameters()] == names
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # the same Parameter objects
    assert list(model.state_dict()) == keys  # the copies and rows are not state: checkpoints do not change
    model.load_state_dict(plain.state_dict())  # strict: a plain checkpoint loads into the swapped model
    ids = batches(model, 1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))  # outside autocast: the float32 weights


def test_copy_linear_multiplies_by_its_copy_under_autocast_and_its_gradient_lands_on_the_copy():
    """Under CPU bf16 autocast the swapped model gives autocast's loss, and its gradients (each copy's
    bf16 one, the embedding's own float32 one) are autocast's float32 gradients, bit for bit."""
    plain, model = twins()
    copies = swap_in_weight_copies(model, model.output_weight)
    fill_copies(copies)
    ids = batches(model, 1)[0]["input_ids"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = cross_entropy_sum(plain.forward_hidden(ids), plain.output_weight, ids)
        got = cross_entropy_sum(model.forward_hidden(ids), copies[model.output_weight], ids)
        assert torch.equal(model(ids), plain(ids))  # the blocks through their copies
    assert torch.equal(got, want)
    want.backward()
    got.backward()
    for (name, want_param), param in zip(plain.named_parameters(), model.parameters(), strict=True):
        weight_copy = copies.get(param)
        if name.endswith("proj.weight"):  # the copy carried it all
            assert param.grad is None and weight_copy.grad.dtype == torch.bfloat16, name
            assert torch.equal(weight_copy.grad.float(), want_param.grad), name
        elif name == "embed_tokens.weight":  # the lookup's own float32 gradient, the head copy's bf16 one
            assert param.grad.dtype == torch.float32 and weight_copy.grad.dtype == torch.bfloat16
            assert torch.equal(param.grad + weight_copy.grad.float(), want_param.grad)
        else:
            assert weight_copy is None and torch.equal(param.grad, want_param.grad), name


def test_rows_embedding_keeps_the_dense_embedding_gradient_as_rows():
    plain, model = twins(tie_word_embeddings=False)
    rows = swap_in_lookup_rows(model)[model.embed_tokens.weight]
    batch = batches(model, 1)[0]
    for m in (plain, model):
        cross_entropy_sum(m.forward_hidden(batch["input_ids"]), m.output_weight, batch["labels"]).backward()
    assert model.embed_tokens.weight.grad is None and rows
    assert torch.equal(rows.dense(), plain.embed_tokens.weight.grad)
    for (name, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        if name != "embed_tokens.weight":
            assert torch.equal(a.grad, b.grad), name
    with pytest.raises(ValueError, match="lookup rows support a plain embedding"):
        RowsEmbedding(nn.Embedding(10, 4, max_norm=1.0))


def test_rows_embedding_keeps_the_pad_rows_gradient_out_as_the_dense_one_does():
    from nemo_lite.components.models.decoder import set_embedding_padding

    plain, model = twins(tie_word_embeddings=False)
    batch = batches(model, 1)[0]
    pad = int(batch["input_ids"][0, 0])
    for m in (plain, model):
        set_embedding_padding(m, pad)
    rows = swap_in_lookup_rows(model)[model.embed_tokens.weight]
    for m in (plain, model):
        cross_entropy_sum(m.forward_hidden(batch["input_ids"]), m.output_weight, batch["labels"]).backward()
    assert (plain.embed_tokens.weight.grad[pad] == 0).all()
    assert torch.equal(rows.dense(), plain.embed_tokens.weight.grad)


# ---- the fast step's update against torch's ------------------------------------------------------


def reference_step(model: nn.Module, opt: FusedAdamW, batch, clip: float, found_inf: float = 0.0):
    """The reference: autocast's casts, dense float32 gradients, torch's fused kernel. Returns the loss,
    the gradients (before the step, which unscales them in place) and the norm."""
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        hidden = model.forward_hidden(ids, attention_mask=model.build_attention_mask(ids))
        loss = cross_entropy_sum(hidden, model.output_weight, labels)
    (loss * (1.0 / int((labels != IGNORE_INDEX).sum()))).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    norm = torch.nn.utils.get_total_norm(list(grads.values()))
    found = torch.tensor(found_inf, device=ids.device)
    opt.step(grad_scale=clip_factor(norm, clip) if clip > 0 else None, found_inf=found)
    opt.zero_grad()
    return loss.detach(), grads, norm


def assert_the_same_update(got: tuple, want: tuple, rows_exact: bool = True) -> None:
    """The loss and the gradients bit for bit (autocast's casts round as the copies do; the rows hold the
    dense lookup gradient: on CPU summed in the same order, on a GPU to float32 rounding where CUDA's
    reduction of the lookups may order them otherwise), the norm to float32 rounding (the kernels sum the
    squares in another order)."""
    (got_loss, got_grads, got_norm), (want_loss, want_grads, want_norm) = got, want
    assert float(got_loss) == want_loss.item()
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        if name == "embed_tokens.weight" and not rows_exact:
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-8)
        else:
            assert torch.equal(got_grads[name], grad), name
    torch.testing.assert_close(float(got_norm), want_norm.item(), rtol=1e-6, atol=0)


def assert_the_same_weights(model: nn.Module, reference: nn.Module, copies: dict) -> None:
    """The parameters to the Triton kernel's float32 rounding (test_adamw_kernel's tolerance), the copies
    the parameters rounded as autocast's cast rounds."""
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for param, weight_copy in copies.items():
        assert torch.equal(weight_copy, param.to(torch.bfloat16))


def start_from(model: nn.Module, reference: nn.Module) -> None:
    """The reference's weights, bit for bit, before the next step: the kernels' last-bit differences would
    otherwise flip some bf16 roundings of the next forward, which Adam's normalized update turns into
    differences above float32 rounding. The caller then refreshes the copies (FastStep.weights_changed)."""
    with torch.no_grad():
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            a.copy_(b)


# Fewer elements for Triton's interpreter, whose reductions run element by element.
SMALL = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
CLIPS = (0.0, 0.05)  # off, then binding; then a skipped step (found_inf)


def test_the_fast_steps_parts_in_the_interpreter_give_torchs_update(monkeypatch):
    """What the fast step does on a GPU, from its parts on CPU (its Triton parts need a CUDA device): the
    module swaps, FusedAdamW(kernel="triton") keeping the bf16 copies and the lookup rows, the head on the
    output weight's copy, the norm from the kernel's tables, the clip and the skip inside the kernel;
    against its twin with autocast's casts, dense gradients and FusedAdamW(kernel="torch"). Two steps,
    clipping off then binding, each from the same weights, then a skipped step."""
    interpreted(monkeypatch, ADAMW_KERNEL)
    model, reference = twins(**SMALL)
    copies = swap_in_weight_copies(model, model.output_weight)
    rows = swap_in_lookup_rows(model)
    betas = (OPTIM.beta1, OPTIM.beta2)
    opt = FusedAdamW(param_groups(model, OPTIM.weight_decay), lr=OPTIM.lr, betas=betas, eps=OPTIM.eps, kernel="triton")
    opt.keep_weight_copies(list(copies.items()))
    for param, lookups in rows.items():
        opt.keep_lookup_gradient(param, lookups)
    ref_opt = FusedAdamW(param_groups(reference, OPTIM.weight_decay), lr=OPTIM.lr, betas=betas, eps=OPTIM.eps)
    embed = model.embed_tokens.weight
    for i, batch in enumerate(batches(model, len(CLIPS) + 1)):
        skip = i == len(CLIPS)
        clip = 1.0 if skip else CLIPS[i]
        start_from(model, reference)
        opt.refresh_weight_copies()
        want = reference_step(reference, ref_opt, batch, clip, found_inf=float(skip))

        ids, labels = batch["input_ids"], batch["labels"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.forward_hidden(ids, attention_mask=model.build_attention_mask(ids))
            loss = cross_entropy_sum(hidden, copies[model.output_weight], labels)
        (loss * (1.0 / int((labels != IGNORE_INDEX).sum()))).backward()
        assert embed.grad is None and all(p.grad is None for p in copies if p is not embed)
        dense = {}
        for name, param in model.named_parameters():
            own = rows[param].dense() if param in rows else param.grad
            on_copy = copies[param].grad.float() if param in copies else None
            dense[name] = own if on_copy is None else on_copy if own is None else own + on_copy
        opt.prepare_step()  # as FastStep.grad_norm: the norm reads the update's tables
        norm = opt.grad_norm()
        assert_the_same_update((loss.detach(), dense, norm), want)
        opt.step(grad_scale=clip_factor(norm, clip) if clip > 0 else None, found_inf=torch.tensor(float(skip)))
        opt.zero_grad()
        assert not rows[embed] and all(c.grad is None for c in copies.values())
        assert_the_same_weights(model, reference, copies)
    for param, ref_param in zip(model.parameters(), reference.parameters(), strict=True):
        assert opt.state[param]["step"].item() == ref_opt.state[ref_param]["step"].item() == len(CLIPS)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[param][key], ref_opt.state[ref_param][key], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_the_fast_step_on_a_gpu_gives_torchs_update():
    """The fast step itself (Triton AdamW, copies, rows; the head loss unchunked torch, compared in
    tests/test_loss_kernel.py) against FusedAdamW(kernel="torch") on autocast's casts, as on CPU above."""
    model, reference = twins("cuda")
    step = fast_step(model, "cuda")
    assert step.on == {"fused AdamW": True, **dict.fromkeys(PARTS, True), "Triton loss": False}
    betas = (OPTIM.beta1, OPTIM.beta2)
    ref_opt = FusedAdamW(param_groups(reference, OPTIM.weight_decay), lr=OPTIM.lr, betas=betas, eps=OPTIM.eps)
    seen = []  # the gradients as the update uses them, taken before apply clears them
    for batch, clip in zip(batches(model, len(CLIPS), "cuda"), CLIPS, strict=True):
        start_from(model, reference)
        step.weights_changed()
        want = reference_step(reference, ref_opt, batch, clip)
        values = run_step(
            step, model, batch, clip, autocast=True, before_apply=lambda: seen.append(dense_gradients(step, model))
        )
        assert_the_same_update((values[0], seen[-1], values[1]), want, rows_exact=False)
        assert_the_same_weights(model, reference, step.copies)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    values = run_step(step, model, batches(model, 1, "cuda")[0], 1.0, autocast=True, poison="loss")
    assert math.isnan(values[0])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert_the_same_weights(model, model, step.copies)  # the copies still the (unchanged) weights, rounded


@pytest.mark.parametrize("first,then", [("plain", "fast"), ("fast", "plain")])
def test_a_checkpoint_of_one_step_resumes_under_the_other_with_its_own_kernel(tmp_path, first, then):
    """The optimizer state is torch's AdamW layout under both steps; a loaded state dict keeps the
    resuming step's kernel flags (torch would take the saved ones) and puts the step counts where its
    kernel reads them. The continued losses stay within float32 rounding of the uninterrupted run."""
    from recipe_utils import tiny_config

    from nemo_lite.training.metrics import read_metrics
    from nemo_lite.training.trainer import Trainer

    def run(run_dir, impl, steps, resume=False):
        cfg = tiny_config(run_dir, "sdpa", steps=steps)
        cfg.trainer.step_impl, cfg.trainer.save_every, cfg.trainer.resume = impl, 3, resume
        cfg.trainer.sample_tokens, cfg.trainer.export_hf = 0, False
        trainer = Trainer(cfg)
        trainer.fit()
        return trainer

    whole = run(tmp_path / "whole", first, 6)
    run(tmp_path / "split", first, 3)
    resumed = run(tmp_path / "split", then, 6, resume=True)
    fused = then == "fast"
    for group in resumed.optimizer.param_groups:
        assert bool(group["fused"]) == fused
    assert {str(s["step"].device) for s in resumed.optimizer.state.values()} == {"cpu"}
    assert {float(s["step"]) for s in resumed.optimizer.state.values()} == {6.0}
    want = [r["loss"] for r in read_metrics(whole.run_dir)][3:]
    got = [r["loss"] for r in read_metrics(resumed.run_dir)][3:]
    assert len(got) == 3
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
