"""Load test of a live job service: concurrent lists, gets and event streams while jobs run.

A loopback server (``python -m service``, default settings but the ones given) runs MiniLM jobs
(each with its own calibration sentence, so no job reuses a cached plan) and is kept at
``--jobs`` queued + running jobs the whole time: when one finishes another is submitted. Beside
it, ``--readers`` threads loop ``GET /v1/jobs`` then ``GET /v1/jobs/{id}``, and ``--streams``
clients follow job event streams (reconnecting to a live job when a stream ends). Prints a
markdown report: the machine (``lscpu``, load average), every status code, latency percentiles,
and whether the server log holds a traceback or a locked database. Exit status 1 when any
response was >= 500, a request failed, or the list p99 is 1 s or more.

    .venv/bin/python bench/load.py --seconds 600 > bench/results/load-600s.md
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_service_support import FINISHED, Server  # noqa: E402

TEXTS = ["The lighthouse keeper painted the door bright blue last summer.",
         "Our flight was delayed because the pilot was stuck in traffic.",
         "She finally finished knitting the scarf her brother had asked for.",
         "A quiet river runs past the old mill at the edge of the village."]


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def machine() -> list[str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    keep = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per",
            "Socket(s)", "Hypervisor vendor", "L2 cache", "L3 cache")
    rows = [line for line in lscpu if line.split(":")[0].strip().startswith(keep)]
    mem = next((line for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "")
    return [*rows, mem]


class Load:
    def __init__(self, server: Server, args: argparse.Namespace):
        self.server, self.args = server, args
        self.lock = threading.Lock()
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.failures: list[str] = []
        self.live: list[str] = []
        self.submitted = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.events = 0
        self.streams_opened = 0
        self.stop_at = 0.0

    def record(self, what: str, status: int, seconds: float | None = None) -> None:
        with self.lock:
            self.statuses[(what, status)] += 1
            if seconds is not None:
                self.latency[what].append(seconds)

    def fail(self, what: str, error: Exception) -> None:
        with self.lock:
            self.failures.append(f"{what}: {error!r}")

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    def submit(self, client: httpx.Client) -> bool:
        n = self.submitted
        body = {"model": "bundled:minilm", "effective_bits": (6, 5, 4.5, 7)[n % 4],
                "calibration": {"texts": [*TEXTS, f"Load test sentence number {n}, unique."]}}
        started = time.monotonic()
        response = client.post("/v1/jobs", json=body)
        self.record("POST /v1/jobs", response.status_code, time.monotonic() - started)
        if response.status_code == 202:
            with self.lock:
                self.live.append(response.json()["id"])
                self.submitted += 1
        return response.status_code == 202  # 429 (queue or client quota): try again next round

    def keeper(self) -> None:
        """Keep ``--jobs`` jobs queued or running; count how each one ended."""
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            while self.running():
                try:
                    while len(self.live) < self.args.jobs and self.submit(client):
                        pass
                    listed = client.get("/v1/jobs", params={"limit": 100})
                    self.record("GET /v1/jobs (keeper)", listed.status_code)
                    if listed.status_code == 200:
                        status = {job["id"]: job["status"] for job in listed.json()["items"]}
                        with self.lock:
                            for job_id in list(self.live):
                                if status.get(job_id) in FINISHED:
                                    self.live.remove(job_id)
                                    self.finished[status[job_id]] += 1
                except httpx.HTTPError as e:
                    self.fail("keeper", e)
                time.sleep(1.0)

    def reader(self, index: int) -> None:
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            while self.running():
                try:
                    started = time.monotonic()
                    listed = client.get("/v1/jobs", params={"limit": 20})
                    self.record("GET /v1/jobs", listed.status_code, time.monotonic() - started)
                    with self.lock:
                        job_id = self.live[index % len(self.live)] if self.live else None
                    if job_id is not None:
                        started = time.monotonic()
                        got = client.get(f"/v1/jobs/{job_id}")
                        self.record("GET /v1/jobs/{id}", got.status_code,
                                    time.monotonic() - started)
                except httpx.HTTPError as e:
                    self.fail("reader", e)
                time.sleep(self.args.pause)

    def follower(self, index: int) -> None:
        timeout = httpx.Timeout(60, read=60)
        with httpx.Client(base_url=self.server.url, timeout=timeout) as client:
            while self.running():
                with self.lock:
                    job_id = self.live[index % len(self.live)] if self.live else None
                if job_id is None:
                    time.sleep(0.5)
                    continue
                try:
                    started = time.monotonic()
                    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                        self.record("GET /v1/jobs/{id}/events", stream.status_code,
                                    time.monotonic() - started)
                        with self.lock:
                            self.streams_opened += 1
                        for line in stream.iter_lines():
                            if line.startswith("data: "):
                                with self.lock:
                                    self.events += 1
                            if not self.running():
                                break
                except httpx.HTTPError as e:
                    self.fail("follower", e)
                    time.sleep(0.5)

    def run(self) -> None:
        self.stop_at = time.monotonic() + self.args.seconds
        threads = [threading.Thread(target=self.keeper),
                   *(threading.Thread(target=self.reader, args=(i,))
                     for i in range(self.args.readers)),
                   *(threading.Thread(target=self.follower, args=(i,))
                     for i in range(self.args.streams))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--jobs", type=int, default=20, help="jobs kept queued + running")
    parser.add_argument("--workers", type=int, default=1, help="AUTOQ_WORKERS")
    parser.add_argument("--readers", type=int, default=4, help="list+get loops")
    parser.add_argument("--streams", type=int, default=50, help="event streams held open")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between a reader's "
                                                                 "list+get pairs")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "service", "autoq"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    print(f"# Job service under load: {args.seconds:.0f} s\n")
    print(f"`bench/load.py --seconds {args.seconds:g} --jobs {args.jobs} --workers {args.workers} "
          f"--readers {args.readers} --streams {args.streams} --pause {args.pause:g}` at commit "
          f"{commit}{' (service/ or autoq/ modified)' if dirty else ''}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    print("Loopback server, SQLite (WAL), no tokens, default settings but "
          f"AUTOQ_WORKERS={args.workers}. MiniLM jobs (bundled:minilm, RTN, each with its own "
          f"calibration sentence so none reuses a cached plan), {args.jobs} kept queued + running "
          f"throughout; {args.readers} threads loop `GET /v1/jobs?limit=20` + `GET /v1/jobs/{{id}}`"
          f"; {args.streams} clients follow event streams (reconnecting when a job ends). Client "
          "and server share the machine.\n")
    print("## Machine\n\n```")
    print("\n".join(machine()))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("```\n", flush=True)

    with tempfile.TemporaryDirectory() as data:
        server = Server(Path(data) / "data", workers=args.workers).start(timeout=180)
        load = Load(server, args)
        try:
            load.run()
            load_after = os.getloadavg()
            with server.client() as client:
                for job_id in list(load.live):
                    client.post(f"/v1/jobs/{job_id}/cancel")
        finally:
            server.stop()
        log = server.log_path.read_text(errors="replace")

    print("## Results\n")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in load_after)} (1, 5, 15 min)\n")
    total = sum(load.statuses.values())
    server_errors = sum(n for (_, status), n in load.statuses.items() if status >= 500)
    print(f"- responses: {total}; >= 500: **{server_errors}**; failed requests (no response): "
          f"{len(load.failures)}")
    print(f"- jobs submitted: {load.submitted}; finished during the run: "
          f"{dict(load.finished) or 'none'}; still queued or running at the end: "
          f"{len(load.live)} (cancelled)")
    print(f"- event streams opened: {load.streams_opened}; events received: {load.events}")
    print(f"- server log: {log.count('Traceback')} tracebacks, "
          f"{log.count('database is locked')} 'database is locked', "
          f"{log.count('database error')} database errors\n")
    print("| request | status | count |\n|---|---:|---:|")
    for (what, status), n in sorted(load.statuses.items()):
        print(f"| {what} | {status} | {n} |")
    print("\n| request | n | p50 s | p90 s | p99 s | max s |\n|---|---:|---:|---:|---:|---:|")
    for what, values in sorted(load.latency.items()):
        print(f"| {what} | {len(values)} | {quantile(values, 0.5):.3f} | "
              f"{quantile(values, 0.9):.3f} | {quantile(values, 0.99):.3f} | {max(values):.3f} |")
    if load.failures:
        print("\nFailed requests (first 10):\n")
        for failure in load.failures[:10]:
            print(f"- `{failure}`")
    p99 = quantile(load.latency["GET /v1/jobs"], 0.99)
    ok = not server_errors and not load.failures and p99 < 1.0
    print(f"\n**{'PASS' if ok else 'FAIL'}**: {server_errors} responses >= 500, "
          f"{len(load.failures)} failed requests, list p99 {p99:.3f} s (bar: 0, 0, < 1 s).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
