#!/usr/bin/env bash
# The accelerator check on a GPU host without a package registry (see benchmarks/accelerator_check.py).
#
#   benchmarks/accelerator_check.sh [--smoke] [other accelerator_check.py flags]
#
# Needs the wheels from benchmarks/fetch_accelerator_wheels.sh (WHEELS, default benchmarks/wheels):
# they are unpacked once into $WHEELS/site (wheels are zip files: python's zipfile, no pip) and put on
# PYTHONPATH after the repository, so the host's own jax, CUDA plugin, torch and numpy are used.
# PYTHON defaults to the host's /opt/torch/.venv/bin/python when present, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-benchmarks/wheels}"
PYTHON="${PYTHON:-$( [ -x /opt/torch/.venv/bin/python ] && echo /opt/torch/.venv/bin/python || echo python3)}"
SITE="$WHEELS/site"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  if [ ! -f "$SITE/.unpacked" ]; then
    mkdir -p "$SITE"
    for w in "$WHEELS"/*.whl; do "$PYTHON" -m zipfile -e "$w" "$SITE"; done
    touch "$SITE/.unpacked"
  fi
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS: using the installed packages (run benchmarks/fetch_accelerator_wheels.sh for a bare host)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export USE_TF=0 TF_CPP_MIN_LOG_LEVEL=3
# XLA preallocates 75% of GPU memory by default: peak-memory figures are read from its allocator stats,
# and PyTorch runs in the same process afterwards, so allocate on demand.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec "$PYTHON" benchmarks/accelerator_check.py "$@"
