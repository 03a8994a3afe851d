#!/usr/bin/env bash
# The test command: sets up .venv (Python 3.11+), then runs ruff, mypy --strict and pytest.
# Usage: bash scripts/test.sh [pytest arguments]
# PostgreSQL tests run when SYNCER_TEST_DATABASE_URL is set (.ci/run sets it); otherwise they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
echo "== ruff"
.venv/bin/ruff check syncer tests migrations bench examples
.venv/bin/ruff format --check syncer tests migrations bench examples
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
# Four workers on two cores: most tests wait on HTTP replies, subprocesses and databases.
# worksteal: an idle worker takes tests queued for a busy one, so the run does not end on one
# worker's tail of slow tests (211 s against 274 s for the same suite, here).
.venv/bin/python -m pytest -n 4 --dist worksteal "$@"
