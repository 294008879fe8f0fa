#!/bin/sh
# An `airlock worker --exec` command: governs an existing script without code changes.
#
#   AIRLOCK_URL=http://127.0.0.1:8080 AIRLOCK_API_KEY=<worker key> \
#     airlock worker --pool default --exec examples/worker/vm-create.sh --ledger vm-effects.jsonl
#
# The job's JSON arrives on stdin (job_id, attempt, idempotency_key, topic, env, labels, payload,
# job_hash, gate_b); the outcome is the exit status:
#   0   success; stdout is the result (JSON if it parses, else a string)
#   75  retryable failure (EX_TEMPFAIL): the job is requeued while attempts are left
#   *   failure; the end of stderr is the error
# A cancelled job or a lost lease kills this script and everything it started.
set -eu

job=$(cat)
case "$job" in
  *'"topic":"infra.vm.create"'*) ;;
  *) echo "this script only creates VMs" >&2; exit 2 ;;
esac

# Pass the effect key on as the API's idempotency token: if the worker dies after the VM was
# created but before the result was recorded, the retry creates nothing new. Here a stand-in
# "cloud" that keeps one file per token plays the API.
cloud=${VM_CLOUD_DIR:-/tmp/airlock-example-cloud}
mkdir -p "$cloud"
vm="$cloud/$(printf '%s' "$AIRLOCK_EFFECT_KEY" | cksum | cut -d ' ' -f 1)"
if [ ! -e "$vm" ]; then
  if [ -e "$cloud/outage" ]; then
    echo "the cloud API is unavailable" >&2
    exit 75
  fi
  echo "vm-$(date +%s)" > "$vm"
fi
printf '{"vm": "%s", "attempt": %s}\n' "$(cat "$vm")" "$AIRLOCK_ATTEMPT"
