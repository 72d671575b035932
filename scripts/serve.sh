#!/usr/bin/env bash
# One command for a new user: set everything up, then run voxauth on the embedded SQLite store
# (var/voxauth.db) with the local development key (var/dev.key). Extra arguments go to
# `voxauth serve`, e.g. --listen 0.0.0.0:50051.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export VOXAUTH_KEY_FILE="${VOXAUTH_KEY_FILE:-var/dev.key}"
exec .venv/bin/voxauth serve "$@"
