#!/usr/bin/env bash
# Installs everything the tests need, then runs the full suite (lint, types, unit and integration).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
