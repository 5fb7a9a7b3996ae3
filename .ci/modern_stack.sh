#!/usr/bin/env bash
# Builds (or reuses) the separate virtualenv of today's maintained PyTorch stack that
# tests/test_export_modern.py loads our exports with: torch 2.13 (CPU), diffusers >= 0.40 and
# transformers >= 5 (no Flax in either). It is never the project's own venv.
#
#   bash .ci/modern_stack.sh        # venv at $SOLIDMARK_MODERN_VENV, default ${TMPDIR:-/tmp}/solidmark-modern-venv
set -euo pipefail
VENV="${SOLIDMARK_MODERN_VENV:-${TMPDIR:-/tmp}/solidmark-modern-venv}"
PY="${PYTHON:-python3}"  # Python 3.11, like the project (the torch 2.13 CPU wheel here is cp311)
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch, diffusers, transformers, safetensors" 2>/dev/null; then
  echo "modern stack venv reused: $VENV"
  exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "diffusers>=0.40" "transformers>=5" "safetensors>=0.4" "numpy>=2"
"$VENV/bin/python" -c "import torch, diffusers, transformers; print('modern stack venv built:', '$VENV', 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
