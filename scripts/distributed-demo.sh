#!/usr/bin/env bash
# Why this exists: a runnable, tested example of Airlock's distributed mode (docs/OPERATIONS.md).
# On loopback against a local PostgreSQL it starts 2 gateway and 2 scheduler replicas
# (`airlock serve --store URL --role gateway|scheduler`), 2 `airlock worker --exec` workers
# on the scheduler replicas, submits jobs across the gateways, waits until all succeeded,
# prints a summary and verifies the audit chain through the API. Everything it starts is
# stopped by PID and the schema it created is dropped at exit. Exit 0 means it all worked.
# crates/airlock/tests/distributed_faults.rs runs it.
#
# Environment: AIRLOCK_BIN (default target/release/airlock, built if missing),
# AIRLOCK_DEMO_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test),
# AIRLOCK_DEMO_JOBS (default 50), AIRLOCK_DEMO_TIMEOUT (seconds to wait for the jobs, default 60).
set -euo pipefail

BIN=${AIRLOCK_BIN:-target/release/airlock}
BASE_URL=${AIRLOCK_DEMO_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
JOBS=${AIRLOCK_DEMO_JOBS:-50}
TIMEOUT=${AIRLOCK_DEMO_TIMEOUT:-60}
SCHEMA="airlock_demo_$$"
ADMIN_KEY="demo-admin-key-$$-$(date +%s%N)"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/airlock-demo.XXXXXX")
PIDS=()
SCHEMA_CREATED=0

say() { printf '[demo] %s\n' "$*"; }
die() {
    printf '[demo] FAILED: %s\n' "$*" >&2
    for log in "$WORK"/*.log; do
        [ -s "$log" ] && { printf -- '--- %s (last lines)\n' "$log" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}

cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$SCHEMA_CREATED" = 1 ]; then
        psql "$BASE_URL" -q -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -x "$BIN" ]; then
    say "no binary at $BIN: building it (cargo build --release -p airlock)"
    cargo build --release -p airlock
    BIN=target/release/airlock
fi
command -v psql >/dev/null || die "psql is needed to create the demo schema"
command -v curl >/dev/null || die "curl is needed"

psql "$BASE_URL" -q -c "CREATE SCHEMA $SCHEMA" >/dev/null ||
    die "PostgreSQL is not reachable at $BASE_URL (set AIRLOCK_DEMO_POSTGRES_URL)"
SCHEMA_CREATED=1
case "$BASE_URL" in *\?*) SEP='&' ;; *) SEP='?' ;; esac
STORE="${BASE_URL}${SEP}options=-csearch_path%3D${SCHEMA}"
say "store: $BASE_URL, schema $SCHEMA"

# start_replica NAME ROLE: starts one replica with `--role ROLE`, sets REPLICA_ADDR to its
# host:port. (Not called through $(...): the PID must be recorded in this shell.)
start_replica() {
    local name=$1 role=$2
    local log="$WORK/$name.log"
    # Created here, not only by the background job's redirection, which may run after the
    # first read below.
    : >"$log"
    AIRLOCK_ADMIN_KEY="$ADMIN_KEY" RUST_LOG=warn \
        "$BIN" serve --store "$STORE" --listen 127.0.0.1:0 --role "$role" >"$log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 150); do
        local addr
        addr=$(sed -n 's/^airlock listening on http:\/\/\([^ ]*\).*/\1/p' "$log" | head -n 1)
        if [ -n "$addr" ]; then
            REPLICA_ADDR=$addr
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "replica $name exited before listening"
        sleep 0.1
    done
    die "replica $name did not listen within 15 s"
}

# The first start creates the tables and the admin key; the others find both.
start_replica gateway-1 gateway
GW1=$REPLICA_ADDR
start_replica gateway-2 gateway
GW2=$REPLICA_ADDR
start_replica scheduler-1 scheduler
SC1=$REPLICA_ADDR
start_replica scheduler-2 scheduler
SC2=$REPLICA_ADDR
say "gateways $GW1 $GW2; schedulers $SC1 $SC2"
for addr in "$GW1" "$GW2" "$SC1" "$SC2"; do
    curl -fsS "http://$addr/readyz" >/dev/null || die "replica $addr is not ready"
done

# new_key NAME ROLE: creates an API key through a gateway, prints it.
new_key() {
    local out
    out=$(AIRLOCK_URL="http://$GW1" AIRLOCK_API_KEY="$ADMIN_KEY" \
        "$BIN" keys create --tenant demo --name "$1" --role "$2" --format json) || die "cannot create key $1"
    printf '%s' "$out" | tr -d '\n' | sed -n 's/.*"key"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p'
}
AGENT_KEY=$(new_key agent submitter)
WORKER_KEY=$(new_key worker worker)
[ -n "$AGENT_KEY" ] && [ -n "$WORKER_KEY" ] || die "no key in the keys create output"

# Two workers, one per scheduler replica; the job's JSON arrives on stdin.
i=0
for addr in "$SC1" "$SC2"; do
    i=$((i + 1))
    AIRLOCK_API_KEY="$WORKER_KEY" RUST_LOG=warn "$BIN" worker --pool default --wait-ms 1000 \
        --name "demo-worker-$i" --url "http://$addr" \
        --exec 'cat >/dev/null; echo "{\"done_by\": \"'"demo-worker-$i"'\"}"' >"$WORK/worker-$i.log" 2>&1 &
    PIDS+=($!)
done

say "submitting $JOBS jobs across the two gateways"
IDS=()
for n in $(seq 1 "$JOBS"); do
    if [ $((n % 2)) = 1 ]; then gw=$GW1; else gw=$GW2; fi
    out=$(AIRLOCK_URL="http://$gw" AIRLOCK_API_KEY="$AGENT_KEY" "$BIN" submit --topic infra.vm.create \
        --env dev --payload "{\"n\": $n}" --idempotency-key "demo-$n" --format json) ||
        die "submit $n to $gw failed: $out"
    id=$(printf '%s' "$out" | tr -d '\n' | sed -n 's/.*"job_id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
    [ -n "$id" ] || die "no job id in: $out"
    IDS+=("$id")
done

# state_of ID: the job's state, read through a gateway (a scheduler serves only the worker protocol).
state_of() {
    curl -fsS -H "authorization: Bearer $AGENT_KEY" "http://$GW2/api/v1/jobs/$1" 2>/dev/null |
        tr -d '\n' | sed -n 's/.*"state"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p'
}

say "waiting for all $JOBS jobs to succeed (at most ${TIMEOUT} s)"
deadline=$((SECONDS + TIMEOUT))
pending=("${IDS[@]}")
while [ "${#pending[@]}" -gt 0 ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "${#pending[@]} jobs not succeeded after ${TIMEOUT} s"
    still=()
    for id in "${pending[@]}"; do
        state=$(state_of "$id") || state=unknown
        case "$state" in
            succeeded) ;;
            queued | leased | unknown) still+=("$id") ;;
            *) die "job $id ended $state" ;;
        esac
    done
    pending=("${still[@]+"${still[@]}"}")
    [ "${#pending[@]}" -eq 0 ] || sleep 0.5
done

metric() { curl -fsS "http://$1/metrics" | sed -n "s/^$2 \(.*\)/\1/p" | head -n 1; }
done_1=$(grep -c ' attempt [0-9]*: succeeded' "$WORK/worker-1.log" || true)
done_2=$(grep -c ' attempt [0-9]*: succeeded' "$WORK/worker-2.log" || true)
verify=$(curl -fsS -X POST -H "authorization: Bearer $ADMIN_KEY" "http://$GW2/api/v1/audit/verify") ||
    die "audit verify failed"
printf '%s' "$verify" | tr -d ' \n' | grep -q '^{"ok":true' || die "audit chain does not verify: $verify"

say "summary"
say "  jobs submitted     $JOBS (odd to $GW1, even to $GW2, idempotency keys demo-1..demo-$JOBS)"
say "  jobs succeeded     $(metric "$SC1" 'airlock_jobs{state="succeeded"}') (store-wide gauge, read from $SC1)"
say "  jobs per worker    demo-worker-1 (via $SC1): $done_1, demo-worker-2 (via $SC2): $done_2"
say "  audit chain        ok ($verify)"
say "done: all $JOBS jobs succeeded and the audit chain verifies"
