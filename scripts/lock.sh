#!/usr/bin/env bash
# Regenerate requirements/lock.txt, the exact versions that scripts/setup.sh installs (and so the
# demo, the tests and CI), from pyproject.toml's dependencies with the extras all and test, and
# requirements/torch.in.
#
#   bash scripts/lock.sh              # keep every pin that still fits (after editing pyproject.toml)
#   bash scripts/lock.sh --upgrade    # move every pin to the newest release (see README, Development)
#   bash scripts/lock.sh --upgrade-package optuna   # move one
#
# Then run `bash scripts/test.sh` (setup.sh reinstalls from the new lock) and commit the lock only
# when the suite passes. The tool is pip-tools, pinned below, in its own venv (.venv-lock).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-lock/bin/pip-compile ]; then
  "$PY" -m venv .venv-lock
  .venv-lock/bin/python -m pip install -q "pip-tools==7.7.0"
fi
# The machine's own CPU build of torch lies in a find-links folder; without it, pip-compile would
# resolve PyPI's CUDA build and lock a dozen nvidia-* packages the CPU build never needs.
links=()
if [ -d /opt/wheels ]; then links=(--find-links /opt/wheels); fi
.venv-lock/bin/pip-compile -q --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
  --extra all --extra test "${links[@]}" "$@" \
  -o requirements/lock.txt pyproject.toml requirements/torch.in
# The lock names torch's public version: `torch==2.13.0` takes the local CPU build where one lies on
# disk (2.13.0+cpu sorts above 2.13.0), and PyPI's build elsewhere.
sed -i -E 's/^(torch==[0-9][0-9.]*)\+cpu$/\1/' requirements/lock.txt
# The extra `all` names mergesmith itself (mergesmith[eval,zoo,search]), which pip-compile writes as
# `mergesmith @ file:///<this folder>`: a path that exists only here. setup.sh installs the project
# itself, editable, from the clone it runs in.
awk '/^mergesmith @ /{skip=1; next} skip && /^ +#/{next} {skip=0; print}' requirements/lock.txt > requirements/lock.tmp
mv requirements/lock.tmp requirements/lock.txt
echo "requirements/lock.txt: $(grep -cE '^[A-Za-z0-9]' requirements/lock.txt) pinned packages"
