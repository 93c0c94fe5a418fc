#!/usr/bin/env bash
# Meet new releases on purpose: build a throwaway environment (.venv-latest) with the newest releases
# that pyproject.toml admits, print what differs from requirements/lock.txt, and run the suite there.
#
#   bash scripts/test-latest.sh                 # the whole suite
#   bash scripts/test-latest.sh tests/search    # arguments go to pytest
#
# torch stays at the lock's pin unless TORCH names another requirement (TORCH='torch>=2.14'): PyPI's
# newest torch for Linux is a CUDA build of several GB. The environment is made anew on every run.
# Exit status: pytest's. What to do with the result: README, "Development".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
lock=requirements/lock.txt
torch_req=${TORCH:-$(grep -E '^torch==' "$lock")}
rm -rf .venv-latest
"$PY" -m venv .venv-latest || exit 2
.venv-latest/bin/python -m pip install -q --upgrade pip || exit 2
# A constraint, so that the eager upgrade below leaves torch where TORCH (or the lock) put it.
echo "$torch_req" > .venv-latest/torch-constraint.txt
.venv-latest/bin/python -m pip install -q "$torch_req" || exit 2
.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c .venv-latest/torch-constraint.txt \
  -e ".[all,test]" || exit 2

changes() {
  .venv-latest/bin/python - "$lock" <<'PY'
import re, subprocess, sys
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if m:
            out[norm(m.group(1))] = m.group(2)
    return out

locked = pins(Path(sys.argv[1]).read_text().splitlines())
frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                        text=True, check=True).stdout.splitlines()
latest = pins(frozen)
strip = lambda v: v.split("+")[0]  # a local build label (torch's +cpu) is not a new release
moved = sorted(k for k in locked.keys() & latest.keys() if strip(locked[k]) != strip(latest[k]))
added = sorted(latest.keys() - locked.keys() - {"pip"})
gone = sorted(locked.keys() - latest.keys() - {"pip", "setuptools"})
print(f"Against {sys.argv[1]}: {len(moved)} moved, {len(added)} new, {len(gone)} no longer needed")
for k in moved:
    print(f"  {k}: {locked[k]} -> {latest[k]}")
for k in added:
    print(f"  {k}: new, {latest[k]}")
for k in gone:
    print(f"  {k}: {locked[k]} no longer installed")
PY
}

changes | tee .venv-latest/changes.txt
.venv-latest/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
echo
echo "Newest releases (torch: $torch_req), pytest exit status $status; the versions that moved:"
cat .venv-latest/changes.txt
exit $status
