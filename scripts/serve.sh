#!/usr/bin/env bash
# One command for a new user: set everything up, then run voxauth on the embedded SQLite store
# (var/voxauth.db) with the local development key (var/dev.key), over mutual TLS with the
# development certificates in var/pki. Extra arguments go to `voxauth serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export VOXAUTH_KEY_FILE="${VOXAUTH_KEY_FILE:-var/dev.key}"
export VOXAUTH_TLS_CERT="${VOXAUTH_TLS_CERT:-var/pki/server.crt}"
export VOXAUTH_TLS_KEY="${VOXAUTH_TLS_KEY:-var/pki/server.key}"
export VOXAUTH_TLS_CLIENT_CA="${VOXAUTH_TLS_CLIENT_CA:-var/pki/ca.crt}"
# MALLOC_ARENA_MAX is left to glibc: after a burst of uploads the server hands freed memory back
# itself (malloc_trim: RSS after the burst 1.45 GB instead of 1.82 GB), and MALLOC_ARENA_MAX=2
# added little to that (1.42 GB; see server/runtime/audio_budget.py).
exec .venv/bin/voxauth serve "$@"
