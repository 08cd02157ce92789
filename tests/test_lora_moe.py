"""LoRA through PEFT on a mixture's stacked expert weights (peft.target_parameters): only the adapters train,
checkpoints hold them and resume exactly, the exported adapter/ loads with PEFT onto transformers' own model
with our logits (PEFT's own key names), and the merged hf/ equals PEFT's merge_and_unload. Tiny Qwen3-MoE,
gpt-oss (experts stored input-major) and Mixtral, float32 on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from model_utils import random_ids, randomize_  # noqa: E402
from test_gpt_oss import hf_gpt_oss  # noqa: E402
from test_mixtral import TINY as MIXTRAL  # noqa: E402
from test_moe import _finetune_config, _tiny_checkpoint  # noqa: E402

from nemo_lite.components.attention import AttentionConfig  # noqa: E402
from nemo_lite.components.models import AutoModelForCausalLM, get_model_family  # noqa: E402
from nemo_lite.errors import ConfigError  # noqa: E402
from nemo_lite.testing.lora import read_adapter_dir  # noqa: E402
from nemo_lite.training.converters.lora import (  # noqa: E402
    LoraConverter,
    PeftSection,
    adapter_tensors,
    hf_parameter_target,
    merged_model,
    save_adapter,
)
from nemo_lite.training.trainer import Trainer  # noqa: E402

EXPERT_WEIGHTS = ["gate_up_proj", "down_proj"]
HF_TARGETS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def lora_moe_config(run_dir, ckpt, steps=4):
    cfg = _finetune_config(run_dir, ckpt, steps=steps)
    cfg.peft.method, cfg.peft.r, cfg.peft.alpha = "lora", 2, 8.0
    cfg.peft.target_modules, cfg.peft.target_parameters = ["q_proj"], list(EXPERT_WEIGHTS)
    cfg.optim.lr = 2e-2  # a few steps must move the adapters well clear of float32 noise
    cfg.trainer.save_every = 2
    return cfg


def hf_eager(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe")
    _tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    trainer = Trainer(lora_moe_config(tmp_path_factory.mktemp("run"), base))
    trainer.setup()
    initial = {name: p.detach().clone() for name, p in trainer.raw_model.named_parameters()}
    result = trainer.fit()
    assert result.status == "completed" and len(result.losses) == 4
    return trainer, result, initial


def test_only_the_adapters_train_those_on_the_experts_included(trained):
    trainer, _, initial = trained
    params = dict(trainer.raw_model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    on_experts = {n for n in trainable if ".mlp.experts." in n}
    moe_layers = trainer.raw_model.config.moe_layers()
    assert len(on_experts) == 2 * 2 * len(moe_layers)  # A and B for gate_up_proj and down_proj of each MoE layer
    # PEFT's per-expert pairs: A [r * E, in], B [out, r * E].
    a = params["layers.0.mlp.experts.lora_A.default.weight"]
    assert a.shape == (2 * 7, 22)  # down_proj: in = moe_intermediate_size
    assert all(not torch.equal(params[n], initial[n]) for n in on_experts if ".lora_B." in n)
    frozen = [n for n in params if n not in trainable]
    assert all(torch.equal(params[n], initial[n]) for n in frozen)
    (lora,) = [c for c in trainer.converters if isinstance(c, LoraConverter)]
    assert "q_proj (4 linears) and experts' down_proj, gate_up_proj (6 stacked weights)" in lora.description


def test_a_checkpoint_holds_only_the_adapters_and_resumes_exactly(trained, base, tmp_path):
    from safetensors import safe_open

    trainer, result, _ = trained
    ckpt = trainer.run_dir / "checkpoints" / "step_000002"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert saved == {name for name, p in trainer.raw_model.named_parameters() if p.requires_grad}
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["peft"]["parameters"] == sorted(EXPERT_WEIGHTS)
    cfg = lora_moe_config(tmp_path / "resumed", base)
    cfg.trainer.resume = str(ckpt)
    assert Trainer(cfg).fit().losses == result.losses[2:]  # bit-equal
    cfg = lora_moe_config(tmp_path / "other", base)
    cfg.peft.target_parameters = ["down_proj"]
    cfg.trainer.resume = str(ckpt)
    with pytest.raises(ConfigError, match=r"peft parameters=\['down_proj', 'gate_up_proj'\] .* asks for \['down_pr"):
        Trainer(cfg).fit()


def test_the_adapter_loads_with_peft_onto_transformers_with_our_logits(trained, base, tmp_path):
    trainer, _, _ = trained
    adapter = trainer.run_dir / "adapter"
    reference = peft.get_peft_model(
        hf_eager(base),
        peft.LoraConfig(
            r=2, lora_alpha=8.0, target_modules=["q_proj"], target_parameters=HF_TARGETS, task_type="CAUSAL_LM"
        ),
    )
    reference.save_pretrained(tmp_path / "reference")
    ours, theirs = (json.loads((d / "adapter_config.json").read_text()) for d in (adapter, tmp_path / "reference"))
    for config in (ours, theirs):
        config["target_parameters"] = sorted(config["target_parameters"])
        config.pop("base_model_name_or_path")
    assert ours == theirs
    names = read_adapter_dir(adapter)[1]
    assert names == read_adapter_dir(tmp_path / "reference")[1]
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in names

    loaded = peft.PeftModel.from_pretrained(hf_eager(base), adapter).eval()
    ids = random_ids(2, 23, 8192, seed=3)
    ids[ids == trainer.eos_id] = 5
    model = trainer.raw_model.eval()
    with torch.no_grad():
        diff = (model(ids) - loaded(input_ids=ids).logits).abs().max().item()
        moved = (model(ids) - hf_eager(base)(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert moved > 1e-3  # the adapters changed the model: the comparison can fail


def test_the_merged_export_equals_peft_merge_and_unload(trained, base):
    trainer, result, _ = trained
    merged = hf_eager(result.hf_dir).state_dict()
    reference = peft.PeftModel.from_pretrained(hf_eager(base), trainer.run_dir / "adapter").merge_and_unload()
    expected = reference.state_dict()
    assert set(merged) == set(expected)
    worst = max((merged[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-5
    before = hf_eager(base).state_dict()
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert (merged[key] - before[key]).abs().max() > 1e-4  # the experts' adapters were merged in


def test_the_exported_expert_adapter_loads_for_generation_and_to_train_on(trained, base, tmp_path):
    """recipes/generate.py adapter=... merges the expert adapters as hf/ holds them, and peft.adapter_path starts
    a run from them with the trained model's logits."""
    from nemo_lite.inference import load_for_inference

    trainer, result, _ = trained
    ids = random_ids(2, 16, trainer.raw_model.config.vocab_size, seed=2)
    merged, _ = load_for_inference(base, adapter=trainer.run_dir / "adapter")
    cfg = lora_moe_config(tmp_path / "more", base, steps=1)
    cfg.peft.adapter_path = str(trainer.run_dir / "adapter")
    again = Trainer(cfg)
    again.setup()
    assert again.converters[0].settings.target_parameters == sorted(EXPERT_WEIGHTS)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(result.hf_dir, attention=AttentionConfig(backend="sdpa"))(ids)
        assert (merged(ids) - want).abs().max().item() <= 1e-5
        assert (again.raw_model.eval()(ids) - trainer.raw_model.eval()(ids)).abs().max().item() <= 1e-5
    again.release_run_dir()


def _convert_and_compare(path, theirs_cls, *, layers_with_experts):
    """Our model with random adapters on the experts (no training), exported as PEFT's adapter; PEFT loads it onto
    transformers' model: logits equal; our merge equals PEFT's merge_and_unload."""
    family = get_model_family(json.loads((path / "config.json").read_text())["model_type"])
    ours = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend="eager"))
    section = PeftSection(method="lora", r=3, alpha=6.0, target_modules=[], target_parameters=list(EXPERT_WEIGHTS))
    converter = LoraConverter(section, base_dir=path, base_path=str(path))
    converter.convert(ours, family)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    adapters = adapter_tensors(ours)
    assert len(adapters) == 2 * 2 * layers_with_experts
    adapter_dir = save_adapter(
        adapters,
        path / "adapter",
        section=section,
        target_names=[],
        base_model_name_or_path=str(path),
        target_parameters=[hf_parameter_target(p) for p in converter.parameter_paths],
    )
    hf = theirs_cls.from_pretrained(path, experts_implementation="eager").eval()
    loaded = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    ids = random_ids(2, 13, 97, seed=2)
    ids[ids == 0] = 5
    with torch.no_grad():
        ours.eval()
        logits = ours(ids)
        assert (logits - loaded(input_ids=ids).logits).abs().max().item() <= 1e-4
        base_logits = theirs_cls.from_pretrained(path, experts_implementation="eager").eval()(input_ids=ids).logits
        assert (logits - base_logits).abs().max().item() > 1e-3
        merged = merged_model(family, path, adapters, section=section, target_names=[])
        assert (merged(ids) - logits).abs().max().item() <= 1e-4
    expected = loaded.merge_and_unload().state_dict()
    from nemo_lite.components.models.hf import to_hf_key

    for name, tensor in merged.state_dict().items():
        if name.endswith(("gate_up_proj", "down_proj")) and tensor.dim() == 3:
            assert (tensor - expected[to_hf_key(name)]).abs().max().item() <= 1e-5


def test_gpt_oss_input_major_experts_round_trip_through_peft(tmp_path):
    theirs = hf_gpt_oss(seed=2)
    theirs.save_pretrained(tmp_path)
    _convert_and_compare(tmp_path, transformers.GptOssForCausalLM, layers_with_experts=3)


def test_mixtral_experts_round_trip_through_peft(tmp_path):
    theirs = randomize_(transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL)), 2)
    theirs.save_pretrained(tmp_path)
    _convert_and_compare(tmp_path, transformers.MixtralForCausalLM, layers_with_experts=MIXTRAL["num_hidden_layers"])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"target_modules": ["q_proj", "gate_up_proj"]},
            r"peft.target_modules \['gate_up_proj'\] are stacked weights, not linears: name them in "
            r"peft.target_parameters=\['gate_up_proj'\]",
        ),
        ({"target_parameters": ["w1"]}, r"peft.target_parameters \['w1'\] match\(es\) no stacked weight .*: down_pr"),
        ({"dropout": 0.1}, r"peft.dropout=0.1 with peft.target_parameters: .* set peft.dropout=0.0"),
    ],
)
def test_wrong_expert_targets_are_refused_in_one_line(base, tmp_path, change, match):
    cfg = lora_moe_config(tmp_path, base, steps=1)
    for key, value in change.items():
        setattr(cfg.peft, key, value)
    with pytest.raises(ConfigError, match=match):
        Trainer(cfg).setup()


def test_target_parameters_on_a_dense_model_say_it_has_no_experts(tmp_path):
    from test_lora import lora_config, write_base

    cfg = lora_config(tmp_path / "run", write_base(tmp_path / "base"), steps=1)
    cfg.peft.target_parameters = ["gate_up_proj"]
    with pytest.raises(ConfigError, match=r"no stacked weight of this model; .* none \(it has no mixture of experts\)"):
        Trainer(cfg).setup()


def test_the_finetune_recipe_adapts_the_experts_of_a_cached_qwen3_moe_offline(tmp_path):
    """python recipes/finetune.py model.pretrained_path=org/name peft=lora 'peft.target_parameters=[...]', offline
    from a hub cache: the merged export's experts moved, its routers did not."""
    from test_hub import _finetune, cache_repo

    files = tmp_path / "files"
    theirs = _tiny_checkpoint(files)
    cache_repo(tmp_path / "hub", "tiny-org/tiny-qwen3-moe", files)
    done = _finetune(
        "model.pretrained_path=tiny-org/tiny-qwen3-moe",
        "peft=lora",
        "peft.target_modules=[]",
        "peft.target_parameters=[gate_up_proj,down_proj]",
        "optim.lr=1e-2",
        cache=tmp_path / "hub",
        run_dir=tmp_path / "run",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "experts' down_proj, gate_up_proj (6 stacked weights)" in done.stdout + done.stderr
    before, after = theirs.state_dict(), hf_eager(tmp_path / "run" / "hf").state_dict()
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.3.mlp.experts.down_proj"):
        assert not torch.equal(before[key], after[key])
    for key in ("model.layers.0.mlp.gate.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(before[key], after[key])
    assert read_adapter_dir(tmp_path / "run" / "adapter")[0]["target_parameters"] == sorted(HF_TARGETS)


def test_fsdp2_on_two_ranks_trains_the_expert_adapters_as_one_process(tmp_path):
    """torchrun, 2 ranks x 2 rows against 1 process x 4 rows (gloo, CPU): the same losses (the router loss off,
    so the objective is linear in the batch), and the adapter export PEFT's."""
    from test_lora_distributed import launch, losses

    base = tmp_path / "base"
    _tiny_checkpoint(base, output_router_logits=False)
    args = ["peft.target_modules=[q_proj]", "peft.target_parameters=[gate_up_proj,down_proj]", "optim.lr=1e-2"]
    args += ["trainer.sample_tokens=0"]
    for nproc, batch in ((1, 4), (2, 2)):
        done = launch(nproc, base, f"data.batch_size={batch}", f"run_dir={tmp_path / str(nproc)}", *args)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(tmp_path / "1"), losses(tmp_path / "2")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    from safetensors.torch import load_file

    single, double = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("1", "2"))
    assert set(single) == set(double)
    assert max((single[k] - double[k]).abs().max().item() for k in single) <= 1e-4  # gathered from the shards
    assert single["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].abs().max() > 0  # they trained


def test_compiled_blocks_do_not_recompile_as_peft_parametrizes_the_experts(base, tmp_path, monkeypatch):
    """trainer.compile=true: PEFT parametrizes the experts anew in every forward (a new class each time), so the
    wrapped experts run eager and the rest of each block keeps its graphs: nothing is compiled after the first
    step. The losses are the uncompiled run's."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: real_compile(self, backend=counting_backend))
    torch._dynamo.reset()
    steps = {}
    for compiled in (False, True):
        cfg = lora_moe_config(tmp_path / str(compiled), base, steps=3)
        cfg.trainer.compile = compiled
        trainer = Trainer(cfg)
        trainer.setup()
        losses = []
        for seed in range(3):
            ids = random_ids(2, 33, 8192, seed=seed)
            losses.append(trainer.train_step([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}])["loss"])
            if seed == 0:
                after_first = len(graphs)
        steps[compiled] = losses
    assert after_first > 0 and len(graphs) == after_first
    assert max(abs(a - b) for a, b in zip(steps[False], steps[True], strict=True)) <= 1e-5
