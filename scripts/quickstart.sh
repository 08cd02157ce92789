#!/usr/bin/env bash
# Set-up and launch in one command, on a fresh machine:
#   bash scripts/quickstart.sh pretrain [hydra overrides...]   # the default pretraining recipe (CPU, offline)
#   bash scripts/quickstart.sh test [pytest args...]           # the test suite (what CI runs)
# A virtual environment is made in .venv (or $NEMO_LITE_VENV) and the project installed into it once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEMO_LITE_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[quickstart] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.nemo_lite-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[quickstart] installing torch (CPU build) and nemo_lite[dev,hf] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
  # PIP_TORCH overrides it (e.g. PIP_TORCH="torch" on a GPU machine that has CUDA wheels).
  "$VENV/bin/python" -m pip install -q "${PIP_TORCH:-torch==2.13.0}"
  "$VENV/bin/python" -m pip install -q -e ".[dev,hf]"
  touch "$STAMP"
  echo "[quickstart] installed; for the README's python lines: source $VENV/bin/activate (or call $VENV/bin/python)"
fi

cmd="${1:-}"; shift || true
case "$cmd" in
  pretrain) exec "$VENV/bin/python" recipes/pretrain.py "$@" ;;
  finetune) exec "$VENV/bin/python" recipes/finetune.py "$@" ;;
  test)
    set +e
    # Two workers, each test file whole on one (files share fixtures and run directories); "-n 0" runs serially.
    "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile "$@"
    rc=$?
    if [ $rc -eq 5 ]; then echo "[quickstart] pytest collected no tests: failing"; exit 1; fi
    exit $rc ;;
  *) echo "usage: bash scripts/quickstart.sh {pretrain|finetune|test} [args...]" >&2; exit 2 ;;
esac
