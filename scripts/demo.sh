#!/usr/bin/env bash
# Set up the environment, then train and test POPCORN on the embedded synthetic world.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m popcorn.fit --config experiments/demo.yaml "$@"
