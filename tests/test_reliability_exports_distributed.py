"""The exports' reliability under torchrun (gloo, 2 ranks on CPU), as tests/test_reliability_exports.py checks it in
one process: a finished run without its export exports on resume, and a SIGTERM during the export (written by rank
0) stops it without leaving temporary files, after which a resume exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_distributed import REPO, clean_env, free_port

from nemo_lite.training import run_dir as rundir

ARGS = [
    "model=tiny",
    "attention=sdpa",
    "data.seq_len=32",
    "data.batch_size=2",
    "trainer.max_steps=2",
    "trainer.save_every=2",
    "trainer.val_every=0",
    "trainer.sample_tokens=0",
    "trainer.progress_bar=false",
    "trainer.device=cpu",
]

# Rank 0 sends itself a SIGTERM once the export's weights are written (the rest of the export is not), as a
# scheduler's SIGTERM arriving then would; everything else is the recipe as torchrun runs it.
SIGTERM_DURING_EXPORT = """
import os, runpy, signal, sys
import safetensors.torch
real = safetensors.torch.save_file
def save_then_sigterm(tensors, filename, *args, **kwargs):
    real(tensors, filename, *args, **kwargs)
    if ".hf.tmp-" in str(filename):
        os.kill(os.getpid(), signal.SIGTERM)
safetensors.torch.save_file = save_then_sigterm
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def torchrun(run_dir: Path, *args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    entry = [str(script), str(REPO / "recipes" / "pretrain.py")] if script else [str(REPO / "recipes" / "pretrain.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    return subprocess.run(
        [*cmd, *entry, *ARGS, f"run_dir={run_dir}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
        cwd=REPO,
    )


def test_under_torchrun_a_finished_run_without_its_export_exports_on_resume(tmp_path):
    first = torchrun(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / rundir.EXPORT_MARKER).is_file()
    (tmp_path / rundir.EXPORT_MARKER).unlink()  # killed after its last checkpoint, before its export finished
    (tmp_path / "hf").rename(tmp_path / "elsewhere")
    resumed = torchrun(tmp_path, "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        "is at step 2 and trainer.max_steps=2: the run is finished but its export is missing or incomplete: "
        "exporting it now" in resumed.stderr
    )
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / rundir.EXPORT_MARKER).is_file()
    assert not list(tmp_path.glob(".hf.*"))
    again = torchrun(tmp_path, "trainer.resume=true")  # now there is nothing to do
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do (raise trainer.max_steps to train on)" in again.stderr


def test_under_torchrun_a_sigterm_during_the_export_leaves_no_temporary_files_and_resume_exports(tmp_path):
    script = tmp_path / "sigterm_during_export.py"
    script.write_text(SIGTERM_DURING_EXPORT)
    run_dir = tmp_path / "run"
    stopped = torchrun(run_dir, script=script)
    assert stopped.returncode != 0
    assert (
        "received SIGTERM during the export, which was stopped without leaving temporary files; resume with "
        "trainer.resume=true to redo the export of step 2" in stopped.stderr
    ), stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr.split("received SIGTERM during the export")[0]
    assert not list(run_dir.glob(".hf.*")) and not (run_dir / "hf").exists()
    assert not (run_dir / rundir.EXPORT_MARKER).exists()
    assert (run_dir / "checkpoints" / "step_000002" / "meta.json").is_file()
    resumed = torchrun(run_dir, "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "hf" / "model.safetensors").is_file() and (run_dir / rundir.EXPORT_MARKER).is_file()
