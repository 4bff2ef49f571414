#!/usr/bin/env bash
# Set up the environment, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two test workers (pytest-xdist), each taking whole test files, so a file's module fixtures are
# built once; POPCORN_TEST_WORKERS=0 runs the tests in this one process (arguments pass through).
exec .venv/bin/python -m pytest -n "${POPCORN_TEST_WORKERS:-2}" --dist loadfile "$@"
