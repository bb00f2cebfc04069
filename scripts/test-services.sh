#!/usr/bin/env bash
# Make sure a PostgreSQL and a Redis are reachable for the test suite, then
# print (on stdout, and only there) the lines to eval:
#
#   export GZX_TEST_DATABASE_URL=postgresql+psycopg://...
#   export GZX_TEST_REDIS_URL=redis://...
#   export GZX_TEST_SERVICES_STARTED='...'   # throwaways started by this run
#
# Usage:
#   eval "$(bash scripts/test-services.sh)"   # find or start the services
#   bash scripts/test-services.sh stop [pg|redis]   # stop the throwaways in .services/
#
# Order, for each service:
#   (a) GZX_TEST_DATABASE_URL / GZX_TEST_REDIS_URL already set and reachable;
#   (b) the machine's server on 127.0.0.1:5432 / 127.0.0.1:6379 (started with the
#       machine's own command when it is installed but down and we are root);
#   (c) a throwaway server from the installed binaries in .services/pg or
#       .services/redis on a free port (reused on the next run while it answers);
#   (d) no server binaries: apt-get install them (root only), then (c).
# GZX_TEST_FORCE_THROWAWAY=1 skips (a) and (b), to exercise the fallback path.
#
# Every diagnostic goes to stderr; any failure exits non-zero with a message.
set -euo pipefail

# Keep stdout for the export lines only: everything else goes to stderr.
exec 3>&1 1>&2

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVICES="$ROOT/.services"
PG_DB=gzx_test
REDIS_DB=15
FORCE_THROWAWAY=${GZX_TEST_FORCE_THROWAWAY:-0}
[ "$FORCE_THROWAWAY" = 0 ] && FORCE_THROWAWAY=
STARTED=()

log() { echo "test-services: $*" >&2; }
die() { echo "test-services: ERROR: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

APT_UPDATED=
apt_install() {
    is_root || die "$* not installed and not root: install it (apt-get install -y $*) or set the GZX_TEST_* URLs"
    command -v apt-get >/dev/null || die "$* not installed and no apt-get to install it with"
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "$APT_UPDATED" ]; then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=300 update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" \
        || die "apt-get install $* failed"
}

free_port() {
    if command -v python3 >/dev/null; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    local p
    for p in $(seq 20000 20500); do
        if ! (exec 5<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    die "no free TCP port found"
}

# Run a command that leaves a daemon behind without handing it our private
# descriptors: fd 3 (the real stdout, maybe a $(...) pipe that would then never
# see EOF) and fd 9 (the lock, that would then never be released).
detached() { "$@" 3>&- 9>&-; }

pid_alive() { # running and not a zombie (PID 1 here may not reap orphans)
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

pid_not_alive() { ! pid_alive "$1"; }

wait_until() { # wait_until SECONDS CMD... : retry CMD every 0.2 s
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}

# ---------------------------------------------------------------- PostgreSQL
PG_BIN=
find_pg_server_bin() { # newest /usr/lib/postgresql/*/bin with initdb and pg_ctl, else PATH
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then PG_BIN=$d; return 0; fi
    done
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        PG_BIN=$(dirname "$(command -v initdb)"); return 0
    fi
    return 1
}

pg_tool() { # pg_tool NAME: path of a client tool (PATH first, then the server bin dirs)
    local d
    if command -v "$1" >/dev/null; then command -v "$1"; return 0; fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/$1" ]; then echo "$d/$1"; return 0; fi
    done
    return 1
}

ensure_pg_client() {
    PSQL=$(pg_tool psql) && PG_ISREADY=$(pg_tool pg_isready) && return 0
    apt_install postgresql-client
    PSQL=$(pg_tool psql) && PG_ISREADY=$(pg_tool pg_isready) || die "psql/pg_isready still missing after install"
}

libpq_url() { # SQLAlchemy URL -> libpq URL
    local u=$1
    u=${u/#postgresql+psycopg:/postgresql:}
    u=${u/#postgresql+psycopg2:/postgresql:}
    u=${u/#postgres:/postgresql:}
    echo "$u"
}

pg_url_works() { # pg_url_works URL: can we run a query there?
    "$PSQL" -X -q -tA -d "$(libpq_url "$1")" -c 'select 1' >/dev/null 2>&1 </dev/null
}

pg_ensure_db() { # pg_ensure_db HOST PORT: create $PG_DB if missing
    local host=$1 port=$2 have
    have=$("$PSQL" -X -tA -U postgres -h "$host" -p "$port" -d postgres \
        -c "select 1 from pg_database where datname = '$PG_DB'" </dev/null) || return 1
    [ "$have" = 1 ] && return 0
    log "creating database $PG_DB on $host:$port"
    if ! "$PSQL" -X -q -U postgres -h "$host" -p "$port" -d postgres \
        -c "create database $PG_DB" </dev/null >/dev/null; then
        # Lost a race with a concurrent run? Then it exists now.
        have=$("$PSQL" -X -tA -U postgres -h "$host" -p "$port" -d postgres \
            -c "select 1 from pg_database where datname = '$PG_DB'" </dev/null) || return 1
        [ "$have" = 1 ] || return 1
    fi
}

pg_try_machine() { # (b): the machine's cluster on 127.0.0.1:5432
    if ! "$PG_ISREADY" -q -h 127.0.0.1 -p 5432 -t 3; then
        local version
        version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
        if is_root && command -v pg_ctlcluster >/dev/null && [ -n "$version" ] \
            && [ -d "/etc/postgresql/$version/main" ]; then
            log "PostgreSQL $version/main is installed but down: starting it"
            detached pg_ctlcluster --skip-systemctl-redirect "$version" main start \
                || { log "pg_ctlcluster $version main start failed"; return 1; }
            wait_until 30 "$PG_ISREADY" -q -h 127.0.0.1 -p 5432 -t 1 \
                || { log "PostgreSQL $version/main started but does not answer on 127.0.0.1:5432"; return 1; }
        else
            return 1
        fi
    fi
    if ! pg_ensure_db 127.0.0.1 5432; then
        log "127.0.0.1:5432 answers but user postgres cannot connect (trust auth?) or create $PG_DB"
        return 1
    fi
    PG_URL="postgresql+psycopg://postgres@127.0.0.1:5432/$PG_DB"
}

# Running as root: the throwaway postgres runs as the 'postgres' system user.
as_pg_user() {
    if is_root; then
        (cd / && setpriv --reuid=postgres --regid=postgres --init-groups -- "$@")
    else
        "$@"
    fi
}

ensure_postgres_user() {
    is_root || return 0
    command -v setpriv >/dev/null || die "setpriv (util-linux) is needed to run postgres as a non-root user"
    if ! id postgres >/dev/null 2>&1; then
        log "creating system user postgres"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin postgres || die "could not create user postgres"
    fi
}

pg_state_dir() { # where the throwaway cluster lives: .services/pg, unless postgres cannot reach it
    local d="$SERVICES/pg"
    if [ -f "$d/datadir" ]; then cat "$d/datadir"; return; fi
    mkdir -p "$d"
    if is_root && ! setpriv --reuid=postgres --regid=postgres --init-groups -- test -x "$d" 2>/dev/null; then
        # The checkout is not traversable by the postgres user (e.g. under /root).
        local alt
        alt=$(mktemp -d "${TMPDIR:-/tmp}/gzx-test-pg.XXXXXX")
        chmod 755 "$alt"
        log "postgres cannot reach $d: keeping the throwaway cluster in $alt"
        echo "$alt" >"$d/datadir"
        echo "$alt"
        return
    fi
    echo "$d"
}

pg_throwaway_running() { # pg_throwaway_running DIR: answers on its recorded port?
    local dir=$1 port
    [ -f "$dir/port" ] && [ -f "$dir/data/postmaster.pid" ] || return 1
    port=$(cat "$dir/port")
    "$PG_ISREADY" -q -h 127.0.0.1 -p "$port" -t 2
}

pg_throwaway() { # (c)/(d)
    if ! find_pg_server_bin; then
        apt_install postgresql
        find_pg_server_bin || die "no initdb/pg_ctl under /usr/lib/postgresql/*/bin even after installing postgresql"
    fi
    ensure_pg_client
    ensure_postgres_user
    local dir port
    dir=$(pg_state_dir)
    if pg_throwaway_running "$dir"; then
        port=$(cat "$dir/port")
        log "reusing the throwaway PostgreSQL in $dir on port $port"
    else
        if [ ! -f "$dir/data/PG_VERSION" ]; then
            log "initdb $dir/data ($PG_BIN)"
            rm -rf "$dir/data"
            mkdir -p "$dir/data"
            is_root && chown -R postgres:postgres "$dir"
            chmod 700 "$dir/data"
            as_pg_user "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 \
                --no-locale --no-sync >"$dir/initdb.log" 2>&1 \
                || { cat "$dir/initdb.log" >&2; die "initdb failed (log above)"; }
            cat >>"$dir/data/postgresql.conf" <<'EOF'
# gzx throwaway test cluster
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
        else
            # A stopped, hung or crashed leftover: stop whatever is left of it, then start anew.
            pg_stop_data_dir "$dir/data" immediate || true
        fi
        port=$(free_port)
        is_root && chown -R postgres:postgres "$dir"
        log "starting a throwaway PostgreSQL in $dir on port $port"
        if ! detached as_pg_user "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" \
            -o "-p $port" -w -t 60 start >/dev/null; then
            tail -n 30 "$dir/postgres.log" >&2 || true
            die "the throwaway PostgreSQL did not start (log: $dir/postgres.log)"
        fi
        echo "$port" >"$dir/port"
        STARTED+=(pg)
    fi
    pg_ensure_db 127.0.0.1 "$port" || die "cannot create database $PG_DB on the throwaway PostgreSQL (port $port)"
    PG_URL="postgresql+psycopg://postgres@127.0.0.1:$port/$PG_DB"
}

pg_stop_data_dir() { # pg_stop_data_dir DATA MODE: stop its postmaster, if any; clear a stale lock
    local data=$1 mode=$2 pid
    [ -f "$data/postmaster.pid" ] || return 0
    pid=$(head -n 1 "$data/postmaster.pid")
    if [ -n "$pid" ] && pid_alive "$pid"; then
        as_pg_user "$PG_BIN/pg_ctl" -D "$data" stop -m "$mode" -w -t 60 >/dev/null || return 1
    fi
    # Dead, or a zombie nobody reaps: postgres would take a zombie's lock for a live one.
    rm -f "$data/postmaster.pid"
}

pg_stop_throwaway() {
    local dir="$SERVICES/pg"
    [ -f "$dir/datadir" ] && dir=$(cat "$dir/datadir")
    [ -f "$dir/data/postmaster.pid" ] || { log "no throwaway PostgreSQL running in $dir"; return 0; }
    find_pg_server_bin || die "no pg_ctl to stop $dir/data with"
    log "stopping the throwaway PostgreSQL in $dir"
    pg_stop_data_dir "$dir/data" fast || die "pg_ctl stop failed for $dir/data"
}

setup_postgres() {
    ensure_pg_client
    if [ -z "$FORCE_THROWAWAY" ] && [ -n "${GZX_TEST_DATABASE_URL:-}" ]; then
        if pg_url_works "$GZX_TEST_DATABASE_URL"; then
            PG_URL=$GZX_TEST_DATABASE_URL
            log "PostgreSQL: using GZX_TEST_DATABASE_URL as set"
            return
        fi
        log "GZX_TEST_DATABASE_URL is set but does not answer: looking further"
    fi
    if [ -z "$FORCE_THROWAWAY" ] && pg_try_machine; then
        log "PostgreSQL: using the machine's server on 127.0.0.1:5432"
        return
    fi
    pg_throwaway
}

# --------------------------------------------------------------------- Redis
redis_ping() { # redis_ping HOST PORT [DB]
    local host=$1 port=$2 reply
    if command -v redis-cli >/dev/null; then
        reply=$(timeout 5 redis-cli -h "$host" -p "$port" ping 2>/dev/null </dev/null) || return 1
        [ "$reply" = PONG ]
        return
    fi
    # No redis-cli: speak RESP over bash's /dev/tcp.
    (
        exec 5<>"/dev/tcp/$host/$port" || exit 1
        printf 'PING\r\n' >&5
        IFS= read -r -t 5 reply <&5 || exit 1
        [ "${reply%$'\r'}" = "+PONG" ]
    ) 2>/dev/null
}

redis_url_ping() { # redis_url_ping URL
    if command -v redis-cli >/dev/null; then
        local reply
        reply=$(timeout 5 redis-cli -u "$1" ping 2>/dev/null </dev/null) || return 1
        [ "$reply" = PONG ]
        return
    fi
    local rest=${1#*://}
    rest=${rest##*@}
    rest=${rest%%/*}
    local host=${rest%:*} port=6379
    [ "$rest" != "$host" ] && port=${rest##*:}
    redis_ping "$host" "$port"
}

redis_try_machine() { # (b): the machine's Redis on 127.0.0.1:6379
    if ! redis_ping 127.0.0.1 6379; then
        command -v redis-server >/dev/null || return 1
        is_root || return 1
        log "Redis is installed but 127.0.0.1:6379 is down: starting it with the machine's command"
        mkdir -p /var/lib/redis /var/log/redis
        detached redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
            --dir /var/lib/redis --logfile /var/log/redis/ci.log \
            || { log "redis-server on 6379 did not start"; return 1; }
        wait_until 15 redis_ping 127.0.0.1 6379 \
            || { log "redis-server on 6379 started but does not answer"; return 1; }
    fi
    REDIS_URL="redis://127.0.0.1:6379/$REDIS_DB"
}

redis_throwaway() { # (c)/(d)
    if ! command -v redis-server >/dev/null; then
        apt_install redis-server
        command -v redis-server >/dev/null || die "redis-server still missing after installing it"
    fi
    local dir="$SERVICES/redis" port
    mkdir -p "$dir"
    if [ -f "$dir/port" ] && [ -f "$dir/redis.pid" ] && redis_ping 127.0.0.1 "$(cat "$dir/port")"; then
        port=$(cat "$dir/port")
        log "reusing the throwaway Redis in $dir on port $port"
    else
        port=$(free_port)
        rm -f "$dir/redis.pid"
        log "starting a throwaway Redis in $dir on port $port"
        detached redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
            --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
            || die "redis-server did not start (log: $dir/redis.log)"
        if ! wait_until 15 redis_ping 127.0.0.1 "$port"; then
            tail -n 30 "$dir/redis.log" >&2 || true
            die "the throwaway Redis on port $port does not answer (log: $dir/redis.log)"
        fi
        echo "$port" >"$dir/port"
        STARTED+=(redis)
    fi
    REDIS_URL="redis://127.0.0.1:$port/$REDIS_DB"
}

redis_stop_throwaway() {
    local dir="$SERVICES/redis" pid
    [ -f "$dir/redis.pid" ] || { log "no throwaway Redis running in $dir"; return 0; }
    pid=$(cat "$dir/redis.pid")
    log "stopping the throwaway Redis in $dir (pid $pid)"
    if pid_alive "$pid"; then
        kill -TERM "$pid"
        wait_until 15 pid_not_alive "$pid" || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/redis.pid"
}

setup_redis() {
    if [ -z "$FORCE_THROWAWAY" ] && [ -n "${GZX_TEST_REDIS_URL:-}" ]; then
        if redis_url_ping "$GZX_TEST_REDIS_URL"; then
            REDIS_URL=$GZX_TEST_REDIS_URL
            log "Redis: using GZX_TEST_REDIS_URL as set"
            return
        fi
        log "GZX_TEST_REDIS_URL is set but does not answer: looking further"
    fi
    if [ -z "$FORCE_THROWAWAY" ] && redis_try_machine; then
        log "Redis: using the machine's server on 127.0.0.1:6379"
        return
    fi
    redis_throwaway
}

# ---------------------------------------------------------------------- main
mkdir -p "$SERVICES"
# One run at a time per checkout, so that concurrent runs share one throwaway.
if command -v flock >/dev/null; then
    exec 9>"$SERVICES/.lock"
    flock -w 300 9 || die "timed out waiting for $SERVICES/.lock"
fi

case "${1:-start}" in
start) ;;
stop)
    case "${2:-all}" in
    pg) pg_stop_throwaway ;;
    redis) redis_stop_throwaway ;;
    all) pg_stop_throwaway; redis_stop_throwaway ;;
    *) die "usage: $0 stop [pg|redis|all]" ;;
    esac
    exit 0
    ;;
*) die "usage: $0 [start|stop [pg|redis|all]]" ;;
esac

[ -n "$FORCE_THROWAWAY" ] && log "GZX_TEST_FORCE_THROWAWAY is set: skipping the configured and the machine's servers"
PG_URL=
REDIS_URL=
setup_postgres
setup_redis
[ -n "$PG_URL" ] || die "no PostgreSQL for the tests"
[ -n "$REDIS_URL" ] || die "no Redis for the tests"
log "GZX_TEST_DATABASE_URL=$PG_URL"
log "GZX_TEST_REDIS_URL=$REDIS_URL"

printf 'export GZX_TEST_DATABASE_URL=%q\n' "$PG_URL" >&3
printf 'export GZX_TEST_REDIS_URL=%q\n' "$REDIS_URL" >&3
printf 'export GZX_TEST_SERVICES_STARTED=%q\n' "${STARTED[*]:-}" >&3
