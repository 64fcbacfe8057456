"""The job service against a real server (``python -m service`` on a loopback port)."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from test_service_support import (
    REPO,
    Server,
    make_tiny_bert,
    model_members,
    read_events,
    tar_bytes,
    tar_member,
    tar_with,
    wait_for,
)

from service.store import FAILED, QUEUED, RUNNING, Store

from conftest import UNSEEN_SENTENCES

pytestmark = pytest.mark.slow

SENTENCES = UNSEEN_SENTENCES[:8]
# A tiny-model job that runs for seconds: the refinement stage evaluates 200 candidate plans,
# reporting progress (and so checking for cancellation) after each.
LONG_JOB = {"refine_trials": 200, "calibration": {"texts": SENTENCES * 2}}
UPLOAD_LIMIT = 5_000_000
OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("service")
    paths = {name: base / name for name in ("data", "root", "outside")}
    for path in paths.values():
        path.mkdir()
    return paths


@pytest.fixture(scope="module")
def server(dirs):
    server = Server(dirs["data"], model_roots=dirs["root"], lease_seconds=3,
                    max_upload_bytes=UPLOAD_LIMIT, max_extracted_bytes=10_000_000)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def tiny_model(client, tiny_dir) -> str:
    response = client.post("/v1/models", content=tar_bytes(tiny_dir), headers=OCTET,
                           params={"name": "tiny-bert"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit(client, body: dict, **headers: str) -> dict:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    return response.json()


def download_checkpoint(client, job_id: str, dest: Path) -> Path:
    response = client.get(f"/v1/jobs/{job_id}/artifact")
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(dest, filter="data")
    return dest / job_id


def plan_formats(plan: dict) -> dict[str, str]:
    return {name: layer["format"] for name, layer in plan["layers"].items()
            if layer["format"] != "none"}


# -- the MiniLM job, end to end ----------------------------------------------------------------


def test_minilm_job_end_to_end_then_cached(client, tmp_path):
    import torch

    import autoq

    body = {"model": "bundled:minilm", "effective_bits": 6,
            "formats": ["int8_dynamic", "int4_g64"], "calibration": {"texts": SENTENCES}}
    job = submit(client, body)
    assert job["status"] == "queued" and job["calibration_texts"] == len(SENTENCES)

    events = read_events(client, job["id"])
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "succeeded"
    stages = {e["data"]["stage"] for e in events if e["event"] == "stage"}
    assert {"load", "profile", "benchmark", "sensitivity", "solve", "export"} <= stages
    progress = [e["data"]["progress"] for e in events if "progress" in e["data"]]
    assert progress == sorted(progress) and progress[-1] == 1.0

    first = client.get(f"/v1/jobs/{job['id']}").json()
    assert first["status"] == "succeeded" and first["plan_cache_hit"] is False
    assert {"profile", "benchmark", "sensitivity"} <= set(first["timings"])
    assert abs(first["plan_effective_bits"] - 6) < 1.0

    plan = client.get(f"/v1/jobs/{job['id']}/plan").json()
    assert plan["cache_key"] == first["plan_key"]
    model = autoq.load_quantized(download_checkpoint(client, job["id"], tmp_path))
    assert autoq.layer_formats(model) == plan_formats(plan)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()

    cached = submit(client, body)
    second = wait_for(client, cached["id"], {"succeeded"}, timeout=60)
    assert second["plan_cache_hit"] is True and second["plan_key"] == first["plan_key"]
    assert not {"profile", "benchmark", "sensitivity"} & set(second["timings"])
    assert "cached" in second["message"]

    def duration(job: dict) -> float:
        return sum(job["timings"].values())

    assert duration(second) < duration(first)

    listed = client.get("/v1/plans").json()["items"]
    assert first["plan_key"] in {entry["key"] for entry in listed}
    assert client.get(f"/v1/plans/{first['plan_key']}").json()["cache_key"] == first["plan_key"]


# -- uploads -------------------------------------------------------------------------------


def test_uploaded_model_job_with_artifact_etag_and_range(client, tiny_model, tmp_path):
    import autoq

    assert client.get(f"/v1/models/{tiny_model}").json()["name"] == "tiny-bert"
    job = submit(client, {"model": tiny_model, "effective_bits": 5})
    events = read_events(client, job["id"])
    assert events[-1]["data"]["status"] == "succeeded", events[-1]

    resumed = read_events(client, job["id"], headers={"Last-Event-ID": str(events[2]["id"])})
    assert resumed == [e for e in events[3:]]
    assert read_events(client, job["id"], params={"after": events[-2]["id"]}) == events[-1:]

    plan = client.get(f"/v1/jobs/{job['id']}/plan").json()
    model = autoq.load_quantized(download_checkpoint(client, job["id"], tmp_path))
    assert autoq.layer_formats(model) == plan_formats(plan)

    url = f"/v1/jobs/{job['id']}/artifact"
    full = client.get(url)
    etag = full.headers["etag"]
    assert full.headers["content-type"] == "application/x-tar"
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    part = client.get(url, headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == full.content[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(full.content)}"
    stale = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert stale.status_code == 200 and stale.content == full.content
    assert client.head(url).headers["etag"] == etag


def test_gptq_job_and_its_report(client, tiny_model, tmp_path):
    import autoq

    job = submit(client, {"model": tiny_model, "effective_bits": 6, "method": "gptq",
                          "formats": ["int8_weight_only", "int4_sym_g32"]})
    assert client.get(job["links"]["report"]).status_code in (409, 200)
    done = wait_for(client, job["id"], {"succeeded", "failed"}, timeout=300)
    assert done["status"] == "succeeded", done
    plan = client.get(f"/v1/jobs/{job['id']}/plan").json()
    assert plan["settings"]["method"] == "gptq"
    assert {layer["method"] for layer in plan["layers"].values() if layer["format"] != "none"} == {"gptq"}
    model = autoq.load_quantized(download_checkpoint(client, job["id"], tmp_path))
    assert autoq.layer_formats(model) == plan_formats(plan)

    report = client.get(job["links"]["report"])
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert report.text.count("<svg") >= 4 and "http://" not in report.text
    bad = client.post("/v1/jobs", json={"model": tiny_model, "effective_bits": 6, "method": "awq"})
    assert bad.status_code == 422


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_upload_formats_accepted(client, tiny_dir, kind):
    if kind == "tar":
        body = tar_bytes(tiny_dir, mode="w")
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in sorted(tiny_dir.iterdir()):
                archive.write(path, arcname=path.name)  # files at the top level
        body = buffer.getvalue()
    response = client.post("/v1/models", content=body, headers=OCTET)
    assert response.status_code == 201, response.text
    assert response.json()["files"] == len(list(tiny_dir.iterdir()))


def zip_with(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_symlink() -> bytes:
    info = zipfile.ZipInfo("config.json")
    info.external_attr = (0o120777 << 16)  # S_IFLNK
    return zip_with([(info, b"/etc/passwd")])


def long_name_bomb() -> bytes:
    """A GNU long-name header claiming 1.4 GB, followed by 1 MB (tarfile would read it whole)."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 1_400_000_000
    return info.tobuf(format=tarfile.GNU_FORMAT) + b"a" * 1_000_000


BAD_ARCHIVES = {
    "traversal": (tar_with([*model_members(), tar_member("../evil.txt")]), 400, ".."),
    "nested traversal": (tar_with([*model_members(), tar_member("a/../../evil.txt")]), 400, ".."),
    "absolute path": (tar_with([*model_members(), tar_member("/tmp/evil.txt")]), 400, "absolute"),
    "symlink": (tar_with([*model_members(), tar_member("link", kind=tarfile.SYMTYPE,
                                                       linkname="/etc/passwd")]), 400, "link"),
    "hardlink": (tar_with([*model_members(), tar_member("hard", kind=tarfile.LNKTYPE,
                                                        linkname="config.json")]), 400, "link"),
    "device": (tar_with([*model_members(), tar_member("dev", kind=tarfile.CHRTYPE)]), 400,
               "regular file"),
    "fifo": (tar_with([*model_members(), tar_member("fifo", kind=tarfile.FIFOTYPE)]), 400,
             "regular file"),
    "duplicate": (tar_with([*model_members(), *model_members()]), 400, "twice"),
    "zip slip": (zip_with([("config.json", b"{}"), ("../../evil.txt", b"x")]), 400, ".."),
    "zip absolute": (zip_with([("/tmp/evil.txt", b"x")]), 400, "absolute"),
    "zip backslash": (zip_with([("..\\evil.txt", b"x")]), 400, "backslash"),
    "zip symlink": (zip_symlink(), 400, "symlink"),
    "not an archive": (b"this is not an archive at all" * 20, 400, "tar"),
    "pickle weights": (tar_with([*model_members(), tar_member("pytorch_model.bin")]), 422,
                       "unpickle"),
    "python code": (tar_with([*model_members(), tar_member("modeling_evil.py")]), 422, "code"),
    "no config": (tar_with([tar_member("model.safetensors")]), 422, "config.json"),
    "custom code config": (tar_with([tar_member("config.json",
                                                b'{"model_type": "x", "auto_map": {}}'),
                                     model_members()[1]]), 422, "auto_map"),
    "no weights": (tar_with([model_members()[0]]), 422, "safetensors"),
    "bad weights": (tar_with([model_members()[0], tar_member("model.safetensors",
                                                             b"\xff" * 64)]), 422, "safetensors"),
    # Issue 14's reproductions, over HTTP.
    "index escape": (tar_with([model_members()[0], tar_member(
        "model.safetensors.index.json",
        b'{"weight_map": {"w": "../../outside/model.safetensors"}}')]), 422, "shards must be"),
    "empty weights": (tar_with(model_members()), 422, "holds no tensors"),
    "long-name header bomb": (long_name_bomb(), 413, "extension header"),
    "too many members": (gzip.compress(tar_with([tar_member(f"f{i}", b"")
                                                 for i in range(10_001)])), 413, "members"),
}


@pytest.mark.parametrize("name", list(BAD_ARCHIVES))
def test_bad_archives_refused(client, dirs, name):
    body, status, needle = BAD_ARCHIVES[name]
    response = client.post("/v1/models", content=body, headers=OCTET)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]
    assert not (dirs["data"].parent / "evil.txt").exists()
    assert not list((dirs["data"] / "models").glob(".tmp-*"))
    assert not list((dirs["data"] / "tmp").glob("upload-*"))


def test_upload_limits(client):
    too_big = b"\0" * (UPLOAD_LIMIT + 1)
    response = client.post("/v1/models", content=too_big, headers=OCTET)
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(6):
            yield b"\0" * 1_000_000

    assert client.post("/v1/models", content=chunks(), headers=OCTET).status_code == 413

    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w:gz") as archive:
        for name, data in [*((i.name, d) for i, d in model_members()),
                           ("big.json", b"\0" * 12_000_000)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert len(bomb.getvalue()) < UPLOAD_LIMIT
    response = client.post("/v1/models", content=bomb.getvalue(), headers=OCTET)
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    empty = client.post("/v1/models", content=b"", headers=OCTET)
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]


# -- model references ------------------------------------------------------------------------


def test_model_roots(client, dirs, tiny_dir):
    inside = dirs["root"] / "tiny"
    shutil.copytree(tiny_dir, inside)
    job = submit(client, {"model": str(inside), "effective_bits": 8})
    assert wait_for(client, job["id"])["status"] == "succeeded"

    outside = dirs["outside"] / "tiny"
    shutil.copytree(tiny_dir, outside)
    (dirs["root"] / "link").symlink_to(outside, target_is_directory=True)
    (dirs["root"] / "loop").symlink_to(dirs["root"] / "loop")
    refused = {
        str(outside): (403, "outside the server's model roots"),
        str(dirs["root"] / "link"): (403, "outside the server's model roots"),
        f"{dirs['root']}/../outside/tiny": (403, "outside the server's model roots"),
        "/etc": (403, "outside the server's model roots"),
        "tiny": (422, "absolute directory"),
        str(dirs["root"] / "missing"): (404, "no model directory"),
        str(dirs["root"]): (422, "config.json"),
        # Model-path errors are 4xx with a message, never a 500.
        str(dirs["root"] / "loop"): (404, "no model directory"),
        str(dirs["root"] / ("x" * 300)): (404, "no model directory"),
        f"{dirs['root']}/nul\x00byte": (422, "control characters"),
    }
    for model, (status, needle) in refused.items():
        response = client.post("/v1/jobs", json={"model": model, "effective_bits": 8})
        assert response.status_code == status, (model, response.text)
        assert needle in response.json()["detail"], (model, response.text)


# -- job requests ----------------------------------------------------------------------------

BAD_JOBS = {
    "bits too low": ({"effective_bits": 1.5}, "greater than or equal to 2"),
    "bits too high": ({"effective_bits": 17}, "less than or equal to 16"),
    "bits not a number": ({"effective_bits": "six"}, "effective_bits"),
    "unknown format": ({"formats": ["int3"]}, "valid formats: none, int8_dynamic"),
    "repeated format": ({"formats": ["int4_g32", "int4_g32"]}, "more than once"),
    "empty formats": ({"formats": []}, "formats"),
    "unknown objective": ({"objective": "fastest"}, "choose one of"),
    "unknown export format": ({"export_format": "gguf"}, "unknown export format"),
    "no texts": ({"calibration": {"texts": []}}, "calibration.texts"),
    "empty text": ({"calibration": {"texts": [""]}}, "at least 1 character"),
    "negative refine": ({"refine_trials": -1}, "refine_trials"),
    "extra field": ({"trust_remote_code": True}, "Extra inputs are not permitted"),
    "unknown bundled model": ({"model": "bundled:gpt5"}, "unknown bundled model"),
    "unknown model id": ({"model": "mdl_" + "0" * 32}, "no uploaded model", 404),
    "malformed model id": ({"model": "mdl_xyz"}, "not a valid model id"),
    "missing model": ({"model": None}, "model"),
}


@pytest.mark.parametrize("name", list(BAD_JOBS))
def test_bad_job_requests(client, name):
    change, needle, *status = BAD_JOBS[name]
    body = {"model": "bundled:minilm", "effective_bits": 6, **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == (status[0] if status else 422), response.text
    assert needle in response.json()["detail"]


def test_malformed_requests(client):
    response = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type":
                                                                       "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["detail"]
    assert client.get("/v1/jobs/job_" + "0" * 32).status_code == 404
    assert client.get("/v1/jobs/../../etc/passwd").status_code == 404
    assert client.get("/v1/jobs/not-an-id").status_code == 422
    assert client.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 1000}).status_code == 422
    assert client.get("/v1/plans/..%2F..%2Fetc").status_code in (404, 422)
    huge = client.post("/v1/jobs", content=b" " * (65 * 1024 * 1024),
                       headers={"Content-Type": "application/json"})
    assert huge.status_code == 413


def test_idempotent_submit(client, tiny_model):
    body = {"model": tiny_model, "effective_bits": 7}
    first = submit(client, body, **{"Idempotency-Key": "build-42"})
    again = client.post("/v1/jobs", json={**body, "objective": "balanced"},
                        headers={"Idempotency-Key": "build-42"})
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = client.post("/v1/jobs", json={**body, "effective_bits": 4},
                        headers={"Idempotency-Key": "build-42"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    fresh = submit(client, body, **{"Idempotency-Key": "build-43"})
    assert fresh["id"] != first["id"]
    wait_for(client, first["id"])
    wait_for(client, fresh["id"])


def test_cancel_and_delete(client, tiny_model):
    running = submit(client, {"model": tiny_model, "effective_bits": 6, **LONG_JOB})
    wait_for(client, running["id"], {RUNNING}, stage="refine", timeout=60)
    queued = submit(client, {"model": tiny_model, "effective_bits": 3})
    assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == QUEUED

    response = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 409

    assert client.delete(f"/v1/jobs/{running['id']}").status_code == 409
    asked = time.monotonic()
    response = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    job = wait_for(client, running["id"], {"cancelled"}, timeout=15)
    assert time.monotonic() - asked < 10
    assert job["stage"] == "refine" and job["progress"] < 1
    assert read_events(client, running["id"])[-1]["data"]["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{running['id']}/artifact").status_code == 409
    assert client.get(f"/v1/jobs/{running['id']}/plan").status_code == 409

    assert client.delete(f"/v1/jobs/{running['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{running['id']}").status_code == 404
    assert client.post(f"/v1/jobs/{running['id']}/cancel").status_code == 404


def test_delete_removes_files(client, server, tiny_model):
    job = submit(client, {"model": tiny_model, "effective_bits": 8})
    wait_for(client, job["id"], {"succeeded"})
    artifact = server.data_dir / "artifacts" / job["id"]
    assert (artifact / "checkpoint.tar").is_file()
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not artifact.exists()
    assert client.get(f"/v1/jobs/{job['id']}/events").status_code == 404


def test_list_pagination_and_filter(client):
    jobs = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
    assert len(jobs) >= 4
    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200
        seen += [job["id"] for job in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [job["id"] for job in jobs]
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert cancelled and all(job["status"] == "cancelled" for job in cancelled)


def test_operations_endpoints(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready == {"status": "ready", "checks": {"database": "ok", "workers": "ok"}}
    text = client.get("/metrics").text
    assert 'autoq_jobs{status="succeeded"}' in text and "autoq_queue_length " in text
    assert 'autoq_stage_duration_seconds_count{stage="profile"}' in text
    schema = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/models", "/v1/jobs/{job_id}/events"} <= set(schema["paths"])


# -- restart after kill -9 --------------------------------------------------------------------


def test_kill9_mid_job_then_restart(tmp_path, tiny_dir):
    settings = {"lease_seconds": 3, "job_retry_limit": 2}
    first = Server(tmp_path / "data", **settings).start()
    second = None
    try:
        with first.client() as client:
            model = client.post("/v1/models", content=tar_bytes(tiny_dir), headers=OCTET).json()
            running = submit(client, {"model": model["id"], "effective_bits": 6, **LONG_JOB})
            wait_for(client, running["id"], {RUNNING}, stage="refine", timeout=60)
            queued = submit(client, {"model": model["id"], "effective_bits": 5})
        first.kill9()
        deadline = time.monotonic() + 15
        while first.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not first.group_alive(), "worker processes outlived the killed server"

        second = Server(tmp_path / "data", **settings).start()
        with second.client() as client:
            job = wait_for(client, running["id"], {"succeeded"}, timeout=120)
            assert job["attempts"] == 2
            events = read_events(client, running["id"])
            requeued = [e for e in events if e["data"].get("status") == QUEUED and e["id"] > 1]
            assert requeued and "stopped responding" in requeued[0]["data"]["message"]
            assert wait_for(client, queued["id"], {"succeeded"})["attempts"] == 1
            assert client.get(f"/v1/jobs/{running['id']}/artifact").status_code == 200
            counts = client.get("/metrics").text
            assert 'autoq_jobs{status="running"} 0' in counts
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_graceful_stop_requeues_the_running_job(tmp_path, tiny_dir):
    # A long lease: only the shutdown itself can put the job back in the queue.
    server = Server(tmp_path / "data", lease_seconds=300).start()
    try:
        with server.client() as client:
            model = client.post("/v1/models", content=tar_bytes(tiny_dir), headers=OCTET).json()
            job = submit(client, {"model": model["id"], "effective_bits": 6, **LONG_JOB})
            wait_for(client, job["id"], {RUNNING}, stage="refine", timeout=60)
    finally:
        server.stop()
    assert not server.group_alive()
    row = Store(f"sqlite:///{tmp_path / 'data' / 'autoq.db'}").get_job(job["id"])
    assert row.status == QUEUED and row.attempts == 0  # a shutdown is not the job's fault
    assert "shut down" in row.message and row.worker_id is None


# -- authentication and binding ---------------------------------------------------------------


def test_tokens_required_when_configured(tmp_path):
    server = Server(tmp_path / "data", tokens="alpha-token,beta-token", workers=0).start()
    try:
        with server.client() as anonymous:
            response = anonymous.get("/v1/jobs")
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert anonymous.post("/v1/jobs", json={}).status_code == 401
            assert anonymous.get("/healthz").status_code == 200
            assert anonymous.get("/readyz").status_code == 200
        with server.client("wrong-token") as wrong:
            assert wrong.get("/v1/jobs").status_code == 401
        for token in ("alpha-token", "beta-token"):
            with server.client(token) as client:
                assert client.get("/v1/jobs").status_code == 200
    finally:
        server.stop()


def test_open_server_works_without_tokens(client):
    assert client.get("/v1/jobs").status_code == 200


def test_refuses_public_bind_without_tokens(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOQ_")}
    env.update(AUTOQ_HOST="0.0.0.0", AUTOQ_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "refusing to bind 0.0.0.0" in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()


# -- in-process checks --------------------------------------------------------------------------


def test_unhandled_errors_hide_internals():
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir="/nonexistent/autoq"))

    def explode() -> None:
        raise RuntimeError("secret detail at /srv/autoq/internal.py")

    app.add_api_route("/explode", explode)
    response = TestClient(app, raise_server_exceptions=False).get("/explode")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}


def test_recovery_requeues_then_fails_past_retry_limit(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_all()
    job, _ = store.create_job(model="m", model_path="m", request={}, request_hash="h",
                              idempotency_key=None)

    def lose_worker(attempt: int) -> None:
        claimed = store.claim(job.id, f"worker-{attempt}")
        assert claimed is not None and claimed.attempts == attempt
        assert store.claim(job.id, "another-worker") is None  # one owner at a time
        time.sleep(0.05)
        assert store.recover_expired(lease_seconds=0.01, retry_limit=1) == [job.id]

    lose_worker(1)
    assert store.get_job(job.id).status == QUEUED
    lose_worker(2)
    failed = store.get_job(job.id)
    assert failed.status == FAILED
    assert "giving up after 2 attempts" in failed.error and "stopped responding" in failed.error
    assert not store.finish(job.id, "worker-2", "succeeded", message="too late")
