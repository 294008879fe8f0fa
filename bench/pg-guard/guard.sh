#!/usr/bin/env bash
# What the exact-gates guard costs a guarded write on PostgreSQL: the statement shape of a plain
# submit (one data-modifying CTE) without a guard, with migration v9's row lock, and with
# migration v10's shared advisory lock. Prints WAL bytes per transaction and tps for each.
# Usage: bench/pg-guard/guard.sh [clients] [transactions per client]
# Needs psql and pgbench on PATH and a PostgreSQL on 127.0.0.1:5432 with trust auth; creates
# and drops the scratch database airlock_guard_bench.
set -euo pipefail
cd "$(dirname "$0")"
clients=${1:-8} per=${2:-2000} db=airlock_guard_bench
export PGOPTIONS="-c client_min_messages=warning"
psql -qX -h 127.0.0.1 -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
trap 'psql -qX -h 127.0.0.1 -d postgres -c "DROP DATABASE IF EXISTS $db"' EXIT
psql -qX -h 127.0.0.1 -d "$db" -f setup.sql
lsn() { psql -qAtX -h 127.0.0.1 -d "$db" -c "SELECT pg_current_wal_insert_lsn()"; }
for variant in none rowlock advlock; do
  before=$(lsn)
  tps=$(pgbench -n -h 127.0.0.1 -c "$clients" -j 2 -t "$per" -f "$variant.sql" "$db" |
    sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  after=$(lsn)
  bytes=$(psql -qAtX -h 127.0.0.1 -d "$db" -c "SELECT pg_wal_lsn_diff('$after', '$before')")
  awk -v v="$variant" -v b="$bytes" -v n="$((clients * per))" -v t="$tps" \
    'BEGIN { printf "%-8s WAL bytes/txn %7.1f   tps %8.0f\n", v, b / n, t }'
done
