"""A live loopback server under load and hostile uploads (bounded: about 30 s in all).

Concurrent lists, gets and event streams while jobs run must get no 5xx; hostile archives must
be refused without the API process growing. Measured figures are printed (run with ``-s``).
"""

from __future__ import annotations

import gzip
import statistics
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_service_support import Server, make_tiny_bert, tar_bytes, wait_for

from conftest import UNSEEN_SENTENCES

pytestmark = pytest.mark.slow

OCTET = {"Content-Type": "application/octet-stream"}
LONG_JOB = {"refine_trials": 200, "calibration": {"texts": UNSEEN_SENTENCES[:8] * 2}}
LOAD_SECONDS = 12.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("load")
    server = Server(base / "data", workers=1, lease_seconds=10, max_upload_bytes=20_000_000,
                    max_extracted_bytes=50_000_000)
    server.tiny_dir = make_tiny_bert(base / "tiny-bert")
    try:
        yield server.start()
    finally:
        server.stop()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_no_server_errors_under_concurrent_reads_while_jobs_run(server):
    with server.client() as client:
        model = client.post("/v1/models", content=tar_bytes(server.tiny_dir), headers=OCTET)
        assert model.status_code == 201, model.text
        jobs = [client.post("/v1/jobs", json={"model": model.json()["id"], "effective_bits": bits,
                                               **LONG_JOB}).json()["id"] for bits in (6, 5, 4)]
        wait_for(client, jobs[0], {"running"}, timeout=120)

    statuses: list[int] = []
    list_seconds: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + LOAD_SECONDS
    lock = threading.Lock()

    def reader(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while time.monotonic() < stop:
                started = time.monotonic()
                listed = client.get("/v1/jobs", params={"limit": 20})
                elapsed = time.monotonic() - started
                got = client.get(f"/v1/jobs/{jobs[index % len(jobs)]}")
                with lock:
                    statuses.extend([listed.status_code, got.status_code])
                    list_seconds.append(elapsed)

    def follower(index: int) -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30, read=20)) as client, \
                    client.stream("GET", f"/v1/jobs/{jobs[index % len(jobs)]}/events") as stream:
                with lock:
                    statuses.append(stream.status_code)
                for _ in stream.iter_lines():
                    if time.monotonic() > stop:
                        break
        except httpx.HTTPError as e:
            errors.append(repr(e))

    threads = [*(threading.Thread(target=reader, args=(i,)) for i in range(4)),
               *(threading.Thread(target=follower, args=(i,)) for i in range(12))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=LOAD_SECONDS + 60)
    with server.client() as client:
        for job_id in jobs:
            client.post(f"/v1/jobs/{job_id}/cancel")
    server_errors = [status for status in statuses if status >= 500]
    p99 = statistics.quantiles(list_seconds, n=100)[98] if len(list_seconds) >= 2 else 0.0
    print(f"\nload: {len(statuses)} responses, {len(server_errors)} >= 500, list p50 "
          f"{statistics.median(list_seconds):.3f} s, p99 {p99:.3f} s")
    assert not server_errors and not errors, (server_errors[:5], errors[:5])
    assert len(list_seconds) > 10
    log = server.log()
    assert "database is locked" not in log and "Traceback" not in log, log[-3000:]


def header_bomb() -> bytes:
    block = bytearray(512)
    block[0:13] = b"././@LongLink"
    block[100:108] = b"0000644\0"
    block[124:136] = f"{1_400_000_000:011o}\0".encode()
    block[136:148] = b"00000000000\0"
    block[156:157] = tarfile.GNUTYPE_LONGNAME
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block) + b"a" * 1_000_000


def gzip_bomb() -> bytes:
    head = bytearray(header_bomb()[:512])
    head[0:100] = b"model.safetensors".ljust(100, b"\0")
    head[124:136] = f"{8 << 30:011o}\0".encode()
    head[156:157] = tarfile.REGTYPE
    head[148:156] = b" " * 8
    head[148:156] = f"{sum(head):06o}\0 ".encode()
    return gzip.compress(bytes(head) + b"\0" * 8_000_000)


def test_hostile_uploads_cost_the_api_nothing(server):
    pid = server.process.pid
    with server.client() as client:
        client.get("/v1/jobs")
        idle = peak_rss_kib(pid)
        for body, status in ((header_bomb(), 413), (gzip_bomb(), 413)):
            response = client.post("/v1/models", content=body, headers=OCTET)
            assert response.status_code == status, response.text
    grown = peak_rss_kib(pid) - idle
    print(f"\nhostile uploads: API peak RSS grew by {grown / 1024:.1f} MiB")
    assert grown < 200 * 1024
    assert not list((server.data_dir / "models").glob(".tmp-*"))
