"""GPU: QLoRA (peft.quantize_base=nf4) as it runs there: the base quantized from bf16 on the GPU, bf16 autocast,
compiled blocks with activation checkpointing, the fast step. The adapters learn, the merged export is the bf16
base's NF4 round trip plus PEFT's merge of the exported adapter, and a resume continues the curve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("torchao")

from test_qlora import HF_LINEARS, hf_linear_weights, qlora_config, write_base  # noqa: E402

from nemo_lite.testing.data import SyntheticPackedLoader  # noqa: E402
from nemo_lite.training.converters import nf4  # noqa: E402
from nemo_lite.training.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.gpu


def gpu_config(run_dir: Path, base: Path, steps: int = 12):
    cfg = qlora_config(run_dir, base, steps=steps)
    cfg.attention.backend = "flex"
    cfg.data.seq_len = 128
    cfg.optim.lr = 1e-2
    t = cfg.trainer
    t.device, t.compile, t.activation_checkpointing, t.step_impl, t.save_every = "cuda", True, True, "auto", 6
    return cfg


def loader() -> SyntheticPackedLoader:
    return SyntheticPackedLoader(4, 128, vocab_size=64, eos_id=2, mean_doc=48, learnable=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = write_base(tmp_path_factory.mktemp("base"))
    trainer = Trainer(gpu_config(tmp_path_factory.mktemp("run"), base), train_loader=loader())
    return base, trainer, trainer.fit()


def test_the_adapters_learn_on_the_bf16_quantized_base(trained):
    _, trainer, result = trained
    weights = [p for p in trainer.raw_model.parameters() if nf4.is_nf4(p)]
    assert len(weights) == 10 and all(w.device.type == "cuda" and w.dtype == torch.bfloat16 for w in weights)
    assert "fast step" in trainer.step_impl.description
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.25


def test_the_merged_export_is_the_bf16_nf4_base_plus_peft_merge(trained):
    import peft
    import transformers
    from torchao.quantization import to_nf4

    base, trainer, result = trained
    reference = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for weight in hf_linear_weights(reference).values():
            low = weight.detach().cuda().bfloat16()
            if weight.numel() % (64 * 256) == 0:
                low = to_nf4(low, 64, 256).get_original_weight()
            weight.copy_(low.float().cpu())
    reference = peft.PeftModel.from_pretrained(reference, trainer.run_dir / "adapter").merge_and_unload()
    merged = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir, dtype=torch.float32)
    ours, theirs = merged.state_dict(), reference.state_dict()
    for name, tensor in theirs.items():
        if name.split(".")[-2] in HF_LINEARS:
            assert (ours[name] - tensor).abs().max().item() <= 1e-5 * tensor.abs().max().item(), name


def test_a_resumed_run_continues_the_curve(trained, tmp_path):
    base, trainer, result = trained
    cfg = gpu_config(tmp_path, base)
    cfg.trainer.resume, cfg.trainer.export_hf = str(trainer.run_dir / "checkpoints" / "step_000006"), False
    resumed = Trainer(cfg, train_loader=loader()).fit().losses
    assert max(abs(a - b) for a, b in zip(resumed, result.losses[6:], strict=True)) <= 1e-3
