#!/usr/bin/env bash
# Prepares this checkout to run voxauth: a virtual environment with the project installed,
# the verified speaker model, and a local development encryption key. Safe to run again:
# each step is skipped when already done. `--dev` also installs the test and lint tools.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--dev" ]]; then extras="[dev]"; fi

# The PostgreSQL backend's tests start a server of their own (tests/postgres.py) from Debian's
# postgresql-15 binaries: installed with the dev tools, only when missing.
if [[ -n "$extras" && ! -x /usr/lib/postgresql/15/bin/initdb ]]; then
  echo "voxauth setup: installing PostgreSQL 15 for the tests (apt-get)"
  sudo=""; if [[ "$(id -u)" -ne 0 ]]; then sudo="sudo"; fi
  # The binaries only: no system cluster created and started on port 5432.
  $sudo mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" |
    $sudo tee /etc/postgresql-common/createcluster.d/voxauth-no-main-cluster.conf >/dev/null
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql-15
fi

python=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python="$candidate"; break
  fi
done
if [[ -z "$python" ]]; then
  echo "voxauth setup: Python 3.11 is required (python3.11 or python3 on PATH)" >&2
  exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "voxauth setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi

# Reinstall only when the dependencies (or the extras asked for) changed.
stamp=".venv/.voxauth-installed${extras}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "voxauth setup: installing voxauth${extras} and its dependencies (torch takes a minute)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".${extras}"
  echo "$want" > "$stamp"
fi

.venv/bin/voxauth fetch-model
mkdir -p var
.venv/bin/voxauth create-key var/dev.key
# A development CA with a server certificate and one client certificate per role (softphone,
# hr, mfa, admin): the server speaks mutual TLS only. Not for production: bring your own PKI.
if [[ ! -f var/pki/ca.crt ]]; then
  .venv/bin/voxauth certs init --dir var/pki
fi
