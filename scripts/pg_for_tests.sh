#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the library tests (issue 19): Debian's packages, a fresh
# data directory, a free localhost port, trust auth for local connections only. Prints the
# line to export, e.g.
#   eval "$(scripts/pg_for_tests.sh)"   # sets EVOLVING_RL_TEST_PG=postgresql://...
# Stop it with: scripts/pg_for_tests.sh stop DATADIR  (DATADIR is printed as a comment).
# PG_BIN=/path/to/bin uses other PostgreSQL binaries, e.g. a build that ships pgvector (the
# `pgserver` wheel's pgserver/pginstall/bin: Debian's bookworm packages have no pgvector);
# PG_ENV names the variable to set (default EVOLVING_RL_TEST_PG; the pgvector tests read
# EVOLVING_RL_TEST_PGVECTOR).
set -euo pipefail
# --pgvector: take the binaries (PostgreSQL 16 + pgvector 0.6) from the `pgserver` wheel on PyPI,
# unpacked once under /tmp/evolving-rl-pgserver, and set EVOLVING_RL_TEST_PGVECTOR.
if [[ "${1:-}" == "--pgvector" ]]; then
  py="${PYTHON:-python3}"
  cache=/tmp/evolving-rl-pgserver
  if [[ ! -x "$cache/x/pgserver/pginstall/bin/postgres" ]]; then
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$cache" pgserver==0.1.4 >&2
    "$py" -c "import sys, zipfile, glob; zipfile.ZipFile(glob.glob(sys.argv[1] + '/pgserver-*.whl')[0]).extractall(sys.argv[1] + '/x')" "$cache"
    chmod -R a+rX "$cache" && chmod a+x "$cache"/x/pgserver/pginstall/bin/*
  fi
  export PG_BIN="$cache/x/pgserver/pginstall/bin" PG_ENV=EVOLVING_RL_TEST_PGVECTOR
  shift
fi
pg_bin() { if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; else ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1; fi; }

if [[ "${1:-}" == "stop" ]]; then
  dir="${2:?give the data directory printed at start}"
  bin=$(pg_bin)
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir" -m fast stop >/dev/null
  parent=$(dirname "$dir")
  [[ "$parent" == /tmp/evolving-rl-pg.* ]] && rm -rf "$parent"  # only what this script made
  exit 0
fi

if [[ -z "${PG_BIN:-}" ]] && ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "PostgreSQL is not installed and this is not root: apt-get install -y postgresql" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
bin=$(pg_bin)
# initdb refuses to run as root: run the server as the `postgres` user the package creates.
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then useradd --system --no-create-home postgres; fi

dir=$(mktemp -d /tmp/evolving-rl-pg.XXXXXX)
[[ $(id -u) -eq 0 ]] && chown postgres "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100" start >/dev/null
echo "export ${PG_ENV:-EVOLVING_RL_TEST_PG}=postgresql://postgres@127.0.0.1:$port/postgres"
echo "# data directory: $dir/data (stop: scripts/pg_for_tests.sh stop $dir/data)"
