"""peft.adapter_path under torchrun on CPU (gloo): a DoRA adapter made by transformers + PEFT, continued by FSDP2
on two ranks, gives the losses of one process with the same global batch, and its export loads back in PEFT
with the merged export's logits."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

import torch  # noqa: E402
from test_lora_adapters import max_diff, peft_model, write_base, write_peft_adapter  # noqa: E402
from test_lora_distributed import launch, losses  # noqa: E402


@pytest.mark.slow
def test_fsdp2_continues_a_peft_dora_adapter_as_one_process_does(tmp_path):
    import transformers

    base = write_base(tmp_path / "base")
    adapter = write_peft_adapter(base, tmp_path / "theirs", use_dora=True)
    keys = [f"peft.adapter_path={adapter}", "data.tokenizer=model", "trainer.save_every=0"]
    single = launch(1, base, *keys, "data.batch_size=4", f"run_dir={tmp_path}/single")
    assert single.returncode == 0, single.stderr[-2000:]
    double = launch(2, base, *keys, "data.batch_size=2", f"run_dir={tmp_path}/double")
    assert double.returncode == 0, double.stderr[-2000:]
    assert "r=4, alpha=8, dropout=0, DoRA, from the adapter" in double.stderr  # PEFT's settings, not the run's
    one, two = losses(tmp_path / "single"), losses(tmp_path / "double")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5

    exported = tmp_path / "double" / "adapter"
    assert json.loads((exported / "adapter_config.json").read_text())["use_dora"] is True
    ids = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = peft_model(base, exported)(input_ids=ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "double" / "hf")(input_ids=ids).logits
        before = peft_model(base, adapter)(input_ids=ids).logits
    assert max_diff(theirs, merged) <= 1e-5
    assert max_diff(theirs, before) > 1e-4  # the two ranks trained the adapter on
