#!/usr/bin/env python3
"""A fixed-count end-to-end load, for counting instructions rather than timing (BENCHMARKS.md,
"Where the exact-gates regression went").

    python3 scripts/fixed_load.py ./target/release/airlock [--jobs 2000] [--submitters 8] [--workers 16]
        [--callgrind OUT | --perf-stat OUT | --strace OUT]

Starts `airlock serve` (embedded store, the bench policy of `airlock bench e2e`) on loopback,
creates a submitter and a worker key, then runs two phases, each waited for to the end:
1. submits: `--jobs` submits of the bench's job over `--submitters` connections;
2. claims: `--workers` connections claim (long-poll) and complete until every job is completed.

With `--callgrind OUT` the server runs under `valgrind --tool=callgrind` and the counters are
dumped after setup (OUT.1), after the submits (OUT.2) and after the claims (OUT.3), so that
`callgrind_annotate OUT.2` is the submits' cost alone. The count does not depend on the
machine's load, unlike the time. With `--perf-stat OUT` the server runs under `perf stat` (CPU
time, context switches), with `--strace OUT` under `strace -f -c` (system calls by kind; the
whole run, setup included).
"""

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

ADMIN = "fixed-load-admin-key-0123456789"

# The policy `airlock bench e2e` serves (bench_cmd.rs, ALLOW_ALL).
POLICY = """version: v1
defaults: { decision: allow }
rules:
  - id: deny-public-ingress
    when: { topic: infra.security_group.update, env: production, cidr: "0.0.0.0/0" }
    decision: deny
"""


class Conn:
    def __init__(self, addr, key):
        host, port = addr.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=600)
        self.key = key

    def post(self, path, body):
        headers = {"authorization": f"Bearer {self.key}", "content-type": "application/json"}
        self.conn.request("POST", path, body=json.dumps(body), headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read().decode()


def run_threads(count, target):
    errors = []

    def guarded(i):
        try:
            target(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--submitters", type=int, default=8)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--callgrind", metavar="OUT")
    parser.add_argument("--perf-stat", metavar="OUT")
    parser.add_argument("--strace", metavar="OUT")
    args = parser.parse_args()

    data = tempfile.mkdtemp(prefix="fixed-load-")
    policy = os.path.join(data, "policy.yaml")
    with open(policy, "w") as f:
        f.write(POLICY)
    wrap = []
    if args.callgrind:
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={args.callgrind}", "--dump-instr=no"]
    elif args.perf_stat:
        wrap = ["perf", "stat", "-e", "task-clock,context-switches", "-o", args.perf_stat]
    elif args.strace:
        wrap = ["strace", "-f", "-c", "-o", args.strace]
    server = subprocess.Popen(
        wrap + [args.binary, "serve", "--listen", "127.0.0.1:0", "--data", os.path.join(data, "store"),
                "--policy", policy],
        env={**os.environ, "AIRLOCK_ADMIN_KEY": ADMIN, "RUST_LOG": "error"},
        stdout=subprocess.PIPE,
        text=True,
    )

    def dump():
        if args.callgrind:
            subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, stdout=subprocess.DEVNULL)

    try:
        line = server.stdout.readline()
        addr = line.split("http://")[1].split()[0]
        threading.Thread(target=server.stdout.read, daemon=True).start()
        admin = Conn(addr, ADMIN)
        keys = {}
        for name, role in (("worker", "worker"), ("agent", "submitter")):
            status, text = admin.post("/api/v1/keys", {"tenant": "bench", "name": name, "roles": [role]})
            assert status == 201, text
            keys[name] = json.loads(text)["key"]
        dump()

        counter = iter(range(args.jobs))
        lock = threading.Lock()

        def submit(_):
            conn = Conn(addr, keys["agent"])
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"topic": "infra.vm.create", "env": "production", "payload": {"n": i}}
                status, text = conn.post("/api/v1/jobs", body)
                assert status == 202, text

        started = time.perf_counter()
        run_threads(args.submitters, submit)
        submitted = time.perf_counter() - started
        dump()

        completed = [0]

        def work(_):
            conn = Conn(addr, keys["worker"])
            while True:
                with lock:
                    if completed[0] >= args.jobs:
                        return
                status, text = conn.post("/api/v1/workers/claim", {"wait_ms": 200})
                if status == 204:
                    continue
                assert status == 200, text
                claim = json.loads(text)
                status, text = conn.post(f"/api/v1/workers/jobs/{claim['job_id']}/complete",
                                         {"lease_token": claim["lease_token"], "result": {"ok": True}})
                assert status == 200, text
                with lock:
                    completed[0] += 1

        started = time.perf_counter()
        run_threads(args.workers, work)
        claimed = time.perf_counter() - started
        dump()
        print(f"{args.jobs} jobs: submits {submitted:.1f} s, claims and completions {claimed:.1f} s")
    finally:
        if args.strace:
            # strace stopped by a signal writes no summary: stop the server it traces instead.
            traced = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True)
            for pid in traced.stdout.split():
                os.kill(int(pid), signal.SIGTERM)
        else:
            server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
