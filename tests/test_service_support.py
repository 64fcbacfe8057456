"""Helpers for the service tests (no tests here): a real server in a subprocess, tiny models,
archives and an SSE reader."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import string
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
FINISHED = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m service`` on a free loopback port, configured through AUTOQ_* variables."""

    def __init__(self, data_dir: Path, **settings: object):
        self.data_dir = data_dir
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"server-{data_dir.name}-{self.port}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOQ_")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", AUTOQ_HOST="127.0.0.1",
                   AUTOQ_PORT=str(self.port), AUTOQ_DATA_DIR=str(self.data_dir),
                   AUTOQ_LOG_LEVEL="info")
        for key, value in self.settings.items():
            env[f"AUTOQ_{key.upper()}"] = str(value)
        return env

    def start(self, timeout: float = 90.0) -> Server:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO,
                                        env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def group_alive(self) -> bool:
        """Whether a process of the server's process group (server or workers) still runs.

        Zombies do not count: whoever reaps orphans here may be slow to do it.
        """
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.process.pid and fields[0] != "Z":
                return True
        return False

    def kill9(self) -> None:
        """Simulate a crash: SIGKILL the server process only (its workers must follow)."""
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.group_alive():
            os.killpg(self.process.pid, signal.SIGKILL)


def wait_for(client: httpx.Client, job_id: str, statuses: set[str] = FINISHED,
             timeout: float = 120.0, **fields: object) -> dict:
    """Poll a job until its status is in ``statuses`` (and its fields match), or fail."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses and all(job.get(k) == v for k, v in fields.items()):
            return job
        if job["status"] in FINISHED and job["status"] not in statuses:
            raise AssertionError(f"job ended {job['status']}: {job}")
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {statuses} {fields} after {timeout} s: {job}")


def read_events(client: httpx.Client, job_id: str, headers: dict | None = None,
                params: dict | None = None, timeout: float = 180.0) -> list[dict]:
    """Follow a job's event stream to its end; each event as {id, event, data}."""
    events: list[dict] = []
    current: dict = {}
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, params=params,
                       timeout=httpx.Timeout(30, read=30)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"event stream still open after {timeout} s"
            if line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and "data" in current:
                events.append(current)
                current = {}
    return events


# -- tiny models and archives ----------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
         *(f"##{c}" for c in string.ascii_lowercase), *string.digits, *string.punctuation]


def make_tiny_bert(path: Path, hidden: int = 64, seed: int = 0) -> Path:
    """A random 2-layer BERT with a character vocabulary, saved with safetensors."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=hidden,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=2 * hidden, max_position_embeddings=128)
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(path)
    return path


def tar_bytes(source: Path, arcname: str = "tiny-bert", mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        archive.add(source, arcname=arcname)
    return buffer.getvalue()


def tar_with(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar built member by member (for hostile archives)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def tar_member(name: str, data: bytes | None = b"x", kind: bytes = tarfile.REGTYPE,
               linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, (data if kind == tarfile.REGTYPE else None)


def model_members(prefix: str = "") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """A minimal valid-looking model directory (config + a well-formed safetensors file)."""
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    weights = len(header).to_bytes(8, "little") + header
    config = json.dumps({"model_type": "bert"}).encode()
    return [tar_member(f"{prefix}config.json", config),
            tar_member(f"{prefix}model.safetensors", weights)]
