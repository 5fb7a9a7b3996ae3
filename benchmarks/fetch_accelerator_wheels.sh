#!/usr/bin/env bash
# Downloads, on a machine with a package registry, the wheels the accelerator check needs on a GPU host
# that has none (Python 3.12, jax with CUDA, PyTorch, numpy and safetensors already installed there).
#
#   benchmarks/fetch_accelerator_wheels.sh [DIR]      # default DIR: benchmarks/wheels (git-ignored)
#
# Then copy the repository with DIR to the GPU host and run benchmarks/accelerator_check.sh there: it
# unpacks the wheels (plain zip files; no pip needed) and puts them on PYTHONPATH.
# Only pure-Python wheels (py3-none-any) or manylinux cp312 builds are taken, without dependencies
# (--no-deps): the list below is the closure of what the check imports beyond the host's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-benchmarks/wheels}"
PIP="${PIP:-python3 -m pip}"
mkdir -p "$DIR"
# The versions of the project's own (Python 3.11) environment; each has a py3 or cp312 wheel.
PKGS=(
  flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 ml_collections==1.1.0 absl-py==2.5.1
  diffusers==0.39.0 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 regex==2026.11.19
  msgpack==1.2.4 treescope==0.1.10 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0
  PyYAML==6.0.4 typing_extensions==4.16.0 etils==1.15.0 tensorstore==0.1.86
  importlib_metadata==10.2.0 zipp==4.1.2 filelock==4.3.1 requests==2.34.2 urllib3==2.8.0 idna==3.20
  charset_normalizer==3.5.3 certifi==2026.10.19.post1 tqdm==4.70.1 packaging==26.4 fsspec==2026.9.0
  pillow==13.0.0 safetensors==0.8.0 hf-xet==1.8.0 protobuf==7.36.2 humanize==4.17.0
  simplejson==4.3.0 aiofiles==25.1.0
)
$PIP download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --no-deps -d "$DIR" "${PKGS[@]}"
echo "wheels in $DIR: $(ls "$DIR" | wc -l) files, $(du -sh "$DIR" | cut -f1)"
