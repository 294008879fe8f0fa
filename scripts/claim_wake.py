#!/usr/bin/env python3
"""What a waiting long-poll claim costs and how soon a submit reaches it (BENCHMARKS.md,
"Long-poll claims: woken, not polling").

    python3 scripts/claim_wake.py ./target/release/airlock [--claims 64] [--seconds 10] [--samples 60]

Starts `airlock serve` (embedded store) on loopback and measures, for that binary:
1. the server's CPU time over `--seconds` with no request, then with `--claims` claims of one
   key waiting the whole time on an empty queue (and the claims' looks at the queue, when the
   binary counts them in `airlock_claim_looks_total`);
2. submit -> claim latency: one claim waits (wait_ms 30000), a job is submitted at a random
   moment, and the time from sending the submit to the claim's answer is taken, `--samples`
   times;
3. due -> claim latency: a job whose retry Gate B throttles (one dispatch per second) waits
   queued until its `not_before`, which nothing announces; the claim that put it back waits,
   and the time from `not_before` to the claim's answer is taken, `--samples` / 2 times.
"""

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ADMIN = "claim-wake-admin-key-0123456789"

# Default allow; one dispatch (and one submit) per second for `bench.throttled`.
POLICY = """version: v1
defaults: { decision: allow }
rules:
  - id: throttle-bench
    when: { topic: bench.throttled }
    decision: throttle
    limit: { rate: 1, per: 1s, key: [tenant, topic] }
"""


def call(addr, method, path, key, body=None):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, text


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def looks(addr):
    _, text = call(addr, "GET", "/metrics", "")
    for line in text.splitlines():
        if line.startswith("airlock_claim_looks_total"):
            return float(line.rsplit(" ", 1)[1])
    return None


def report(what, samples):
    samples = sorted(samples)
    p90 = samples[max(int(len(samples) * 0.9) - 1, 0)]
    print(f"{what} over {len(samples)} samples: p50 {statistics.median(samples):.2f} ms, "
          f"p90 {p90:.2f} ms, max {samples[-1]:.2f} ms")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--claims", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=60)
    args = parser.parse_args()

    data = tempfile.mkdtemp(prefix="claim-wake-")
    policy = os.path.join(data, "policy.yaml")
    with open(policy, "w") as f:
        f.write(POLICY)
    server = subprocess.Popen(
        [args.binary, "serve", "--listen", "127.0.0.1:0", "--data", os.path.join(data, "store"), "--policy", policy],
        env={**os.environ, "AIRLOCK_ADMIN_KEY": ADMIN, "RUST_LOG": "error"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        addr = line.split("http://")[1].split()[0]
        threading.Thread(target=server.stdout.read, daemon=True).start()
        keys = {}
        for name, role in (("worker", "worker"), ("agent", "submitter")):
            status, text = call(addr, "POST", "/api/v1/keys", ADMIN, {"tenant": "acme", "name": name, "roles": [role]})
            assert status == 201, text
            keys[name] = json.loads(text)["key"]

        # 1. Idle cost.
        time.sleep(1)
        before = cpu_seconds(server.pid)
        time.sleep(args.seconds)
        idle = cpu_seconds(server.pid) - before
        looks_before = looks(addr)
        before = cpu_seconds(server.pid)
        statuses = []

        def wait():
            statuses.append(call(addr, "POST", "/api/v1/workers/claim", keys["worker"], {"wait_ms": args.seconds * 1000})[0])

        waiting = [threading.Thread(target=wait) for _ in range(args.claims)]
        for t in waiting:
            t.start()
        for t in waiting:
            t.join()
        busy = cpu_seconds(server.pid) - before
        looks_after = looks(addr)
        assert statuses.count(204) == args.claims, statuses
        print(f"server CPU over {args.seconds} s: {idle * 1000:.0f} ms idle, "
              f"{busy * 1000:.0f} ms with {args.claims} claims waiting")
        if looks_after is not None:
            per = (looks_after - (looks_before or 0)) / args.claims / args.seconds
            print(f"looks at the queue per waiting claim: {per:.2f}/s")

        # 2. Submit -> claim.
        latencies = []
        for _ in range(args.samples):
            result = {}

            def claim():
                status, text = call(addr, "POST", "/api/v1/workers/claim", keys["worker"], {"wait_ms": 30000})
                result["at"] = time.perf_counter()
                result["claim"] = (status, text)

            claimer = threading.Thread(target=claim)
            claimer.start()
            time.sleep(random.uniform(0.3, 0.6))
            sent = time.perf_counter()
            status, text = call(addr, "POST", "/api/v1/jobs", keys["agent"], {"topic": "infra.vm.create", "env": "dev"})
            assert status == 202, text
            claimer.join()
            status, text = result["claim"]
            assert status == 200, text
            latencies.append((result["at"] - sent) * 1000)
            leased = json.loads(text)
            call(addr, "POST", f"/api/v1/workers/jobs/{leased['job_id']}/complete", keys["worker"],
                 {"lease_token": leased["lease_token"], "result": {}})
        report("submit -> claim", latencies)

        # 3. Due -> claim.
        lateness = []
        for _ in range(args.samples // 2):
            time.sleep(1.1)  # Gate A's bucket for the topic refills
            status, text = call(addr, "POST", "/api/v1/jobs", keys["agent"], {"topic": "bench.throttled", "env": "dev"})
            assert status == 202, text
            job = json.loads(text)["job_id"]
            status, text = call(addr, "POST", "/api/v1/workers/claim", keys["worker"], {"wait_ms": 30000})
            assert status == 200, text
            token = json.loads(text)["lease_token"]
            status, text = call(addr, "POST", f"/api/v1/workers/jobs/{job}/fail", keys["worker"],
                                {"lease_token": token, "error": "again", "retryable": True})
            assert status == 200, text
            result = {}

            def claim_again():
                status, text = call(addr, "POST", "/api/v1/workers/claim", keys["worker"], {"wait_ms": 30000})
                result["at"] = time.time() * 1000
                result["claim"] = (status, text)

            # A random phase: a claim that polled every 200 ms looked at moments fixed by its start.
            time.sleep(random.uniform(0, 0.2))
            claimer = threading.Thread(target=claim_again)
            claimer.start()
            time.sleep(0.2)
            _, text = call(addr, "GET", f"/api/v1/jobs/{job}", keys["agent"])
            not_before = json.loads(text)["not_before"]
            claimer.join()
            status, text = result["claim"]
            assert status == 200 and json.loads(text)["job_id"] == job, text
            lateness.append(result["at"] - not_before)
            call(addr, "POST", f"/api/v1/workers/jobs/{job}/complete", keys["worker"],
                 {"lease_token": json.loads(text)["lease_token"], "result": {}})
        report("due (throttled retry) -> claim", lateness)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
