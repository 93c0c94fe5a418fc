#!/usr/bin/env bash
# The main job: set up .venv (if needed), then the default flow on our own model zoo:
# build the zoo (or reuse the cached one), merge its experts with a few methods, evaluate
# every model on every test task, route each prompt to its expert (route:classifier), print the
# table. Outputs land in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mergesmith bench --methods demo --routers classifier --out runs/demo "$@"
