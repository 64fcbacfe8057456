"""The Ray executor on a local Ray instance: a job runs as a Ray task that claims the DB row."""

from __future__ import annotations

import io
import tarfile
import time

import pytest
from test_service_support import make_tiny_bert, tar_bytes

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_job_runs_as_a_ray_task(local_ray, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from service.store import Store

    settings = Settings(data_dir=tmp_path / "data", executor="ray", ray_num_gpus=0,
                        lease_seconds=10)
    archive = tar_bytes(make_tiny_bert(tmp_path / "tiny"))
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        model = client.post("/v1/models", content=archive,
                            headers={"Content-Type": "application/octet-stream"}).json()
        job = client.post("/v1/jobs", json={"model": model["id"], "effective_bits": 6}).json()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job['id']}").json()
            if job["status"] in {"succeeded", "failed", "cancelled"}:
                break
            time.sleep(0.2)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1 and job["plan_key"]
        artifact = client.get(f"/v1/jobs/{job['id']}/artifact")
        assert artifact.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(artifact.content)) as archive:
            assert f"{job['id']}/config.json" in archive.getnames()
    # The row was claimed by a Ray task, not by a local worker.
    assert ":ray:" in Store(settings.database).get_job(job["id"]).worker_id
