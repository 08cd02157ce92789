"""Bring your own PEFT adapter (peft.adapter_path), DoRA and rsLoRA: an adapter made by transformers + PEFT loads with
PEFT's logits, trains on, and exports an adapter/ that PeftModel and AutoPeftModelForCausalLM load by themselves and
an hf/ equal to PEFT's merge_and_unload; every base or setting that does not fit is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from model_utils import random_ids  # noqa: E402
from recipe_utils import tiny_config  # noqa: E402
from test_lora import write_base as write_llama  # noqa: E402

from nemo_lite.errors import ConfigError  # noqa: E402
from nemo_lite.training.trainer import Trainer  # noqa: E402

VOCAB = 8192


def write_base(path: Path, *, seed: int = 0, **changes) -> Path:
    """A random transformers Llama (the default tokenizer's vocabulary) saved with save_pretrained."""
    return write_llama(path, seed, **changes)


def write_peft_adapter(base: Path, path: Path, *, seed: int = 1, **settings) -> Path:
    """What a transformers + PEFT user has: PeftModel.save_pretrained of an adapter whose B (and DoRA's magnitude)
    are random, so that it changes the model."""
    import peft
    import transformers

    settings = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"], **settings}
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(task_type="CAUSAL_LM", **settings)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(path)
    return path


def adapter_config(run_dir: Path, base: Path | str, adapter: Path | str | None, *, steps: int = 3):
    cfg = tiny_config(run_dir, backend="sdpa", steps=steps)
    cfg.model.pretrained_path = str(base)
    cfg.data.tokenizer = "model"
    cfg.peft.method = "lora"
    cfg.peft.adapter_path = None if adapter is None else str(adapter)
    cfg.trainer.save_every, cfg.trainer.val_every, cfg.trainer.sample_tokens = 0, 0, 0
    return cfg


def ids_for(trainer) -> torch.Tensor:
    ids = random_ids(2, 40, VOCAB, seed=3)
    ids[ids == trainer.eos_id] = 5
    return ids


def peft_model(base: Path, adapter: Path):
    import peft
    import transformers

    return peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def their_adapter(base, tmp_path_factory) -> Path:
    return write_peft_adapter(base, tmp_path_factory.mktemp("adapter"))


# ---- an adapter from transformers + PEFT, trained on ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_on(base, their_adapter, tmp_path_factory):
    """The adapter loaded (logits taken before any step), trained 3 steps, exported. The base is named with "~"
    (HOME is a temporary directory), as a user writes it."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(base, home / "base")
    with pytest.MonkeyPatch.context() as patch:
        from nemo_lite.components.datasets.default_corpus import cache_dir

        patch.setenv("NEMO_LITE_CACHE", str(cache_dir()))  # the built corpus, wherever HOME is
        patch.setenv("HOME", str(home))
        trainer = Trainer(adapter_config(tmp_path_factory.mktemp("run"), "~/base", their_adapter))
        trainer.setup()
        ids = ids_for(trainer)
        with torch.no_grad():
            loaded = trainer.raw_model.eval()(ids)
        trainer.raw_model.train()
        result = trainer.fit()
    return trainer, result, ids, loaded, home / "base"


def test_an_adapter_from_peft_loads_with_peft_logits(trained_on, base, their_adapter):
    import transformers

    trainer, _, ids, loaded, _ = trained_on
    (converter,) = trainer.converters
    assert (converter.settings.r, converter.settings.alpha) == (4, 8.0)  # the adapter's, not peft=lora's 16 and 32
    assert converter.target_names == ["down_proj", "q_proj", "v_proj"]
    assert "from the adapter" in converter.description
    with torch.no_grad():
        theirs = peft_model(base, their_adapter)(input_ids=ids).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    assert max_diff(loaded, theirs) <= 1e-5
    with torch.no_grad():
        assert max_diff(theirs, plain(input_ids=ids).logits) > 1e-2  # the adapter matters: the check can fail


def test_the_trained_adapter_loads_by_itself_and_equals_the_merged_export(trained_on, their_adapter):
    import peft
    import transformers

    trainer, result, ids, loaded, home_base = trained_on
    adapter = trainer.run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(home_base.resolve())  # "~" expanded: found from anywhere
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        4,
        8.0,
        ["down_proj", "q_proj", "v_proj"],
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir).eval()
    by_itself = peft.AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    on_base = peft_model(home_base, adapter)
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        assert max_diff(by_itself(input_ids=ids).logits, want) <= 1e-5
        assert max_diff(on_base(input_ids=ids).logits, want) <= 1e-5
        assert max_diff(trainer.raw_model.eval()(ids), want) <= 1e-4
        assert max_diff(want, loaded) > 1e-4  # it trained on from the adapter


def test_a_hub_id_adapter_resolves_from_the_cache_without_a_download(base, their_adapter, tmp_path, monkeypatch):
    import huggingface_hub

    from nemo_lite.testing.hub import cache_repo

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    snapshot = cache_repo(cache, "someone/tiny-adapter", their_adapter)
    cfg = adapter_config(tmp_path / "run", base, "someone/tiny-adapter@main", steps=1)
    trainer = Trainer(cfg)
    trainer.setup()
    assert trainer.converters[0].adapter.path == snapshot
    with torch.no_grad():
        diff = max_diff(
            trainer.raw_model.eval()(ids_for(trainer)),
            peft_model(base, their_adapter)(input_ids=ids_for(trainer)).logits,
        )
    assert diff <= 1e-5
    trainer.release_run_dir()
    cfg = adapter_config(tmp_path / "run2", base, "someone/not-cached", steps=1)
    with pytest.raises(ConfigError, match="someone/not-cached is not in the Hugging Face cache") as info:
        Trainer(cfg).fit()
    assert "\n" not in str(info.value)


# ---- DoRA and rsLoRA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["use_dora", "use_rslora", "both"])
def test_dora_and_rslora_exports_equal_peft_merge(base, tmp_path, variant):
    """Trained here with peft.use_dora / peft.use_rslora, the hf/ export equals PEFT's merge_and_unload of the
    exported adapter, and PeftModel with that adapter gives the trained model's logits."""
    cfg = adapter_config(tmp_path / "run", base, None, steps=2)
    cfg.peft.r, cfg.peft.alpha = 4, 8.0
    cfg.peft.use_dora = variant in ("use_dora", "both")
    cfg.peft.use_rslora = variant in ("use_rslora", "both")
    cfg.optim.lr = 1e-2  # the adapters (and DoRA's magnitudes) move visibly in two steps
    trainer = Trainer(cfg)
    result = trainer.fit()
    names = [name for name, p in trainer.raw_model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in name for name in names) == cfg.peft.use_dora
    import transformers

    adapter = trainer.run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["use_dora"], config["use_rslora"]) == (cfg.peft.use_dora, cfg.peft.use_rslora)
    theirs = peft_model(base, adapter)
    merged_by_peft = theirs.merge_and_unload().state_dict()
    ours = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir).state_dict()
    assert sorted(ours) == sorted(merged_by_peft)
    assert max(max_diff(ours[k], merged_by_peft[k]) for k in ours) <= 1e-5
    plain = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert max(max_diff(ours[k], plain[k]) for k in ours) > 1e-3  # the merge changed the weights
    ids = ids_for(trainer)
    with torch.no_grad():
        assert max_diff(peft_model(base, adapter)(input_ids=ids).logits, trainer.raw_model.eval()(ids)) <= 1e-4


def test_a_dora_adapter_from_peft_loads_with_peft_logits(base, tmp_path):
    adapter = write_peft_adapter(base, tmp_path / "dora", use_dora=True, use_rslora=True, lora_alpha=6.0)
    trainer = Trainer(adapter_config(tmp_path / "run", base, adapter, steps=1))
    trainer.setup()
    assert trainer.converters[0].settings.use_dora and trainer.converters[0].settings.use_rslora
    ids = ids_for(trainer)
    with torch.no_grad():
        assert max_diff(trainer.raw_model.eval()(ids), peft_model(base, adapter)(input_ids=ids).logits) <= 1e-5
    trainer.release_run_dir()


def test_resuming_with_another_dora_setting_is_refused(base, tmp_path):
    cfg = adapter_config(tmp_path / "run", base, None, steps=2)
    cfg.peft.use_dora, cfg.trainer.save_every, cfg.trainer.export_hf = True, 2, False
    Trainer(cfg).fit()
    cfg = adapter_config(tmp_path / "other", base, None, steps=2)
    cfg.trainer.resume = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="peft use_dora=True and this run asks for False"):
        Trainer(cfg).fit()


# ---- refusals: one line each ----------------------------------------------------------------------------------------


def _edited(adapter: Path, tmp: Path, **changes) -> Path:
    copy = tmp / "edited"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c, a, t: setattr(c.peft, "r", 8), "peft.r=8 disagrees with the adapter .*, whose r is 4"),
        (
            lambda c, a, t: setattr(c.peft, "target_modules", ["q_proj"]),
            r"peft.target_modules=\['q_proj'\] disagrees with the adapter .*, whose target_modules is",
        ),
        (lambda c, a, t: setattr(c.peft, "use_dora", True), "peft.use_dora=True disagrees with the adapter"),
        (lambda c, a, t: setattr(c.peft, "method", "none"), "trains a LoRA adapter on, but peft.method is none"),
        (lambda c, a, t: setattr(c.peft, "adapter_path", str(t / "nowhere")), "is not a PEFT adapter directory"),
        (
            lambda c, a, t: setattr(c.peft, "adapter_path", str(_edited(a, t, modules_to_save=["lm_head"]))),
            r"sets modules_to_save=\['lm_head'\], which nemo_lite's LoRA does not train",
        ),
        (
            lambda c, a, t: setattr(c.peft, "adapter_path", str(_edited(a, t, peft_type="IA3"))),
            "is a IA3 adapter; only LoRA adapters",
        ),
        (
            lambda c, a, t: setattr(c.peft, "adapter_path", str(_no_rank(a, t))),
            "adapter_config.json is not a LoRA config",
        ),
    ],
)
def test_settings_that_do_not_fit_the_adapter_are_refused_before_any_work(base, their_adapter, tmp_path, change, match):
    cfg = adapter_config(tmp_path / "run", base, their_adapter)
    change(cfg, their_adapter, tmp_path)
    with pytest.raises(ConfigError, match=match) as info:
        Trainer(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def _no_rank(adapter: Path, tmp: Path) -> Path:
    copy = _edited(adapter, tmp)
    config = json.loads((copy / "adapter_config.json").read_text())
    del config["r"]
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("other", "match"),
    [
        ({"hidden_size": 32}, r"self_attn.q_proj.lora_A.weight is \[4, 64\] in the adapter and \[4, 32\] on this base"),
        ({"num_hidden_layers": 1}, "holds 6 tensor.s. this base has no place for, such as .*layers.1"),
        ({"num_hidden_layers": 3}, "lacks 6 tensor.s. that its settings put on this base, such as .*layers.2"),
    ],
)
def test_an_adapter_of_another_base_is_refused_naming_the_difference(their_adapter, tmp_path, other, match):
    other_base = write_base(tmp_path / "other", **other)
    with pytest.raises(ConfigError, match=match) as info:
        Trainer(adapter_config(tmp_path / "run", other_base, their_adapter)).fit()
    message = str(info.value)
    assert "\n" not in message and "it was trained on another base" in message


def test_a_target_module_the_base_lacks_is_refused(base, their_adapter, tmp_path):
    adapter = _edited(their_adapter, tmp_path, target_modules=["q_proj", "v_proj", "down_proj", "qkv_proj"])
    with pytest.raises(ConfigError, match=r"adapts \['qkv_proj'\], which the base .* does not have") as info:
        Trainer(adapter_config(tmp_path / "run", base, adapter)).fit()
    assert "\n" not in str(info.value)


def test_dora_on_stacked_expert_weights_is_refused(base, tmp_path):
    cfg = adapter_config(tmp_path / "run", base, None)
    cfg.peft.use_dora, cfg.peft.target_parameters = True, ["gate_up_proj"]
    with pytest.raises(ConfigError, match="PEFT has no DoRA for stacked expert weights"):
        Trainer(cfg)


def test_a_fresh_run_from_its_own_run_dirs_adapter_is_refused(base, their_adapter, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(their_adapter, run / "adapter")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(
        ConfigError, match="is the earlier run's adapter in run_dir .*: start from it in another run_dir"
    ):
        Trainer(adapter_config(run, base, run / "adapter")).fit()
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.slow  # dynamo and AOT autograd on a CPU: about a minute
def test_dora_trains_the_same_under_compile_and_the_fast_step(base, tmp_path, monkeypatch):
    """trainer.compile=true (aot_eager: dynamo and AOT autograd without inductor's C++ build) runs DoRA's magnitude
    eager and the rest compiled; the fast step's fused AdamW updates the magnitudes too: the losses are plain's."""
    from nemo_lite.training import loss

    def run(name: str, **trainer):
        cfg = adapter_config(tmp_path / name, base, None, steps=3)
        cfg.peft.use_dora, cfg.trainer.export_hf = True, False
        for key, value in trainer.items():
            setattr(cfg.trainer, key, value)
        return Trainer(cfg).fit().losses

    plain = run("plain")
    fast = run("fast", step_impl="fast")
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: real_compile(self, backend="aot_eager"))
    monkeypatch.setattr(loss, "_compiled_head_loss", torch.compile(loss.head_cross_entropy_sum, backend="aot_eager"))
    compiled = run("compiled", compile=True)
    assert max(abs(a - b) for a, b in zip(plain, fast, strict=True)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(plain, compiled, strict=True)) <= 1e-5


def test_a_bad_switch_a_pickle_only_adapter_and_a_hub_repo_without_an_adapter_are_refused(
    base, their_adapter, tmp_path, monkeypatch
):
    import huggingface_hub

    from nemo_lite.testing.hub import cache_repo

    cfg = adapter_config(tmp_path / "a", base, None)
    cfg.peft.use_rslora = "yes"
    with pytest.raises(ConfigError, match="peft.use_rslora='yes' must be true or false"):
        Trainer(cfg)
    pickle_only = tmp_path / "pickle-only"
    shutil.copytree(their_adapter, pickle_only)
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    with pytest.raises(ConfigError, match="has no adapter_model.safetensors .only safetensors are read"):
        Trainer(adapter_config(tmp_path / "b", base, pickle_only)).fit()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "README.md").write_text("no adapter here")
    cache_repo(tmp_path / "hub", "someone/readme-only", tmp_path / "files")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="someone/readme-only has no adapter_config.json: it is not a PEFT adapter"):
        Trainer(adapter_config(tmp_path / "c", base, "someone/readme-only")).fit()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work


def test_the_exported_adapter_names_a_hub_base_by_its_id_and_revision(tmp_path, monkeypatch):
    from nemo_lite.training.converters.peft_adapter import base_reference

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models")
    assert base_reference("~/link/base") == (str((tmp_path / "models" / "base").resolve()), None)
    assert base_reference("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    assert base_reference("HuggingFaceTB/SmolLM2-135M@v1.0") == ("HuggingFaceTB/SmolLM2-135M", "v1.0")


def test_generate_loads_dora_and_rslora_adapters_with_peft_logits(base, tmp_path):
    """load_for_inference (recipes/generate.py adapter=...) merges the adapter through the same reader."""
    from nemo_lite.inference import load_for_inference

    adapter = write_peft_adapter(base, tmp_path / "dora", use_dora=True, use_rslora=True)
    model, _ = load_for_inference(base, adapter=adapter)
    ids = random_ids(2, 24, VOCAB, seed=6)
    with torch.no_grad():
        assert max_diff(model(ids), peft_model(base, adapter)(input_ids=ids).logits) <= 1e-5
    with pytest.raises(ConfigError, match=r"adapter=.* sets modules_to_save=\['lm_head'\]"):
        load_for_inference(base, adapter=_edited(adapter, tmp_path, modules_to_save=["lm_head"]))


@pytest.mark.gpu
def test_dora_on_a_gpu_follows_the_plain_step_with_the_fast_step_and_compile(tmp_path):
    """On a GPU, bf16 autocast: DoRA with trainer.step_impl=fast (bf16 weight copies of A and B, Triton AdamW on the
    adapters and magnitudes) and trainer.compile=true follows the plain, uncompiled step's curve."""
    from nemo_lite.components.models import family_of_preset
    from nemo_lite.testing.data import SyntheticPackedLoader
    from nemo_lite.training.config import RecipeConfig

    family = family_of_preset("tiny")
    shape = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8)
    model = family.build(family.preset("tiny", num_key_value_heads=2, head_dim=64, vocab_size=8192, **shape))
    model.init_weights(seed=0)
    base = model.save_pretrained(tmp_path / "base")

    def run(step_impl: str, compile: bool):
        cfg = RecipeConfig()
        cfg.run_dir = str(tmp_path / f"{step_impl}-{compile}")
        cfg.model.pretrained_path, cfg.model.vocab_from_tokenizer = str(base), False
        cfg.attention.backend = "flex"
        cfg.data.seq_len, cfg.data.batch_size = 1024, 2
        cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 2
        cfg.peft.method, cfg.peft.use_dora = "lora", True
        t = cfg.trainer
        t.max_steps, t.compile, t.step_impl = 12, compile, step_impl
        t.val_every = t.save_every = t.sample_tokens = 0
        t.export_hf = t.progress_bar = False
        data = SyntheticPackedLoader(2, 1024, vocab_size=8192, eos_id=3, mean_doc=200, seed=1, learnable=True)
        trainer = Trainer(cfg, train_loader=data)
        return trainer, trainer.fit().losses

    _, plain = run("plain", False)
    fast_trainer, fast = run("fast", True)
    assert fast_trainer.step_impl.on["bf16 weight copies"], fast_trainer.step_impl.description
    diffs = [abs(a - b) for a, b in zip(plain, fast, strict=True)]
    print(f"DoRA plain: {[round(x, 4) for x in plain]}\nDoRA fast + compile: {[round(x, 4) for x in fast]}")
    assert diffs[0] <= 1e-2 and max(diffs) <= 0.05
    assert plain[-1] < plain[0]  # it learns
