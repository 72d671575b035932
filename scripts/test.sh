#!/usr/bin/env bash
# The whole test suite, as CI runs it: setup (with test tools), generated-code drift check,
# lint, type check, the import layers (import-linter), then pytest with the real model on real
# speech. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
.venv/bin/python scripts/gen_protos.py --check
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
