"""torchrun on CPU (gloo): FSDP2 over 2 processes and HSDP over 2 "nodes" of 2 (torchrun's c10d rendezvous)
give the losses of 1 process with the same global batch, resume exactly from their sharded checkpoints, and
a checkpoint written by N ranks resumes on M (2->1, 1->2, 4->2) with the losses of a run of M ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lite.testing.net import free_port
from nemo_lite.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "model=tiny",
    "attention=sdpa",
    "data.seq_len=64",
    "trainer.max_steps=6",
    "trainer.val_every=3",
    "trainer.save_every=3",
    "trainer.keep_last=3",
    "trainer.progress_bar=false",
    "trainer.sample_tokens=4",
    "trainer.device=cpu",
]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout
    return env


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = clean_env()
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "recipes/pretrain.py")]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(free_port()),
            str(REPO / "recipes/pretrain.py"),
        ]
    return subprocess.run([*cmd, *COMMON, *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    single = launch(1, "data.batch_size=4", f"run_dir={root}/single")
    assert single.returncode == 0, single.stderr[-2000:]
    double = launch(2, "data.batch_size=2", f"run_dir={root}/double")
    assert double.returncode == 0, double.stderr[-2000:]
    return root


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def test_two_ranks_match_one_process_with_the_same_global_batch(runs):
    one, two = losses(runs / "single"), losses(runs / "double")
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    assert (runs / "double" / "hf" / "config.json").is_file()  # exported once, by rank 0
    assert sorted(p.name for p in (runs / "double" / "checkpoints" / "step_000006").iterdir()) == [
        "dcp",
        "meta.json",
        "rank00000.pt",
        "rank00001.pt",
    ]


def test_two_ranks_resume_exactly_from_a_sharded_checkpoint(runs):
    ckpt = runs / "double" / "checkpoints" / "step_000003"
    resumed = launch(2, "data.batch_size=2", f"run_dir={runs}/resumed", f"trainer.resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(runs / "resumed") == losses(runs / "double")[3:]


def launch_nodes(nodes: int, per_node: int, *args: str) -> list[subprocess.CompletedProcess]:
    """``nodes`` torchrun agents started together on this machine, meeting through the c10d rendezvous on
    localhost, as on a cluster (each agent one node)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"localhost:{port}",
        "--rdzv-id",
        f"test-{port}",
        str(REPO / "recipes/pretrain.py"),
        *COMMON,
        *args,
    ]
    agents = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=REPO)
        for _ in range(nodes)
    ]
    done = []
    for agent in agents:
        out, err = agent.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    return done


def grad_norms(run_dir: Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def hsdp(runs):
    """HSDP: 2 nodes x 2 ranks, one row per rank (the global batch of the other runs)."""
    agents = launch_nodes(2, 2, "data.batch_size=1", "trainer.dp_replicate=2", f"run_dir={runs}/hsdp")
    for agent in agents:
        assert agent.returncode == 0, agent.stderr[-2000:]
    return runs / "hsdp"


def test_hsdp_on_two_nodes_matches_one_process(runs, hsdp):
    one, four = losses(runs / "single"), losses(hsdp)
    assert len(four) == 6
    assert max(abs(a - b) for a, b in zip(one, four, strict=True)) <= 1e-5
    # The replicas hold equal gradients: counted once, the norm is the one process's (counted on both
    # replicas it would be sqrt(2) times larger).
    for a, b in zip(grad_norms(runs / "single"), grad_norms(hsdp), strict=True):
        assert abs(a - b) <= 1e-3 * a
    assert (hsdp / "hf" / "config.json").is_file()  # the full state dict gathers over the 2-D mesh
    assert sorted(p.name for p in (hsdp / "checkpoints" / "step_000003").iterdir()) == [
        "dcp",
        "meta.json",
        *[f"rank0000{r}.pt" for r in range(4)],
    ]


def test_hsdp_resumes_exactly(runs, hsdp):
    ckpt = hsdp / "checkpoints" / "step_000003"
    args = ("data.batch_size=1", "trainer.dp_replicate=2", f"run_dir={runs}/hsdp_resumed", f"trainer.resume={ckpt}")
    for agent in launch_nodes(2, 2, *args):
        assert agent.returncode == 0, agent.stderr[-2000:]
    assert losses(runs / "hsdp_resumed") == losses(hsdp)[3:]


@pytest.mark.parametrize(
    ("writer", "nproc", "batch", "reference"),
    [("double", 1, 4, "single"), ("single", 2, 2, "double"), ("hsdp", 2, 2, "double")],
    ids=["2to1", "1to2", "4hsdp_to_2"],
)
def test_a_checkpoint_resumes_on_another_number_of_ranks(request, runs, writer, nproc, batch, reference):
    """Weights, AdamW moments and step counts, schedule and data position carry over: the continued losses
    are those of the uninterrupted run on the new number of ranks (the same global batch, so the same rows
    at every step)."""
    if writer == "hsdp":
        request.getfixturevalue("hsdp")
    ckpt = runs / writer / "checkpoints" / "step_000003"
    out = runs / f"from_{writer}_on_{nproc}"
    proc = launch(nproc, f"data.batch_size={batch}", f"run_dir={out}", f"trainer.resume={ckpt}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed, uninterrupted = losses(out), losses(runs / reference)[3:]
    assert len(resumed) == 3
    assert max(abs(a - b) for a, b in zip(resumed, uninterrupted, strict=True)) <= 1e-5


def test_dp_replicate_must_divide_the_ranks():
    from nemo_lite.training.config import ConfigError
    from nemo_lite.training.distributed import check_dp_replicate

    check_dp_replicate(2, 8)
    with pytest.raises(ConfigError, match=r"trainer.dp_replicate=3 must divide the number of ranks, 8"):
        check_dp_replicate(3, 8)


def test_clipping_inside_fused_adamw_under_fsdp2(tmp_path):
    """The fast step (clipping inside fused AdamW, run on the local shards of the DTensor parameters) gives
    the losses of the plain step (a separate clip pass, unfused AdamW) in one process; its state, still on
    the DTensors, goes through a sharded checkpoint and resumes exactly."""
    common = ["data.batch_size=2", "trainer.sample_tokens=0", "trainer.clip_grad_norm=0.05"]
    host = launch(
        1, *common, "data.batch_size=4", "trainer.save_every=0", "trainer.step_impl=plain", f"run_dir={tmp_path}/h"
    )
    assert host.returncode == 0, host.stderr[-2000:]
    device = launch(2, *common, "trainer.step_impl=fast", f"run_dir={tmp_path}/device")
    assert device.returncode == 0, device.stderr[-2000:]
    one, two = losses(tmp_path / "h"), losses(tmp_path / "device")
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    grad_norms = [r["grad_norm"] for r in read_metrics(tmp_path / "device")]
    assert min(grad_norms) > 0.05  # clipping was active on every step
    ckpt = tmp_path / "device" / "checkpoints" / "step_000003"
    resumed = launch(2, *common, "trainer.step_impl=fast", f"run_dir={tmp_path}/resumed", f"trainer.resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path / "resumed") == two[3:]


def test_blocks_kept_unsharded_until_backward_and_prefetched_give_the_same_losses(runs, tmp_path):
    """Also profiles two steps: rank 0 alone writes the trace and summary."""
    kept = launch(
        2,
        "data.batch_size=2",
        "trainer.reshard_after_forward=false",
        "trainer.fsdp_prefetch=2",
        "trainer.save_every=0",
        "trainer.profile_steps=2",
        "trainer.profile_start=1",
        f"run_dir={tmp_path}",
    )
    assert kept.returncode == 0, kept.stderr[-2000:]
    one, two = losses(runs / "single"), losses(tmp_path)
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["summary.json", "trace_rank0.json.gz"]


@pytest.fixture(scope="module")
def muon_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon")
    for nproc, batch, name in ((1, 4, "single"), (2, 2, "double")):
        proc = launch(nproc, "optim=muon", f"data.batch_size={batch}", f"run_dir={root}/{name}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def test_muon_on_two_ranks_matches_one_process_and_resumes_exactly(muon_runs):
    """Muon's Newton–Schulz step needs each whole matrix: under FSDP2 the momentum-updated gradient is
    gathered and each rank keeps its rows, so two ranks give one process's losses; its state goes through
    a sharded checkpoint and resumes exactly."""
    one, two = losses(muon_runs / "single"), losses(muon_runs / "double")
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    ckpt = muon_runs / "double" / "checkpoints" / "step_000003"
    resumed = launch(2, "optim=muon", "data.batch_size=2", f"run_dir={muon_runs}/resumed", f"trainer.resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(muon_runs / "resumed") == two[3:]


@pytest.mark.parametrize(
    ("writer", "nproc", "batch", "reference"), [("double", 1, 4, "single"), ("single", 2, 2, "double")]
)
def test_a_muon_checkpoint_resumes_on_another_number_of_ranks(muon_runs, writer, nproc, batch, reference):
    ckpt = muon_runs / writer / "checkpoints" / "step_000003"
    out = muon_runs / f"from_{writer}_on_{nproc}"
    proc = launch(nproc, "optim=muon", f"data.batch_size={batch}", f"run_dir={out}", f"trainer.resume={ckpt}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed, uninterrupted = losses(out), losses(muon_runs / reference)[3:]
    assert len(resumed) == 3
    assert max(abs(a - b) for a, b in zip(resumed, uninterrupted, strict=True)) <= 1e-5


def test_a_damaged_shard_falls_back_and_another_seq_len_is_refused_in_one_line(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs / "double", run)
    newest = run / "checkpoints" / "step_000006"
    shard = sorted((newest / "dcp").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    other = launch(2, "data.batch_size=2", "data.seq_len=32", f"run_dir={tmp_path}/other", f"trainer.resume={run}")
    # torchrun reports the ranks' exit code 2 as its own failure; no rank prints a traceback of nemo_lite's
    assert other.returncode != 0 and "nemo_lite/training" not in other.stderr, other.stderr[-2000:]
    assert f"checkpoint {newest} is damaged (dcp/{shard.name} does not match its checksum)" in other.stderr
    assert "it was saved by a run of another shape (data.seq_len 64 -> 32)" in other.stderr
    resumed = launch(2, "data.batch_size=2", f"run_dir={run}", "trainer.resume=true", "trainer.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from the one before it" in resumed.stderr
    assert losses(run)[-3:] == losses(runs / "double")[3:]
