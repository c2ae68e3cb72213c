#!/usr/bin/env bash
# The test command (`make test`): ruff, then the whole pytest suite with an isolated database.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Debian's chromium for tests/test_browser.py (apt-get, only if missing and we are root; never fails)
bash scripts/install_browser.sh
export FIFTYONE_DATABASE_VALIDATION=false FIFTYONE_DO_NOT_TRACK=true
mkdir -p test-artifacts
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q --durations=15 --junitxml=test-artifacts/junit.xml "$@"
