#!/usr/bin/env bash
# The quick start: installs the project into .venv and runs a real sync of the bundled sample data
# on the embedded SQLite default against a local stand-in for two Tray workflows.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/python examples/quickstart.py
