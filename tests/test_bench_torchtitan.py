"""The torchtitan peer of scripts/bench_train.py on a CPU at toy size: its model on the benchmark's packed
documents computes nemo_lite's function, its FLOPs convert to nemo_lite's MFU definition, and its own
``train_step`` runs on the benchmark's batches. Skipped where torchtitan 0.2.x is not installed (it is no
dependency of nemo_lite: ``pip install --no-deps torchtitan==0.2.2 tyro docstring_parser torchdata``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

EOS, SEQ, ROWS = 3, 128, 2


@pytest.fixture(scope="module")
def peer():
    pytest.importorskip("torchtitan", reason="torchtitan 0.2.x is not installed")
    import torchtitan_peer

    torchtitan_peer.import_torchtitan()
    return torchtitan_peer


def _batch(index: int = 0) -> dict[str, torch.Tensor]:
    from nemo_lite.testing.data import SyntheticPackedLoader

    return SyntheticPackedLoader(ROWS, SEQ, vocab_size=512, eos_id=EOS, mean_doc=30, seed=index).make(index)


def _models(peer):
    """torchtitan's model of the tiny preset and nemo_lite's (untied, flex, block-causal), same weights
    (moved over by torchtitan's own Hugging Face adapter, which permutes q/k for its RoPE layout)."""
    from torchtitan.models.llama3.model.model import Transformer
    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

    from nemo_lite.components.attention import AttentionConfig
    from nemo_lite.components.models import LlamaForCausalLM, get_preset
    from nemo_lite.components.models.hf import to_hf_key

    args = peer.model_args("tiny", seq_len=SEQ, eos_id=EOS)
    titan = Transformer(args)
    ours = LlamaForCausalLM(
        get_preset("tiny", tie_word_embeddings=False, eos_token_id=EOS),
        attention=AttentionConfig(backend="flex", attn_mask_type="block_causal"),
    )
    ours.init_weights(seed=0)
    hf_state = {to_hf_key(name): value for name, value in ours.state_dict().items()}
    titan.load_state_dict(Llama3StateDictAdapter(args, None).from_hf(hf_state), strict=True)
    return args, titan, ours


def test_torchtitans_model_and_masks_compute_nemo_lites_function_on_packed_documents(peer):
    args, titan, ours = _models(peer)
    batch = _batch()
    assert ((batch["input_ids"] == EOS).sum(dim=1) >= 2).all()  # several documents in every row
    (input_dict, labels), *_ = peer.titan_batches([batch])
    with torch.no_grad():
        masks = titan.get_attention_masks(input_dict["input"], peer._Tokenizer(EOS))
        theirs = titan(input_dict["input"], attention_masks=masks, positions=input_dict["positions"])
        expected = ours(batch["input_ids"], position_ids=batch["position_ids"])
    assert torch.equal(labels, batch["labels"])
    torch.testing.assert_close(theirs, expected, atol=2e-5, rtol=1e-5)
    # the shape torchtitan sizes from its own rules is the preset's
    assert titan.layers["0"].feed_forward.w1.weight.shape == ours.layers[0].mlp.gate_proj.weight.shape


def test_the_peers_flops_follow_nemo_lites_definition_and_torchtitans(peer):
    from nemo_lite.components.models.decoder import attention_flops, flops_per_token

    args, titan, ours = _models(peer)
    batch = _batch(1)
    n_params = sum(p.numel() for p in titan.parameters())
    tokens, pairs = batch["input_ids"].numel(), int((batch["position_ids"] + 1).sum())
    mask = ours.build_attention_mask(batch["input_ids"], position_ids=batch["position_ids"])
    nemo_count = flops_per_token(ours) * tokens + attention_flops(ours.config, mask).item()
    assert peer.flops_nemo_definition(args, n_params, tokens, pairs) == nemo_count
    _, per_token = args.get_nparams_and_flops(titan, SEQ)  # torchtitan's own count (full attention)
    assert peer.flops_torchtitan_definition(args, n_params, tokens, SEQ) == per_token * tokens
    assert peer.flops_torchtitan_definition(args, n_params, tokens, SEQ) > nemo_count


def test_torchtitans_train_step_runs_on_the_benchmarks_batches(peer):
    # flex attention has no backward on a CPU: the step's wiring is checked with torchtitan's sdpa (causal)
    started = peer.single_process_group("cpu")
    try:
        trainer = peer.build_trainer(
            "tiny", steps=3, seq_len=SEQ, rows=ROWS, eos_id=EOS, lr=1e-3, warmup_steps=1, min_lr_ratio=0.1,
            weight_decay=0.1, clip=1.0, compile=False, device="cpu", attention="sdpa",
        )  # fmt: skip
        group = trainer.optimizers.optimizers[0].param_groups[0]
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.95), 1e-8, 0.1)
        model = trainer.model_parts[0]
        batches = [_batch(i) for i in range(3)]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batches[0]["input_ids"], positions=batches[0]["position_ids"])
        first_loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batches[0]["labels"].flatten())
        records = peer.titan_train(trainer, batches, 3, peak_flops=1e12)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    assert records[0]["loss"] == pytest.approx(first_loss.item(), rel=1e-4)
    assert all(math.isfinite(r["loss"]) and r["tokens"] == ROWS * SEQ for r in records)
    assert [r["pairs"] for r in records] == [int((b["position_ids"] + 1).sum()) for b in batches]
    assert all(0 < r["mfu"] < r["mfu_torchtitan_definition"] for r in records)
    assert trainer.lr_schedulers.schedulers[0].get_last_lr()[0] == pytest.approx(1e-4)  # cosine down to 0.1


HIDDEN_IMPORT = """
import sys
class Hide:  # as on the GPU machine: neither datasets nor tensorboard installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "tensorboard"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
sys.path.insert(0, "scripts")
import torchtitan_peer
torchtitan_peer.import_torchtitan()
from torchtitan.components.metrics import MetricsProcessor
try:
    MetricsProcessor()
except RuntimeError as err:
    print(err)
print(sorted(m for m in ("datasets", "tensorboard") if m in sys.modules))
"""


def test_torchtitan_imports_without_its_text_pipelines_packages(peer):
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", HIDDEN_IMPORT], cwd=repo, capture_output=True, text=True, check=True, timeout=300
    )
    assert run.stdout.splitlines()[-2:] == [
        "torchtitan.components.metrics.MetricsProcessor needs tensorboard, which is not installed; "
        "pip install tensorboard",
        "[]",
    ]
