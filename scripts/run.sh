#!/usr/bin/env bash
# The first command of the README: install gzx into .venv and run `gzx demo` on the embedded default
# (a SQLite file in this folder, jobs in-process, no other service).
#   bash scripts/run.sh [gzx demo options...]   (gzx demo --help lists them)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.gzx-run-install
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e .
    echo "$want" >"$stamp"
fi
exec .venv/bin/gzx demo "$@"
