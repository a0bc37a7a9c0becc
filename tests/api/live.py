"""A live stack for end-to-end tests: ``neoxq api`` under uvicorn on a free port and,
optionally, a real ``neoxq worker`` on the tiny model, on one SQLite file and an isolated
Redis queue. Used by the openai-SDK test and the CLI client test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.api.conftest import drop_redis_keys
from tests.conftest import REDIS_HOST_URL

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    """Server and worker processes of one stack."""

    url: str
    env: dict[str, str]
    logs: Path
    prefix: str
    redis_url: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed by the OS at exit
        p = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=ROOT, env=self.env,
                             stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["api"].poll() is not None:
                raise AssertionError(f"api exited:\n{self.log('api')}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"api not up after {timeout}s:\n{self.log('api')}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        drop_redis_keys(self.redis_url, self.prefix)


def start_stack(tmp: Path, *, worker: bool, database_url: str | None = None,
                **settings: str) -> Live:
    """Start the API (and a tiny-model worker) on ``tmp`` (SQLite there unless
    ``database_url``); call ``stop()`` afterwards."""
    unique = os.urandom(5).hex()
    prefix = f"neoxq_live_{unique}:"
    redis_url = f"{REDIS_HOST_URL}/1"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXQ_")}
    env.update({"NEOXQ_DATABASE_URL": database_url or f"sqlite:///{tmp / 'neoxq.db'}",
                "NEOXQ_DATA_DIR": str(tmp / "data"), "NEOXQ_REDIS_URL": redis_url,
                "NEOXQ_QUEUE": f"neoxq_live_{unique}", "NEOXQ_REDIS_KEY_PREFIX": prefix,
                "NEOXQ_CHUNK_ITEMS": "8", "NEOXQ_HEARTBEAT_INTERVAL": "0.5",
                "NEOXQ_CANCEL_POLL_INTERVAL": "0.2", "PYTHONUNBUFFERED": "1"})
    env.update({f"NEOXQ_{k.upper()}": v for k, v in settings.items()})
    logs = tmp / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    live = Live(url=f"http://127.0.0.1:{port}", env=env, logs=logs, prefix=prefix,
                redis_url=redis_url)
    live.start("api", "api", "--port", str(port), "--log-level", "warning")
    try:
        live.wait_ready()
        if worker:
            live.start("worker", "worker", "--model", "preset:tiny", "--device", "cpu",
                       "--worker-id", "w-live", "--concurrency", "2")
    except BaseException:
        live.stop()
        raise
    return live


@contextmanager
def fresh_database(kind: str, tmp: Path) -> Iterator[str]:
    """A database URL for a live stack: a SQLite file, or a new PostgreSQL database
    dropped afterwards (module-scoped stacks cannot use the function-scoped fixtures)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'neoxq.db'}"
        return
    from tests.conftest import PG_ADMIN_URL, _pg_admin

    admin = _pg_admin()
    name = f"neoxq_live_{os.urandom(6).hex()}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
