"""The HTTP layer in process (TestClient, no workers): OpenAPI per auth mode, status mapping,
the token gate, 405 ``Allow``, database errors as 503, limits, ETags and pagination."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from test_service_support import make_tiny_bert, tar_bytes

from service.app import TokenGate, create_app
from service.jobs import ARTIFACT_FILE, artifact_dir
from service.routes.common import get_store
from service.schemas import JobEventData
from service.settings import Settings
from service.store import SUCCEEDED

OCTET = {"Content-Type": "application/octet-stream"}


def make_client(tmp_path, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path / "data", workers=0, **settings)),
                      raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as client:
        yield client


def submit(client, **body) -> dict:
    response = client.post("/v1/jobs", json={"model": "bundled:minilm", "effective_bits": 6,
                                             **body})
    assert response.status_code == 202, response.text
    return response.json()


# -- OpenAPI describes the server as configured --------------------------------------------------


def test_openapi_security_only_with_tokens(tmp_path):
    with make_client(tmp_path) as open_client:
        schema = open_client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert "security" not in operation, path
            assert "401" not in operation["responses"], path
    with make_client(tmp_path / "t", tokens="secret") as secured:
        schema = secured.get("/openapi.json", headers={"Authorization": "Bearer secret"}).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path.startswith("/v1"):
                assert operation["security"] == [{"HTTPBearer": []}], path
                assert "401" in operation["responses"], path
            else:
                assert "security" not in operation, path
    # Every route declares its response model (or content), optional parameters never null.
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert any(code.startswith("2") for code in operation["responses"]), (method, path)
            for parameter in operation.get("parameters", []):
                assert "anyOf" not in parameter["schema"], (method, path, parameter["name"])


def test_openapi_enums_and_event_schema(client):
    schema = client.get("/openapi.json").json()
    body = schema["components"]["schemas"]["JobCreate"]["properties"]
    assert set(body["objective"]["enum"]) == {"accuracy", "speed", "balanced"}
    assert "pattern" in body["model"]
    events = schema["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]
    event = events["content"]["text/event-stream"]["schema"]
    assert event["properties"]["data"]["contentMediaType"] == "application/json"
    assert set(event["properties"]["event"]["enum"]) == {"status", "stage", "progress"}


def test_events_match_the_documented_schema(client):
    job = submit(client)
    client.post(f"/v1/jobs/{job['id']}/cancel")
    response = client.get(f"/v1/jobs/{job['id']}/events")
    blocks = [block for block in response.text.split("\n\n") if "data: " in block]
    assert len(blocks) == 2
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        assert fields["event"] == "status" and fields["id"].isdigit()
        JobEventData.model_validate_json(fields["data"])


# -- status mapping ---------------------------------------------------------------------------


def test_405_lists_the_allowed_methods(client):
    def allow(response) -> set[str]:
        assert response.status_code == 405
        return set(response.headers["allow"].split(", "))

    assert allow(client.options("/v1/models/mdl_" + "0" * 32)) == {"GET", "DELETE"}
    assert allow(client.patch("/v1/jobs")) == {"GET", "POST"}
    assert allow(client.put("/v1/jobs/job_" + "0" * 32 + "/artifact")) == {"GET", "HEAD"}
    assert allow(client.delete("/healthz")) == {"GET"}


def test_database_errors_are_503_with_retry_after(client):
    class Broken:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise OperationalError("SELECT 1", {}, Exception("database is locked"))
            return fail

    client.app.dependency_overrides[get_store] = Broken
    try:
        for response in (client.get("/v1/jobs"), client.get("/v1/jobs/job_" + "0" * 32),
                         client.post("/v1/jobs", json={"model": "bundled:minilm",
                                                       "effective_bits": 6})):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"].isdigit()
            assert "database" in response.json()["detail"]
    finally:
        client.app.dependency_overrides.clear()


def test_conflicts_are_409_and_missing_is_404(client):
    first = client.post("/v1/jobs", json={"model": "bundled:minilm", "effective_bits": 6},
                        headers={"Idempotency-Key": "k1"})
    other = client.post("/v1/jobs", json={"model": "bundled:minilm", "effective_bits": 7},
                        headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and other.status_code == 409
    job = first.json()["id"]
    assert client.delete(f"/v1/jobs/{job}").status_code == 409
    assert client.get(f"/v1/jobs/{job}/plan").status_code == 409
    assert client.post(f"/v1/jobs/{job}/cancel").status_code == 200
    assert client.post(f"/v1/jobs/{job}/cancel").status_code == 409
    assert client.delete(f"/v1/jobs/{job}").status_code == 204
    for response in (client.get(f"/v1/jobs/{job}"), client.post(f"/v1/jobs/{job}/cancel"),
                     client.get(f"/v1/jobs/{job}/events"), client.delete(f"/v1/jobs/{job}"),
                     client.get("/v1/models/mdl_" + "0" * 32),
                     client.post("/v1/jobs", json={"model": "mdl_" + "0" * 32,
                                                   "effective_bits": 6})):
        assert response.status_code == 404, response.text


# -- the token gate ---------------------------------------------------------------------------


def test_token_checked_before_the_body_is_read():
    settings = Settings(tokens="secret")
    received: list[str] = []
    sent: list[dict] = []

    async def app(scope, receive, send):  # the application behind the gate
        received.append("app")
        await receive()

    async def receive():
        received.append("body")
        return {"type": "http.request", "body": b"x" * 1000, "more_body": False}

    async def send(message):
        sent.append(message)

    def call(headers):
        scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": headers}
        received.clear()
        sent.clear()
        asyncio.run(TokenGate(app, settings)(scope, receive, send))

    call([(b"content-length", b"1000")])
    assert received == [] and sent[0]["status"] == 401
    call([(b"authorization", b"Bearer wrong")])
    assert received == [] and sent[0]["status"] == 401
    call([(b"authorization", b"Bearer secret")])
    assert received == ["app", "body"]


def test_tokens_mode_over_http(tmp_path):
    with make_client(tmp_path, tokens="alpha,beta") as client:
        refused = client.post("/v1/jobs", content=b"{" * 100_000,
                              headers={"Content-Type": "application/json"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer beta"}).status_code == 200
        assert client.get("/healthz").status_code == 200


# -- limits -----------------------------------------------------------------------------------


def test_queue_limit_is_429(tmp_path):
    with make_client(tmp_path, max_queued_jobs=2) as client:
        submit(client)
        submit(client)
        full = client.post("/v1/jobs", json={"model": "bundled:minilm", "effective_bits": 6})
        assert full.status_code == 429 and full.headers["retry-after"].isdigit()


def test_jobs_per_token_quota_is_429(tmp_path):
    with make_client(tmp_path, tokens="alpha,beta", max_jobs_per_token=2) as client:
        alpha = {"Authorization": "Bearer alpha"}
        body = {"model": "bundled:minilm", "effective_bits": 6}
        first = client.post("/v1/jobs", json=body, headers={**alpha, "Idempotency-Key": "k1"})
        assert first.status_code == 202
        assert client.post("/v1/jobs", json=body, headers=alpha).status_code == 202
        refused = client.post("/v1/jobs", json=body, headers=alpha)
        assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
        detail = refused.json()["detail"]
        assert "at most 2" in detail and "AUTOQ_MAX_JOBS_PER_TOKEN" in detail
        assert "cancel" in detail
        # A retried request (same Idempotency-Key and body) creates no job: not refused.
        replay = client.post("/v1/jobs", json=body, headers={**alpha, "Idempotency-Key": "k1"})
        assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
        # Another token has its own quota.
        assert client.post("/v1/jobs", json=body,
                           headers={"Authorization": "Bearer beta"}).status_code == 202
        # A cancelled job no longer counts.
        client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=alpha)
        assert client.post("/v1/jobs", json=body, headers=alpha).status_code == 202
        schema = client.get("/openapi.json", headers=alpha).json()
    documented = schema["paths"]["/v1/jobs"]["post"]
    assert "Retry-After" in documented["responses"]["429"]["headers"]
    assert "AUTOQ_MAX_JOBS_PER_TOKEN" in documented["description"]


def test_jobs_quota_without_tokens_is_per_address(tmp_path):
    with make_client(tmp_path, max_jobs_per_token=1) as client:
        submit(client)
        # On a server without tokens an Authorization header is ignored: no fresh quota.
        again = client.post("/v1/jobs", json={"model": "bundled:minilm", "effective_bits": 6},
                            headers={"Authorization": "Bearer made-up"})
        assert again.status_code == 429, again.text


def test_event_stream_limit_is_429(tmp_path):
    with make_client(tmp_path, max_event_streams=2) as client:
        job = submit(client)
        client.post(f"/v1/jobs/{job['id']}/cancel")  # its stream ends
        slots = client.app.state.streams
        assert client.get(f"/v1/jobs/{job['id']}/events").status_code == 200
        assert slots.open == {}  # given back when the stream ended
        slots.open["addr:testclient"] = 2  # two streams are open
        response = client.get(f"/v1/jobs/{job['id']}/events")
        assert response.status_code == 429 and "event streams" in response.json()["detail"]


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> bytes:
    return tar_bytes(make_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert"))


def test_every_size_refusal_is_413(tmp_path, tiny_archive):
    size = len(gzip.decompress(tiny_archive))
    with make_client(tmp_path / "a", max_upload_bytes=len(tiny_archive) - 1) as client:
        assert client.post("/v1/models", content=tiny_archive, headers=OCTET).status_code == 413
    with make_client(tmp_path / "b", max_extracted_bytes=size // 2) as client:
        response = client.post("/v1/models", content=tiny_archive, headers=OCTET)
        assert response.status_code == 413 and "limit" in response.json()["detail"]
    with make_client(tmp_path / "c", storage_quota_bytes=size + size // 2) as client:
        assert client.post("/v1/models", content=tiny_archive, headers=OCTET).status_code == 201
        response = client.post("/v1/models", content=tiny_archive, headers=OCTET)
        assert response.status_code == 413 and "quota" in response.json()["detail"]
    with make_client(tmp_path / "d", min_free_bytes=1 << 60) as client:
        response = client.post("/v1/models", content=tiny_archive, headers=OCTET)
        assert response.status_code == 413 and "free disk space" in response.json()["detail"]
    assert not list((tmp_path / "c" / "data" / "models").glob(".tmp-*"))


# -- artifacts and plans ----------------------------------------------------------------------


def test_artifact_etags(tmp_path, client):
    store = client.app.state.store
    settings = client.app.state.settings
    job = submit(client)
    store.claim(job["id"], "w1")
    path = artifact_dir(settings, job["id"]) / ARTIFACT_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"tar" * 100)
    assert store.finish(job["id"], "w1", SUCCEEDED, message="done", artifact_etag="abc",
                        artifact_size=300)
    url = f"/v1/jobs/{job['id']}/artifact"
    assert client.get(url).content == b"tar" * 100
    for tag in ('"abc"', 'W/"abc"', '*', '"zzz", W/"abc"'):
        assert client.get(url, headers={"If-None-Match": tag}).status_code == 304, tag
    assert client.get(url, headers={"If-None-Match": '"zzz"'}).status_code == 200
    assert client.get(url, headers={"Range": "bytes=1000-2000"}).status_code == 416


def test_plans_are_paginated(client, monkeypatch):
    from autoq.cache import PlanCache

    entries = [{"key": f"k{i}", "architecture": "BertModel", "budget": 6.0,
                "objective": "balanced", "effective_bits": 6.0, "created": f"2026-01-{i + 1:02d}",
                "hardware": None} for i in range(5)]
    monkeypatch.setattr(PlanCache, "list", lambda self: entries)
    seen, cursor = [], None
    while True:
        page = client.get("/v1/plans", params={"limit": 2, **({"cursor": cursor} if cursor
                                                               else {})}).json()
        seen += [entry["key"] for entry in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [entry["key"] for entry in entries]
    assert json.loads(client.get("/v1/plans").text)["next_cursor"] is None
