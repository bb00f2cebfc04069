#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest args...]   (default: -q)
#
# 1. creates .venv if missing and installs the project with its test extra
#    (again whenever pyproject.toml changes; GZX_FORCE_INSTALL=1 forces it);
# 1b. installs the `train` extra (torch, torchvision) once into an environment kept
#    outside the clone (GZX_TRAIN_ENV_DIR, default ~/.cache/gzx), keyed on that
#    extra's dependency list, and puts it on .venv's path; GZX_TRAIN_TESTS=0 skips it
#    (the trainer tests then skip themselves);
# 2. installs Debian's chromium for the browser tests unless GZX_BROWSER_TESTS=0;
# 3. finds or starts PostgreSQL and Redis (scripts/test-services.sh) and exports
#    GZX_TEST_DATABASE_URL / GZX_TEST_REDIS_URL;
# 4. runs pytest and exits with its status; "no tests collected" (5) is a failure.
#
# Throwaway servers that step 3 had to start are stopped again on exit, unless
# GZX_TEST_KEEP_SERVICES=1 (then the next run reuses them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { echo "test.sh: $*" >&2; }
die() { echo "test.sh: ERROR: $*" >&2; exit 1; }

# --- 1. virtualenv and the project with its test extra
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv || die "python3 -m venv .venv failed"
fi
stamp=.venv/.gzx-test-install
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "${GZX_FORCE_INSTALL:-0}" != 0 ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing the project with its test extra into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' \
        || die "pip install -e '.[test]' failed"
    echo "$want" >"$stamp"
fi

# --- 1b. the train extra, outside the clone so that a CI run pays for it once
pth=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gzx-train-extra.pth
if [ "${GZX_TRAIN_TESTS:-1}" != 0 ]; then
    train_deps=$(.venv/bin/python -c 'import tomllib
with open("pyproject.toml", "rb") as f:
    print(" ".join(tomllib.load(f)["project"]["optional-dependencies"]["train"]))')
    train_key=$({ echo "$train_deps"; python3 -V; uname -m; } | sha256sum | cut -c1-16)
    train_env=${GZX_TRAIN_ENV_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gzx}/train-$train_key
    if [ ! -f "$train_env/.gzx-complete" ]; then
        log "installing the train extra ($train_deps) into $train_env (once; several GB)"
        rm -rf "$train_env"
        python3 -m venv "$train_env" || die "python3 -m venv $train_env failed"
        # shellcheck disable=SC2086  # the list is split on purpose
        "$train_env/bin/pip" install -q --disable-pip-version-check $train_deps \
            || die "pip install of the train extra into $train_env failed (GZX_TRAIN_TESTS=0 skips it)"
        touch "$train_env/.gzx-complete"
    fi
    "$train_env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$pth"
    .venv/bin/python -c 'import torch, torchvision' \
        || die "torch/torchvision from $train_env do not import in .venv"
else
    rm -f "$pth"
fi

# --- 2. chromium for the browser tests
if [ "${GZX_BROWSER_TESTS:-1}" != 0 ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        log "installing Debian's chromium for the browser tests (GZX_BROWSER_TESTS=0 skips this)"
        export DEBIAN_FRONTEND=noninteractive
        mkdir -p .services
        apt_log=.services/apt-chromium.log
        if ! { apt-get -o DPkg::Lock::Timeout=300 update -qq &&
            apt-get -o DPkg::Lock::Timeout=300 install -y -qq chromium; } >"$apt_log" 2>&1 </dev/null; then
            tail -n 40 "$apt_log" >&2
            die "apt-get install chromium failed, log above (GZX_BROWSER_TESTS=0 runs without browser tests)"
        fi
        [ -x /usr/bin/chromium ] || die "chromium installed but /usr/bin/chromium is missing"
    else
        # Not root: installing is best effort, so go on without it; the browser
        # tests skip themselves when /usr/bin/chromium is missing.
        log "/usr/bin/chromium is missing and we are not root: browser tests will be skipped"
    fi
fi

# --- 3. PostgreSQL and Redis
services=$(bash scripts/test-services.sh) || die "scripts/test-services.sh failed (see above)"
eval "$services"

stop_started_services() {
    local s
    [ "${GZX_TEST_KEEP_SERVICES:-0}" != 0 ] && return 0
    for s in ${GZX_TEST_SERVICES_STARTED:-}; do
        bash scripts/test-services.sh stop "$s" || log "could not stop the throwaway $s"
    done
}
trap stop_started_services EXIT

# --- 4. pytest
[ "$#" -gt 0 ] || set -- -q
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" = 5 ]; then
    log "pytest collected no tests: that is a failure"
    exit 1
fi
exit "$rc"
