"""The schemathesis CLI, every check and every phase (stateful included), against a live
loopback server in both modes: tokens set, and open (no tokens). It must report no failure.

Bounded: a few examples per operation, short stream reads, a subprocess timeout.

It runs with the repository's ``schemathesis.toml``, the settings an outside run from the checkout
uses. That file tunes one check for one operation: positive_data_acceptance on
``POST /v1/models`` also allows the upload's documented refusals (400 not an archive, 413 too
large, 422 not a usable model). The body is declared ``format: binary`` because no JSON Schema
can say which bytes are an archive holding a complete safetensors model, so random bytes are
"schema-valid" and refusing them is right; every other check still runs on the upload, and any
other refusal of a positive request still fails. ``test_upload_refuses_schema_valid_junk`` below
pins why: it sends what schemathesis sends and expects exactly those refusals.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_support import Server

# Two of the files schemathesis draws for a ``format: binary`` body
# (schemathesis.core.file_samples.FILE_SAMPLES, v4.32).
SCHEMATHESIS_ZIP = ("UEsDBBQAAAAAAFCXO11DvrfoAQAAAAEAAAAFAAAAYS50eHRhUEsBAhQDFAAAAAAAUJc7XUO+t+gBAAAAAQAAAAUA"
                    "AAAAAAAAAAAAAIABAAAAAGEudHh0UEsFBgAAAAABAAEAMwAAACQAAAAAAA==")
SCHEMATHESIS_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5Er"
                    "kJggg==")
EXAMPLES = 15
TOKEN = "schemathesis-token"
REPO_CONFIG = Path(__file__).resolve().parents[1] / "schemathesis.toml"
# The job stays queued (no workers), so its event stream stays open: read it briefly.
EVENTS = """
[[operations]]
include-path = "/v1/jobs/{job_id}/events"
request-timeout = 2
"""


def schemathesis(server: Server, workdir: Path, mode: str, *selection: str) -> tuple[int, str]:
    config = workdir / "schemathesis.toml"
    config.write_text(REPO_CONFIG.read_text() + EVENTS)
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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["open", "tokens"])
def test_schemathesis_finds_nothing(tmp_path, mode):
    settings: dict[str, object] = {"workers": 0, "max_upload_bytes": 1_000_000}
    if mode == "tokens":
        settings["tokens"] = TOKEN
    server = Server(tmp_path / "data", **settings).start()
    try:
        code, output = schemathesis(server, tmp_path, mode)
    finally:
        server.stop()
    print(output[output.find("SUMMARY"):] if "SUMMARY" in output else output[-3000:])
    assert code == 0, output[-12000:]
    assert "Traceback" not in server.log()


def test_repo_config_tunes_one_check_for_one_operation():
    import tomllib

    config = tomllib.loads(REPO_CONFIG.read_text())
    assert set(config) == {"operations"}
    [upload] = config["operations"]
    assert upload["include-name"] == "POST /v1/models"
    assert set(upload) == {"include-name", "checks"}
    assert set(upload["checks"]) == {"positive_data_acceptance"}
    statuses = upload["checks"]["positive_data_acceptance"]["expected-statuses"]
    # schemathesis' defaults, plus exactly the refusals the upload documents
    assert set(statuses) == {"2xx", "3xx", "401", "403", "404", "409", "429", "5xx",
                             "400", "413", "422"}


@pytest.mark.parametrize(("body", "status"), [
    (b"\0", 400),  # the body schemathesis reported first: one NUL byte
    (bytes(range(256)), 400),
    (base64.b64decode(SCHEMATHESIS_ZIP), 422),  # its zip sample: an archive, not a model
    (base64.b64decode(SCHEMATHESIS_PNG), 400),
])
def test_upload_refuses_schema_valid_junk(tmp_path, body, status):
    """What schemathesis generates for a ``format: binary`` body is refused, as documented."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir=tmp_path / "data", workers=0))
    with TestClient(app) as client:
        response = client.post("/v1/models", content=body,
                               headers={"Content-Type": "application/octet-stream"})
        schema = client.get("/openapi.json").json()
    assert response.status_code == status, response.text
    documented = schema["paths"]["/v1/models"]["post"]["responses"]
    assert str(status) in documented
