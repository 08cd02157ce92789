"""Random faults over a short run: whatever breaks, the newest usable checkpoint resumes bit-exactly.

Each example runs the tiny model for STEPS steps, saving every step, with one fault drawn at random:

- kill: an exception from the checkpoint hook after one of the files of one save (the process dying mid-save);
- disk full: OSError(ENOSPC) from the same place;
- truncate: after a clean run, one file of the newest checkpoint cut to a random length.

Then the run is resumed (trainer.resume=true) to STEPS. Its final weights and optimizer state must equal
those of a straight run, bit for bit, it must have resumed from the newest checkpoint that was whole, and
metrics.jsonl must hold each step once.
"""

from __future__ import annotations

import errno

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recipe_utils import tiny_config

from nemo_lite.testing.data import SyntheticPackedLoader
from nemo_lite.testing.hooks import after_each_checkpoint_file
from nemo_lite.training import checkpoint as ckpt
from nemo_lite.training.metrics import read_metrics
from nemo_lite.training.trainer import Trainer

STEPS = 4
FILES = [ckpt.MODEL_FILE, ckpt.STATE_FILE, ckpt.META_FILE]


class Killed(Exception):
    """The process dying in the middle of a save."""


def config(run_dir, resume=False):
    cfg = tiny_config(run_dir, "sdpa", steps=STEPS)
    t = cfg.trainer
    t.save_every, t.keep_last, t.val_every, t.sample_tokens, t.export_hf = 1, 2, 0, 0, False
    t.step_impl, t.resume = "plain", resume
    return cfg


def trainer(run_dir, resume=False) -> Trainer:
    loader = SyntheticPackedLoader(4, 64, vocab_size=512, eos_id=0, seed=1, learnable=True)
    return Trainer(config(run_dir, resume), train_loader=loader)


def final_state(t: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in t.raw_model.state_dict().items()}
    for i, state in t.optimizer.state_dict()["state"].items():
        out |= {f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in state.items()}
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    t = trainer(tmp_path_factory.mktemp("straight"))
    t.fit()
    return final_state(t)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fault=st.sampled_from(["kill", "disk full", "truncate"]),
    at_step=st.integers(1, STEPS),
    file=st.sampled_from(FILES),
    keep=st.floats(0.0, 0.99),
)
def test_the_newest_usable_checkpoint_resumes_bit_exactly(tmp_path_factory, straight, fault, at_step, file, keep):
    run_dir = tmp_path_factory.mktemp("faulted")
    first = trainer(run_dir)
    first.setup()

    def after_file(name):
        if first.step == at_step and name == file:
            if fault == "kill":
                raise Killed(f"killed after writing {name} of step {at_step}")
            raise OSError(errno.ENOSPC, "No space left on device")

    if fault != "truncate":
        with after_each_checkpoint_file(after_file), pytest.raises((Killed, ckpt.CheckpointWriteError)):
            first.fit()
        whole = at_step - 1  # the save of at_step never completed
    else:
        first.fit()
        newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        data = (newest / file).read_bytes()
        (newest / file).write_bytes(data[: int(len(data) * keep)])
        whole = STEPS - 1  # the newest is damaged; keep_last=2 leaves the one before
    assert not list((run_dir / "checkpoints").glob(ckpt.TMP_PREFIX + "*"))  # no partial checkpoint left

    resumed = trainer(run_dir, resume="true")
    resumed.fit()
    assert resumed.resumed_from == (run_dir / "checkpoints" / f"step_{whole:06d}" if whole else None)
    got = final_state(resumed)
    assert got.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(got[key], value), key
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
