#!/usr/bin/env python3
"""Runs one distributed `airlock bench e2e` and prints what it cost per job, which at a fixed
offered rate is far steadier than throughput at max rate on a shared 2-core machine:

- CPU of the replicas (`airlock serve --role ...` children of the bench, sampled every 50 ms
  from /proc until they exit; the bench's load generator and raw JetStream loop are not
  counted);
- CPU of PostgreSQL (the postmaster's own and reaped backends' time plus its live children's);
- WAL bytes and transactions (all databases).

Each is divided by `submitted + completed` (one unit of work is one submit or one completion).

    scripts/e2e_costs.py ./airlock --store postgres://postgres@127.0.0.1:5432/test \
        --seconds 8 --rate 800 --workers 32 --submitters 8
"""
import glob
import os
import re
import subprocess
import sys
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid, children_too):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime (fields 14-17 of proc(5), counted after the command name)
    return sum(int(x) for x in fields[11 : 15 if children_too else 13]) / TICK


def postgres_cpu():
    pid = open(glob.glob("/var/run/postgresql/*.pid")[0]).readline().strip()
    total = cpu_seconds(pid, True)
    for child in subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split():
        try:
            total += cpu_seconds(child, False)
        except FileNotFoundError:
            pass
    return total


def psql(query):
    argv = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-Atc", query]
    return float(subprocess.check_output(argv).decode())


def counters():
    wal = psql("SELECT pg_current_wal_lsn() - '0/0'")
    xacts = psql("SELECT sum(xact_commit + xact_rollback) FROM pg_stat_database")
    return postgres_cpu(), wal, xacts


replicas = {}
done = threading.Event()


def sample_replicas():
    while not done.is_set():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline").read()
                if "serve" in cmdline and "--role" in cmdline:
                    replicas[pid] = cpu_seconds(pid, False)
            except (FileNotFoundError, ProcessLookupError):
                pass
        time.sleep(0.05)


binary, args = sys.argv[1], sys.argv[2:]
threading.Thread(target=sample_replicas, daemon=True).start()
before = counters()
run = subprocess.run([binary, "bench", "e2e", *args], capture_output=True, text=True)
after = counters()
done.set()
out = run.stdout + run.stderr
found = re.search(r"median ([\d.]+) jobs/s completed \(runs \[[^]]*\]; (\d+) submitted", out)
if run.returncode != 0 or not found:
    sys.exit(f"the bench failed:\n{out}")
rate, submitted = float(found.group(1)), int(found.group(2))
units = submitted + rate * float(args[args.index("--seconds") + 1])
pg, wal, xacts = (a - b for a, b in zip(after, before))
print(
    f"{binary} completed {rate:.0f}/s, submitted {submitted}; per submit or completion: "
    f"replicas {1000 * sum(replicas.values()) / units:.3f} ms CPU, PostgreSQL {1000 * pg / units:.3f} ms CPU, "
    f"{wal / units:.0f} B WAL, {xacts / units:.2f} transactions"
)
