#!/usr/bin/env bash
# CI on the Python versions beside the main one (.ci/run). For each: install the project in its own venv
# ($VENVS/.venv-3.12/, $VENVS/.venv-3.13/; VENVS defaults to the repository root), then run a fast part
# of the suite: marks, metrics, outpainting, diffusers' Flax VAE and transformers' FlaxCLIPTextModel, and
# through the command line train.py --evaluate (diffusers' Flax UNet), the export and the terminal output
# on configs/tiny.py. Needs Debian's dataset-fashion-mnist (installed by .ci/run).
#
#   .ci/other_pythons.sh                        # python3.12 and python3.13 from PATH, else from pyenv
#   .ci/other_pythons.sh /usr/bin/python3.12    # these interpreters only
#   .ci/other_pythons.sh --install              # the venvs only (.ci/run builds them beside its other installs)
#   .ci/other_pythons.sh --test                 # the tests only, in the venvs built before
set -euo pipefail
install=true tests=true
case "${1:-}" in
  --install) tests=false; shift ;;
  --test) install=false; shift ;;
esac
cd "$(dirname "$0")/.."

TESTS=(
  tests/test_marks.py
  tests/test_metrics.py
  tests/test_outpaint.py::test_jump_schedule_hand_example
  tests/test_outpaint.py::test_denoiser_called_once_per_schedule_row
  "tests/test_outpaint.py::test_oracle_scores_zero_exactly[ddim-1]"
  tests/test_outpaint.py::test_blind_denoiser_is_at_chance
  tests/test_outpaint.py::test_compiles_once_per_shape
  tests/test_outpaint.py::test_bad_arguments
  tests/test_vae.py::test_encode_decode_shapes_scaling_and_fast_layers
  tests/test_text.py::test_encode_shapes_and_jit
  # train.py --evaluate and the export through the command line; test_cli.py's third test (absl's logs
  # let through by --verbosity, one more train.py start) runs in the main suite only
  tests/test_cli.py::test_train_evaluate_prints_the_summary_and_no_library_noise
  tests/test_cli.py::test_export_has_no_library_noise
)

find_python() {  # an interpreter of version $1 (e.g. 3.12) that runs: on PATH, else pyenv's newest build
  local v="$1" root="${PYENV_ROOT:-$HOME/.pyenv}" p
  for p in "$(command -v "python$v" || true)" $(ls -d "$root"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -rV); do
    if [ -n "$p" ] && "$p" -c "" 2>/dev/null; then echo "$p"; return; fi
  done
  echo "other_pythons.sh: no working python$v on PATH or under $root/versions/" >&2
  return 1
}

if [ "$#" -gt 0 ]; then
  PYTHONS=("$@")
else
  py312="$(find_python 3.12)"
  py313="$(find_python 3.13)"
  PYTHONS=("$py312" "$py313")
fi

# Fashion-MNIST prepared once for all versions (the same TFDS release reads it), removed at the end
if $tests && [ -z "${SOLIDMARK_TEST_TFDS_DIR:-}" ]; then
  tfds_tmp="$(mktemp -d)"
  trap 'rm -rf "$tfds_tmp"' EXIT
  export SOLIDMARK_TEST_TFDS_DIR="$tfds_tmp/tfds"
fi

for py in "${PYTHONS[@]}"; do
  v="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  venv="${VENVS:-.}/.venv-$v"
  start=$SECONDS
  if $install; then
    echo "== Python $v ($py): install into $venv"
    if [ ! -x "$venv/bin/python" ]; then "$py" -m venv "$venv"; fi  # an existing one is reused
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e ".[test]"
    "$venv/bin/python" -m pip list 2>/dev/null | grep -E -i '^(jax|jaxlib|flax|optax|orbax-checkpoint|diffusers|transformers|tensorflow[-_]cpu|tensorflow-datasets) '
    echo "== Python $v: install took $((SECONDS - start)) s"
  fi
  if $tests; then
    if [ ! -x "$venv/bin/python" ]; then echo "other_pythons.sh: no venv at $venv: run --install first" >&2; exit 1; fi
    echo "== Python $v: tests"
    "$venv/bin/python" -m pytest "${TESTS[@]}" -p no:cacheprovider
    echo "== Python $v: done in $((SECONDS - start)) s"
  fi
done
