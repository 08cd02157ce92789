"""Mixture of experts: the router, the grouped experts against the per-expert loop, and the qwen3_moe family
against transformers' Qwen3MoeForCausalLM (float32, CPU, odd shapes)."""

from __future__ import annotations

import json

import pytest
import torch
from model_utils import EOS, packed_documents_diff, random_ids, randomize_, save_default_tokenizer
from safetensors.torch import load_file

from nemo_lite.components.attention import AttentionConfig, list_attention_backends
from nemo_lite.components.models import AutoModelForCausalLM, get_model_family, get_preset
from nemo_lite.components.models.families.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from nemo_lite.components.models.moe import (
    Experts,
    Router,
    experts_implementation,
    grouped_mm_emulated,
    num_parameters,
)

transformers = pytest.importorskip("transformers")

SEQ = 19
# Odd on purpose: head_dim 10 != 40 / 4, 7 experts of width 22, top-3, a dense layer (mlp_only_layers) and a
# dense one by decoder_sparse_step, so every kind of layer is crossed.
TINY = dict(
    vocab_size=97,
    hidden_size=40,
    intermediate_size=36,
    moe_intermediate_size=22,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=10,
    num_experts=7,
    num_experts_per_tok=3,
    decoder_sparse_step=1,
    mlp_only_layers=[2],
    norm_topk_prob=True,
    output_router_logits=True,
    router_aux_loss_coef=0.02,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=EOS,
    tie_word_embeddings=False,
)


def hf_qwen3_moe(seed: int = 0, **overrides):
    config = transformers.Qwen3MoeConfig(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # transformers' per-expert loop: its reference
    return randomize_(transformers.Qwen3MoeForCausalLM(config).eval(), seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    theirs = hf_qwen3_moe(seed=1)
    path = tmp_path_factory.mktemp("qwen3_moe")
    theirs.save_pretrained(path, max_shard_size="30KB")
    return theirs, path


# ---- router and experts --------------------------------------------------------------------------


def test_router_softmax_then_topk_and_topk_then_softmax():
    torch.manual_seed(0)
    x = torch.randn(11, 8)
    for norm, after in [(False, False), (True, False), (False, True)]:
        router = Router(8, 5, 2, norm_topk_prob=norm, softmax_after_topk=after, bias=after)
        torch.nn.init.normal_(router.weight)
        if router.bias is not None:
            torch.nn.init.normal_(router.bias)
        probs, weights, experts = router(x)
        logits = x @ router.weight.T + (0 if router.bias is None else router.bias)
        best = logits.argsort(dim=-1, descending=True)[:, :2]
        assert torch.equal(experts, best)
        assert torch.allclose(probs, logits.softmax(-1))
        chosen = logits.gather(1, best)
        want = chosen.softmax(-1) if after else probs.gather(1, best)
        if norm:
            want = want / want.sum(-1, keepdim=True)
        assert torch.allclose(weights, want)


LAYOUTS = {
    "qwen": {},
    "gpt_oss": dict(transposed=True, interleaved=True, bias=True, swiglu_alpha=1.702, swiglu_limit=0.5),
}


def _experts(layout: str, dims=(6, 13, 9)) -> Experts:
    experts = Experts(*dims, **LAYOUTS[layout])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return experts


def _routing(tokens: int, num_experts: int, top_k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    used = torch.tensor([e for e in range(num_experts) if e != 3])  # expert 3 gets no token
    experts = torch.stack([used[torch.randperm(len(used), generator=gen)[:top_k]] for _ in range(tokens)])
    experts[:3] = torch.arange(top_k)  # several tokens on the same experts; an expert may get none
    weights = torch.rand(tokens, top_k, generator=gen)
    return weights, experts


def _run(experts: Experts, x, weights, experts_idx, **kw):
    x = x.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    out = experts.forward_grouped(x, w, experts_idx, **kw) if kw else experts.forward_loop(x, w, experts_idx)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [x.grad, w.grad, *(p.grad.clone() for p in experts.parameters())]
    experts.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grouped_experts_equal_the_per_expert_loop(layout):
    """Sorted by expert, one grouped GEMM per projection (emulated: the same offsets), back in token order:
    the loop's output and every gradient (input, router weights, expert weights)."""
    experts = _experts(layout)
    x = torch.randn(17, 13, generator=torch.Generator().manual_seed(1))
    weights, idx = _routing(17, 6, 3)
    assert (torch.bincount(idx.reshape(-1), minlength=6) == 0).any()  # an idle expert is crossed
    out_loop, grads_loop = _run(experts, x, weights, idx)
    out_grouped, grads_grouped = _run(experts, x, weights, idx, mm=grouped_mm_emulated)
    torch.testing.assert_close(out_grouped, out_loop, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_grouped, grads_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _grouped_mm_runs_on_cpu() -> bool:
    try:
        torch._grouped_mm(torch.zeros(4, 8), torch.zeros(2, 8, 4), offs=torch.tensor([2, 4], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch._grouped_mm has no CPU kernel in this torch")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_grouped_mm_equals_the_loop_where_it_runs_on_cpu(layout):
    """The real ``torch._grouped_mm`` (its CPU kernel wants 16-byte aligned rows: widths a multiple of 4)."""
    experts = _experts(layout, dims=(6, 16, 8))
    x = torch.randn(17, 16, generator=torch.Generator().manual_seed(1))
    weights, idx = _routing(17, 6, 3)
    out_loop, grads_loop = _run(experts, x, weights, idx)
    out_grouped, grads_grouped = _run(experts, x, weights, idx, mm=None)
    torch.testing.assert_close(out_grouped, out_loop, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_grouped, grads_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_token_is_dropped_when_every_token_picks_the_same_experts():
    """All tokens on two experts (no capacity limit): each token's output is those two SwiGLUs, weighted."""
    experts = _experts("qwen")
    x = torch.randn(40, 13)
    idx = torch.tensor([[4, 1]]).expand(40, 2)
    weights = torch.full((40, 2), 0.5)
    gate_up, down = experts.input_major()

    def one(e):
        return experts.activation(x @ gate_up[e]) @ down[e]

    want = 0.5 * one(4) + 0.5 * one(1)
    for kw in ({}, {"mm": grouped_mm_emulated}):
        got = experts.forward_grouped(x, weights, idx, **kw) if kw else experts.forward_loop(x, weights, idx)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_an_unknown_experts_impl_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"experts impl='fast' is not valid; choose one of: auto, grouped, loop"):
        _experts("qwen").impl = "fast"


# ---- qwen3_moe against transformers ---------------------------------------------------------------


@pytest.mark.parametrize("backend", list_attention_backends())
def test_qwen3_moe_logits_equal_transformers(backend, checkpoint):
    theirs, path = checkpoint
    assert len(list(path.glob("model-*.safetensors"))) > 2
    ours = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend=backend))
    assert type(ours) is Qwen3MoeForCausalLM
    assert [type(block.mlp).__name__ for block in ours.layers] == ["SparseMoE", "SparseMoE", "MLP", "SparseMoE"]
    ids = random_ids(2, SEQ, TINY["vocab_size"])
    for impl in ("loop", "grouped"):
        experts_implementation(ours, impl)
        if impl == "grouped":  # the CPU runs the grouped path's sorting and offsets through the emulation
            for module in ours.modules():
                if isinstance(module, Experts):
                    module.forward = lambda x, w, e, m=module: m.forward_grouped(x, w, e, mm=grouped_mm_emulated)
        with torch.no_grad():
            out = theirs(ids, labels=ids)
            diff = (ours(ids) - out.logits).abs().max().item()
        print(f"\n[parity] qwen3_moe {backend} {impl}: max |dlogit| = {diff:.2e}")
        assert diff <= 1e-4
        # the load-balancing loss of the same forward is transformers' aux_loss
        torch.testing.assert_close(ours.load_balancing_loss(), out.aux_loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", list_attention_backends())
def test_qwen3_moe_packed_documents_equal_each_document_alone(backend, checkpoint):
    theirs, path = checkpoint
    diff = packed_documents_diff(theirs, path, backend, TINY["vocab_size"])
    print(f"\n[parity] qwen3_moe {backend} packed vs alone: max |dlogit| = {diff:.2e}")
    assert diff <= 1e-4


def test_qwen3_moe_gradients_equal_transformers_router_and_aux_loss_included(checkpoint):
    """One backward of transformers' loss (mean cross-entropy + coef x aux loss) and of ours (the trainer's
    sum: token loss / labels + the model's auxiliary loss): every gradient, the routers' included."""
    from nemo_lite.components.models.hf import to_hf_key  # noqa: F401  (the names below are transformers')

    theirs, path = checkpoint
    ours = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend="eager"))
    ids = random_ids(2, SEQ, TINY["vocab_size"], seed=5)
    theirs.zero_grad(set_to_none=True)
    theirs(ids[:, :-1], labels=ids[:, :-1]).loss.backward()  # transformers shifts the labels inside
    hidden = ours.forward_hidden(ids[:, :-1])
    logits = torch.nn.functional.linear(hidden, ours.output_weight)[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:-1].reshape(-1))
    aux = ours.auxiliary()
    assert aux.loss is not None and set(aux.metrics) == {"aux_loss", "expert_load_imbalance"}
    (ce + aux.loss).backward()
    theirs_grads = {name: p.grad for name, p in theirs.named_parameters()}
    ours_grads = {name: p.grad for name, p in ours.named_parameters()}
    stacked = {
        "mlp.experts.gate_up_proj": "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj": "mlp.experts.down_proj",
        "mlp.router.weight": "mlp.gate.weight",
        "attention.": "self_attn.",
        "attention_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
    }
    checked = 0
    for name, grad in ours_grads.items():
        hf_name = name if name == "lm_head.weight" else f"model.{name}"
        for a, b in stacked.items():
            hf_name = hf_name.replace(a, b)
        want = theirs_grads[hf_name]
        rel = ((grad - want).norm() / want.norm().clamp(min=1e-12)).item()
        assert rel <= 1e-4, (name, rel)
        checked += 1
    assert checked == len(theirs_grads)
    assert ours.layers[0].mlp.router.weight.grad.abs().max() > 0


def test_qwen3_moe_export_round_trips_bitwise(checkpoint, tmp_path):
    theirs, path = checkpoint
    ours = AutoModelForCausalLM.from_pretrained(path)
    out = ours.save_pretrained(tmp_path / "export", max_shard_size="30KB")
    original = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert exported.keys() == original.keys() and "model.layers.0.mlp.experts.6.up_proj.weight" in exported
    assert all(torch.equal(exported[k], original[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert type(reloaded) is type(theirs)
    assert json.loads((out / "config.json").read_text())["num_experts"] == 7
    for key in ("num_experts", "num_experts_per_tok", "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef"):
        assert getattr(reloaded.config, key) == getattr(theirs.config, key), key
    ids = random_ids(1, SEQ, TINY["vocab_size"])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, theirs(ids).logits)


def test_decoder_sparse_step_and_mlp_only_layers_pick_the_moe_layers():
    config = Qwen3MoeConfig(**{**TINY, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert config.moe_layers() == [1]
    theirs = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**TINY, "decoder_sparse_step": 2}))
    ours = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY, "decoder_sparse_step": 2}))
    assert [type(b.mlp).__name__ == "SparseMoE" for b in ours.layers] == [
        type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in theirs.model.layers
    ]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


# ---- counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"decoder_sparse_step": 2}, {"tie_word_embeddings": True}])
def test_num_parameters_and_active_flops_count_what_is_built(extra):
    family = get_model_family("qwen3_moe")
    config = Qwen3MoeConfig(**{**TINY, **extra})
    model = Qwen3MoeForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert family.num_parameters(config) == total
    idle = (config.num_experts - config.num_experts_per_tok) * 3 * config.hidden_size * config.moe_intermediate_size
    active = total - len(config.moe_layers()) * idle
    assert num_parameters(config, active=True) == active
    embed = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    assert family.flops_per_token(model) == 6 * (active - embed)


def test_qwen3_30b_a3b_has_its_published_sizes():
    """30.5B parameters, 3.3B active, 29.9B without embeddings (the model card's figures), and the count
    transformers' own class gives."""
    config = get_preset("qwen3-30b-a3b")
    assert round(num_parameters(config) / 1e9, 1) == 30.5
    assert 3.3e9 <= num_parameters(config, active=True) < 3.4e9  # the card's 3.3B, truncated
    embeddings = 2 * config.vocab_size * config.hidden_size
    assert round((num_parameters(config) - embeddings) / 1e9, 1) == 29.9  # the card's non-embedding count
    hf_config = transformers.Qwen3MoeConfig(**json.loads(json.dumps(_config_json(config))))
    with torch.device("meta"):
        theirs = transformers.Qwen3MoeForCausalLM(hf_config)
    assert sum(p.numel() for p in theirs.parameters()) == num_parameters(config)


def _config_json(config):
    from nemo_lite.components.models.hf import config_to_hf

    return {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type")}


# ---- training -----------------------------------------------------------------------------------------


def _tiny_checkpoint(path, **overrides):
    eos = save_default_tokenizer(path)
    theirs = hf_qwen3_moe(seed=4, **{"vocab_size": 8192, "bos_token_id": eos, "eos_token_id": eos, **overrides})
    theirs.save_pretrained(path)
    return theirs


def _finetune_config(tmp_path, ckpt, backend="sdpa", steps=3):
    from nemo_lite.training.config import RecipeConfig

    cfg = RecipeConfig(recipe="finetune")
    cfg.run_dir = str(tmp_path / "run")
    cfg.model.pretrained_path = str(ckpt)
    cfg.attention.backend = backend
    cfg.data.tokenizer = "model"
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.validation_fraction = 32, 2, 0.0
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 1
    t = cfg.trainer
    t.max_steps, t.val_every, t.save_every, t.sample_tokens, t.progress_bar = steps, 0, 0, 0, False
    return cfg


def test_finetune_trains_the_experts_logs_the_router_and_exports(tmp_path):
    from nemo_lite.training.trainer import Trainer

    ckpt = tmp_path / "ckpt"
    theirs = _tiny_checkpoint(ckpt)
    cfg = _finetune_config(tmp_path, ckpt, backend="flex")
    cfg.trainer.activation_checkpointing = True
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.status == "completed" and len(result.losses) == 3
    assert trainer.family.name == "qwen3_moe"
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "aux_loss" in line]
    assert len(steps) == 3 and all(line["expert_load_imbalance"] >= 1.0 for line in steps)
    assert all(0 < line["aux_loss"] < TINY["num_experts"] for line in steps)
    exported = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir, experts_implementation="eager").eval()
    ids = random_ids(1, SEQ, 8192)
    with torch.no_grad():
        changed = exported.model.layers[0].mlp.experts.gate_up_proj - theirs.model.layers[0].mlp.experts.gate_up_proj
        assert changed.abs().max() > 0  # the experts were trained
        ours = AutoModelForCausalLM.from_pretrained(result.hf_dir, attention=AttentionConfig(backend="eager"))
        assert (ours(ids) - exported(ids).logits).abs().max().item() <= 1e-4


def test_the_step_adds_the_aux_loss_only_when_the_config_asks(tmp_path):
    """output_router_logits=false (as the released checkpoints): nothing is added to the token loss, the metrics
    are still logged; true: router_aux_loss_coef x aux_loss, a micro-batch's share of it."""
    from nemo_lite.training.trainer import Trainer

    for switch in (False, True):
        ckpt = tmp_path / f"ckpt{switch}"
        _tiny_checkpoint(ckpt, output_router_logits=switch, router_aux_loss_coef=0.5)
        trainer = Trainer(_finetune_config(tmp_path / str(switch), ckpt, steps=1))
        trainer.setup()
        ids = random_ids(2, 33, 8192)
        metrics = trainer.train_step([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}])
        assert metrics["aux_loss"] > 0 and metrics["expert_load_imbalance"] >= 1.0
        trainer.raw_model.forward_hidden(ids[:, :-1])
        extras = {}
        added = trainer._auxiliary_loss(extras, 2)
        aux = trainer.raw_model.load_balancing_loss()
        assert set(extras) == {"aux_loss", "expert_load_imbalance"}
        torch.testing.assert_close(extras["aux_loss"], aux.detach() / 2)
        if switch:
            torch.testing.assert_close(added, 0.5 * aux / 2)
            assert added.requires_grad
        else:
            assert added == 0.0


def test_the_finetune_recipe_runs_lora_on_a_cached_qwen3_moe_offline(tmp_path):
    """python recipes/finetune.py model.pretrained_path=org/name peft=lora, offline from a hub cache: adapters on
    the attention and the dense MLP (the stacked experts, not named in peft.target_parameters, and the routers stay
    frozen), merged on export."""
    from test_hub import _finetune, cache_repo

    files = tmp_path / "files"
    theirs = _tiny_checkpoint(files)
    cache_repo(tmp_path / "hub", "tiny-org/tiny-qwen3-moe", files)
    done = _finetune(
        "model.pretrained_path=tiny-org/tiny-qwen3-moe",
        "peft=lora",
        "peft.target_modules=[all-linear]",
        cache=tmp_path / "hub",
        run_dir=tmp_path / "run",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "q_proj" in done.stdout + done.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", experts_implementation="eager")
    assert type(merged).__name__ == "Qwen3MoeForCausalLM"
    before, after = theirs.state_dict(), merged.state_dict()
    assert torch.equal(
        before["model.layers.0.mlp.experts.gate_up_proj"], after["model.layers.0.mlp.experts.gate_up_proj"]
    )
    assert torch.equal(before["model.layers.0.mlp.gate.weight"], after["model.layers.0.mlp.gate.weight"])
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not torch.equal(before["model.layers.2.mlp.up_proj.weight"], after["model.layers.2.mlp.up_proj.weight"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_naming_a_stacked_expert_weight_as_a_module_points_to_target_parameters(tmp_path):
    from nemo_lite.errors import ConfigError
    from nemo_lite.training.trainer import Trainer

    ckpt = tmp_path / "ckpt"
    _tiny_checkpoint(ckpt)
    cfg = _finetune_config(tmp_path, ckpt, steps=1)
    cfg.peft.method, cfg.peft.target_modules = "lora", ["q_proj", "gate_up_proj"]
    with pytest.raises(ConfigError, match=r"\['gate_up_proj'\] are stacked weights, not linears: name them in peft"):
        Trainer(cfg).setup()


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch._grouped_mm has no CPU kernel in this torch")
def test_the_grouped_layer_compiles_whole_and_never_recompiles_as_the_routing_changes():
    """fullgraph=True: no host sync and no data-dependent shape in the grouped path; one graph for steps whose
    expert loads all differ. (bf16: what torch._grouped_mm takes under torch.compile.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    from nemo_lite.components.models.moe import SparseMoE

    config = Qwen3MoeConfig(**{**TINY, "hidden_size": 32, "moe_intermediate_size": 16, "num_experts": 8})
    layer = SparseMoE(config).bfloat16()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    layer.experts.impl = "grouped"
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    loads = []
    for _ in range(4):
        x = torch.randn(2, 24, 32, generator=gen).bfloat16().requires_grad_(True)
        y, stats = compiled(x)
        y.float().sum().backward()
        loads.append(tuple(stats[1].tolist()))
        layer.experts.impl = "loop"
        torch.testing.assert_close(y, layer(x)[0])
        layer.experts.impl = "grouped"
    assert len(set(loads)) == 4 and counter.frame_count == 1
    # float32 weights under bf16 autocast (a training run's setting): the operands are cast, still one graph
    layer.float()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _stats = compiled(torch.randn(2, 24, 32, generator=gen))
        y.sum().backward()
    assert counter.frame_count == 1 and layer.experts.gate_up_proj.grad.dtype == torch.float32


def test_qwen3_235b_a22b_has_its_published_sizes():
    """235B parameters, 22B active, 234B without embeddings (the model card's figures)."""
    config = get_preset("qwen3-235b-a22b")
    embeddings = 2 * config.vocab_size * config.hidden_size
    assert round(num_parameters(config) / 1e9) == 235 and round(num_parameters(config, active=True) / 1e9) == 22
    assert round((num_parameters(config) - embeddings) / 1e9) == 234


@pytest.mark.gpu
def test_gpu_grouped_experts_equal_the_loop_and_train_compiled_without_recompiles(tmp_path):
    """On the GPU, ``auto`` takes the grouped GEMM under bf16 autocast (widths 48 and 24: 16-byte aligned rows): the
    loop's logits within bf16 rounding, and a compiled model keeps its graphs while the routing changes."""
    import torch._dynamo

    from nemo_lite.components.models.moe import grouped_mm_runs

    path = tmp_path / "aligned"
    hf_qwen3_moe(seed=1, hidden_size=48, moe_intermediate_size=24).save_pretrained(path)
    ours = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend="flex"), device="cuda")
    experts = ours.layers[0].mlp.experts
    ids = random_ids(2, 128, TINY["vocab_size"]).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert grouped_mm_runs(ids.float(), experts.gate_up_proj)
        with torch.no_grad():
            grouped = ours(ids).float()
            experts_implementation(ours, "loop")
            loop = ours(ids).float()
            experts_implementation(ours, "auto")
    assert (grouped - loop).abs().max().item() <= 0.05 * loop.abs().max().item()
    for layer in ours.layers:
        layer.compile(dynamic=False)
    graphs = []
    for step in range(4):
        ids = random_ids(2, 128, TINY["vocab_size"], seed=step).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours.forward_hidden(ids).float().sum().backward()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1]
