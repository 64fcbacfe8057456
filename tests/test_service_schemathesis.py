"""The schemathesis CLI, every check and every phase (stateful included), against a live
loopback server in both modes: tokens set, and open (no tokens). It must report no failure.

Bounded: a few examples per operation, short stream reads, a subprocess timeout.

One check is left out for one operation: positive_data_acceptance on ``POST /v1/models``. Its
body is declared ``format: binary``, so any bytes are "schema-valid", but only a tar or zip
holding a model is accepted; no JSON Schema can say which bytes those are, and the documented
refusals (400 bad archive, 413 too large, 422 not a model) are the right answers. That operation
gets its own run with every other check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_support import Server

pytestmark = pytest.mark.slow
EXAMPLES = 15
TOKEN = "schemathesis-token"
UPLOAD = "POST /v1/models"
# The job stays queued (no workers), so its event stream stays open: read it briefly.
CONFIG = """
[[operations]]
include-path = "/v1/jobs/{job_id}/events"
request-timeout = 2
"""


def schemathesis(server: Server, workdir: Path, mode: str, *selection: str) -> tuple[int, str]:
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config),
               "--no-color", "run", f"{server.url}/openapi.json", "--checks", "all",
               "--max-examples", str(EXAMPLES), "--seed", "1", "--request-timeout", "10",
               "--phases", "examples,coverage,fuzzing,stateful", "--generation-database", "none",
               *selection]
    if mode == "tokens":
        command += ["--header", f"Authorization: Bearer {TOKEN}"]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"})
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("mode", ["open", "tokens"])
def test_schemathesis_finds_nothing(tmp_path, mode):
    settings: dict[str, object] = {"workers": 0, "max_upload_bytes": 1_000_000}
    if mode == "tokens":
        settings["tokens"] = TOKEN
    server = Server(tmp_path / "data", **settings).start()
    try:
        runs = [schemathesis(server, tmp_path, mode, "--exclude-name", UPLOAD),
                schemathesis(server, tmp_path, mode, "--include-name", UPLOAD,
                             "--exclude-checks", "positive_data_acceptance")]
    finally:
        server.stop()
    for code, output in runs:
        print(output[output.find("SUMMARY"):] if "SUMMARY" in output else output[-3000:])
        assert code == 0, output[-12000:]
    assert "Traceback" not in server.log()
