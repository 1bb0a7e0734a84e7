#!/usr/bin/env bash
# Download (on the development machine, which has the package index) the pure-Python wheels that the GPU
# machine lacks and scripts/gpu_check.sh uses: diffusers for the VAE comparison and the diffusers
# integration tests. They land in .whl/ (git-ignored through .git/info/exclude), which a device run
# carries (carry [".whl"]) and installs with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Versions: the ones our own test environment pins (diffusers) and their missing dependencies there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
ls -1 .whl
