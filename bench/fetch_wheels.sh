#!/usr/bin/env bash
# Download sparsify (the benches' comparison library) and what it needs at import time, as
# wheels for Linux x86_64 and Python 3.10-3.12, into bench/wheelhouse/, for a GPU machine that
# has no package registry: bench/gpu_check.sh installs from there when the folder exists.
# torch, triton, numpy and their own dependencies are left out (the GPU machine has them);
# the folder holds about 50 MB.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheelhouse
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
for version in 3.10 3.11 3.12; do
  # Without their dependencies: sparsify's own (datasets, accelerate) are for its trainer, and
  # schedulefree's is torch.
  pip download -q -d wheelhouse --only-binary=:all: --python-version "$version" "${platforms[@]}" --no-deps \
    eai-sparsify schedulefree
  pip download -q -d wheelhouse --only-binary=:all: --python-version "$version" "${platforms[@]}" \
    transformers simple-parsing natsort einops
done
cd wheelhouse
rm -f torch-* triton-* nvidia_* cuda_* numpy-* sympy-* mpmath-* networkx-* jinja2-* markupsafe-* \
  setuptools-* fsspec-* filelock-* typing_extensions-*
du -sh .
