"""Pieces of the trainer that need no data: schedule, FLOP counting, checkpoint files, config checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attention_reference import reference_allowed

from nemo_lite.components.attention import get_attention_backend
from nemo_lite.components.attention.masks import allowed_pairs
from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.testing.hooks import after_each_checkpoint_file
from nemo_lite.training import checkpoint as ckpt
from nemo_lite.training.config import ConfigError, RecipeConfig, validate
from nemo_lite.training.fast.optim import FusedAdamW, clip_factor
from nemo_lite.training.launch import check_overrides
from nemo_lite.training.schedule import lr_factor


def test_warmup_then_cosine_to_the_floor():
    f = [lr_factor(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))


@pytest.mark.parametrize(
    "mask_type,fixed,window",
    [("causal", None, 0), ("block_causal", None, 0), ("block_causal", 5, 0), ("block_causal", 4, 3)],
)
def test_attention_flops_count_the_pairs_the_mask_allows(mask_type, fixed, window):
    ids = torch.tensor([[0, 5, 5, 0, 0, 7, 7, 7, 7, 7, 7, 0, 3], [4] * 13])
    mask = get_attention_backend("eager")(attn_mask_type=mask_type, fixed_block_size=fixed).build_mask(ids, 0)
    expected = int(reference_allowed(ids, 0, mask_type, fixed, window).sum())
    assert int(allowed_pairs(mask, window)) == expected


def test_the_recipe_data_section_is_the_loaders_schema():
    assert dataclasses.fields(RecipeConfig().data) == dataclasses.fields(DataConfig)


def test_validate_names_the_bad_value_and_the_choices():
    cfg = RecipeConfig()
    cfg.attention.backend = "flash9"
    with pytest.raises(ConfigError, match=r"attention='flash9' is not valid; choose one of: eager, flex, sdpa"):
        validate(cfg)
    cfg = RecipeConfig()
    cfg.trainer.max_steps = 0
    with pytest.raises(ConfigError, match="trainer.max_steps=0 must be a finite number > 0"):
        validate(cfg)


def test_unknown_command_line_key_lists_valid_keys():
    check_overrides(["attention=sdpa", "trainer.max_steps=5", "model.overrides.num_hidden_layers=2", "+hydra.x=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_step'.*valid keys there: max_steps"):
        check_overrides(["trainer.max_step=5"])
    with pytest.raises(ConfigError, match="the top level has no 'trainr'"):
        check_overrides(["trainr.max_steps=5"])


def _tiny_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def test_checkpoints_are_kept_to_the_last_k_and_found_in_order(tmp_path):
    model = _tiny_model()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), _tiny_model())
    assert state == {"step": 4}


def test_a_crash_while_writing_leaves_the_previous_checkpoint_latest(tmp_path):
    model = _tiny_model()
    ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1}, keep_last=3)

    def crash(name):
        if name == ckpt.STATE_FILE:
            raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt), after_each_checkpoint_file(crash):
        ckpt.save_checkpoint(tmp_path, 2, model, {"step": 2}, keep_last=3)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    ckpt.save_checkpoint(tmp_path, 2, model, {"step": 2}, keep_last=3)  # the next save cleans the debris
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]


def test_resume_argument_forms(tmp_path):
    assert ckpt.resolve_resume("false", tmp_path) is None
    assert ckpt.resolve_resume("true", tmp_path) is None  # nothing saved yet: start fresh
    with pytest.raises(ckpt.NoCheckpointError, match="no checkpoint there"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 7, _tiny_model(), {}, keep_last=1)
    assert ckpt.resolve_resume("true", tmp_path) == path
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "other") == path
    assert ckpt.resolve_resume(str(path), tmp_path / "other") == path


def test_chunked_head_loss_equals_the_plain_one_with_gradients():
    from nemo_lite.training.loss import IGNORE_INDEX, cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 13), generator=g)
    labels[0, 3] = IGNORE_INDEX
    plain = cross_entropy_sum(hidden, weight, labels)
    chunked = cross_entropy_sum(hidden, weight, labels, chunk_tokens=5)
    reference = torch.nn.functional.cross_entropy(
        (hidden @ weight.t()).reshape(-1, 50), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    torch.testing.assert_close(plain, reference)
    torch.testing.assert_close(chunked, reference)
    grads = torch.autograd.grad(chunked, (hidden, weight))
    grads_ref = torch.autograd.grad(reference, (hidden, weight))
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


def _two_adamw_steps(step_fn, grads, fused: bool):
    param = torch.nn.Parameter(torch.zeros(grads[0].shape, dtype=torch.float64))
    opt = (
        FusedAdamW([param], lr=0.1, weight_decay=0.1) if fused else torch.optim.AdamW([param], lr=0.1, weight_decay=0.1)
    )
    for grad in grads:
        param.grad = grad.clone()
        step_fn(opt, param)
    return param.detach()


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_fused_step_clips_like_clip_grad_norm(max_norm):
    """Clipping inside the fused kernel matches clip_grad_norm_ + AdamW; a step with another norm
    makes Adam's moments see the clip (a constant factor alone would cancel in m / sqrt(v))."""
    gen = torch.Generator().manual_seed(0)
    grads = [scale * torch.randn(64, generator=gen, dtype=torch.float64) for scale in (10.0, 0.05)]

    def reference(opt, param):
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_([param], max_norm)
        opt.step()

    def on_device(opt, param):
        norm = torch.linalg.vector_norm(param.grad)
        opt.step(grad_scale=clip_factor(norm, max_norm) if max_norm > 0 else None)

    expected = _two_adamw_steps(reference, grads, fused=False)
    got = _two_adamw_steps(on_device, grads, fused=True)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)  # the kernel takes a float32 scale
    unclipped = _two_adamw_steps(lambda opt, p: opt.step(), grads, fused=False)
    assert (max_norm > 0) == (not torch.allclose(got, unclipped, rtol=1e-3, atol=1e-6))


def test_adamw_steps_exactly_like_torchs_fused_adamw():
    """FusedAdamW (which hands the fused kernel plain local tensors) gives torch's fused update bit for
    bit: two groups, weight decay on one, a step with a grad_scale (the in-kernel clip), a skipped step."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(8, 4, generator=gen), torch.randn(4, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(3)]

    def run(cls):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
        opt = cls(groups, lr=1e-2) if cls is FusedAdamW else cls(groups, lr=1e-2, fused=True)
        for i, step_grads in enumerate(grads):
            for param, grad in zip(params, step_grads, strict=True):
                param.grad = grad.clone()
            kwargs = {"grad_scale": torch.tensor(3.0)} if i == 1 else {}
            if i == 2:
                kwargs["found_inf"] = torch.tensor(0.0)
            if cls is FusedAdamW:
                opt.step(**kwargs)
            else:  # torch's own fused AdamW reads them as attributes of the optimizer
                opt.grad_scale, opt.found_inf = kwargs.get("grad_scale"), kwargs.get("found_inf")
                opt.step()
        skipped = [p.detach().clone() for p in params]
        for param, grad in zip(params, grads[0], strict=True):
            param.grad = grad.clone()
        if cls is FusedAdamW:
            opt.step(found_inf=torch.tensor(1.0))
            assert all(torch.equal(a, b) for a, b in zip(params, skipped, strict=True))
        return params, opt.state_dict()["state"]

    (got, got_state), (want, want_state) = run(FusedAdamW), run(torch.optim.AdamW)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    for i in want_state:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got_state[i][key], want_state[i][key]), key


def test_grad_scale_needs_the_fused_step():
    opt = FusedAdamW([torch.nn.Parameter(torch.ones(2))], amsgrad=True)
    with pytest.raises(ValueError, match="need the fused step"):
        opt.step(grad_scale=torch.tensor(2.0))


def test_step_impl_names_the_bad_value_and_the_choices():
    cfg = RecipeConfig()
    cfg.trainer.step_impl = "fastest"
    with pytest.raises(
        ConfigError, match=r"trainer.step_impl='fastest' is not valid; choose one of: auto, fast, plain"
    ):
        validate(cfg)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_validation_reads_the_same_tokens_for_every_batch_size_and_rank_count(batch_size):
    from nemo_lite.training.trainer import rank_batches

    rows = [{"input_ids": torch.full((4,), i), "labels": torch.full((4,), i)} for i in range(7)]
    for world_size in (1, 2, 3):
        shares = [rank_batches(rows, rank=r, world_size=world_size, batch_size=batch_size) for r in range(world_size)]
        assert len({len(share) for share in shares}) == 1  # every rank runs as many batches
        assert all(b["labels"].shape == (batch_size, 4) for share in shares for b in share)
        seen = sorted(int(label) for share in shares for b in share for label in b["labels"][:, 0] if label >= 0)
        assert seen == list(range(7))  # each row once, the fillers ignored


def test_validation_loss_does_not_depend_on_the_batch_size(tmp_path):
    from recipe_utils import tiny_config

    from nemo_lite.training.trainer import Trainer

    losses = []
    for batch_size in (4, 3):
        cfg = tiny_config(tmp_path / str(batch_size), "sdpa", steps=1)
        cfg.data.batch_size, cfg.trainer.val_tokens = batch_size, 64 * 5
        trainer = Trainer(cfg)
        trainer.setup()
        losses.append(trainer.evaluate()["val_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("optim", "lr", float("inf"), "optim.lr=inf must be a finite number > 0"),
        ("optim", "lr", float("nan"), "optim.lr=nan must be a finite number > 0"),
        ("optim", "min_lr_ratio", -0.1, r"optim.min_lr_ratio=-0.1 must be in \[0.0, 1.0\]"),
        ("optim", "weight_decay", -0.1, "optim.weight_decay=-0.1 must be a finite number >= 0"),
        ("optim", "beta2", 1.0, r"optim.beta2=1.0 must be in \[0.0, 1.0\)"),
        ("optim", "eps", 0.0, "optim.eps=0.0 must be a finite number > 0"),
        ("trainer", "clip_grad_norm", float("nan"), "trainer.clip_grad_norm=nan must be a finite number >= 0"),
        ("trainer", "log_every", 0, "trainer.log_every=0 must be a finite number > 0"),
        ("trainer", "val_tokens", -1, "trainer.val_tokens=-1 must be a finite number >= 0"),
    ],
)
def test_values_that_make_no_sense_are_refused(section, key, value, message):
    cfg = RecipeConfig()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_the_attention_line_is_what_the_model_builds(tmp_path, capsys):
    """sdpa with causal masks cut into fixed blocks builds a dense mask: the log says so (it said is_causal=True
    when it came from a backend built apart from the model, without the fixed block size)."""
    from recipe_utils import tiny_config

    from nemo_lite.training.trainer import Trainer

    cfg = tiny_config(tmp_path, "sdpa", steps=1)
    cfg.attention.attn_mask_type, cfg.attention.fixed_block_size = "causal", 16
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.release_run_dir()
    err = capsys.readouterr().err
    assert trainer.raw_model.attention_backend.fixed_block_size == 16
    assert f"[nemo_lite] {trainer.raw_model.attention_backend.describe('cpu')}" in err
    assert "a dense boolean mask per step" in err and "is_causal=True" not in err
