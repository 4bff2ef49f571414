#!/usr/bin/env bash
# Create .venv (Python 3.11) and install popcorn with its dev extras. Idempotent and quick when
# nothing changed: a stamp keyed on setup.cfg skips the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.popcorn-installed-$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch 2.14.1 + torchvision 0.29.1 are the pair that import together on this platform.
    .venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    rm -f .venv/.popcorn-installed-*
    touch "$stamp"
fi
