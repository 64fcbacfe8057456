"""Cancel latency per stage of a real job service (loopback server, one worker).

For each stage, submits a MiniLM GPTQ job (fresh calibration text, so nothing is cached), waits
until the job reports that stage, cancels it and measures the time until the job is
``cancelled``. Prints a markdown table (commit it under bench/results/).

    .venv/bin/python bench/cancel_latency.py > bench/results/cancel-latency.md
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_service_support import Server  # noqa: E402

STAGES = ("calibration", "profile", "benchmark", "sensitivity", "solve", "apply", "export")
TEXTS = ["The lighthouse keeper painted the door bright blue last summer.",
         "Our flight was delayed because the pilot was stuck in traffic.",
         "She finally finished knitting the scarf her brother had asked for."] * 4


def cancel_in(client, stage: str, n: int) -> tuple[str, float | None, str]:
    body = {"model": "bundled:minilm", "effective_bits": 6, "method": "gptq",
            "calibration": {"texts": [*TEXTS, f"A unique sentence number {n} for stage {stage}."]}}
    job = client.post("/v1/jobs", json=body).json()
    deadline = time.monotonic() + 600
    seen = None
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job['id']}").json()
        seen = view.get("stage")
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return seen or "?", None, f"ended {view['status']} before reaching {stage}"
        if seen == stage:
            break
        time.sleep(0.02)
    start = time.monotonic()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job['id']}").json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return stage, time.monotonic() - start, view["status"]
        time.sleep(0.02)
    return stage, None, "timed out"


def main() -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"# Cancel latency per stage ({cpu}, {platform.machine()}, shared 2-core VM)\n")
    print("MiniLM GPTQ job, one worker; time from POST /cancel to the job's final status.\n")
    print("| stage | seconds | final status |")
    print("|---|---:|---|", flush=True)
    with tempfile.TemporaryDirectory() as data:
        server = Server(Path(data), lease_seconds=3).start()
        try:
            with server.client() as client:
                for i, stage in enumerate(STAGES):
                    stage, seconds, status = cancel_in(client, stage, i)
                    print(f"| {stage} | {'' if seconds is None else f'{seconds:.2f}'} | {status} |", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
