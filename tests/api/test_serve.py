"""``neoxq api`` binds what --host says; without keys it answers only loopback clients, and
a key created later by another process (the compose flow: ``docker compose exec api neoxq
keys create admin``) opens it to other hosts without a restart."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api.auth import is_loopback
from tests.api.live import ROOT, free_port, start_stack


def this_machines_address() -> str:
    """A non-loopback address of this machine (the one its default route leaves by; a UDP
    connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never answered, only routed
        addr = s.getsockname()[0]
    assert not is_loopback(addr), "this machine has no non-loopback address"
    return addr


def test_a_key_created_later_opens_the_api_to_other_hosts(tmp_path: Path) -> None:
    live = start_stack(tmp_path, worker=False)
    try:
        port = free_port()
        live.start("api2", "api", "--host", "0.0.0.0", "--port", str(port))
        live.procs["api"], live.procs["api_first"] = live.procs["api2"], live.procs["api"]
        live.url = f"http://127.0.0.1:{port}"
        live.wait_ready()
        assert "answering loopback clients only" in live.log("api2")
        remote = f"http://{this_machines_address()}:{port}"
        # Bound on every interface, but a non-loopback client is refused while no key exists.
        r = httpx.get(remote + "/batches")
        assert r.status_code == 401 and "neoxq keys create" in r.json()["error"]["message"]
        assert httpx.get(live.url + "/batches").status_code == 200  # this machine: served
        made = subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", "admin"],
                              cwd=ROOT, env=live.env, check=True, capture_output=True,
                              text=True)
        key = made.stdout.strip()
        auth = {"Authorization": f"Bearer {key}"}
        # Same process, no restart: other hosts are served with the key, nobody without.
        assert httpx.get(remote + "/batches", headers=auth).status_code == 200
        assert httpx.get(remote + "/batches").status_code == 401
        assert httpx.get(live.url + "/batches").status_code == 401
        assert live.procs["api2"].poll() is None
        # A restart with keys in place says they are required.
        port3 = free_port()
        live.start("api3", "api", "--host", "0.0.0.0", "--port", str(port3))
        live.procs["api"] = live.procs["api3"]
        live.url = f"http://127.0.0.1:{port3}"
        live.wait_ready()
        assert "API keys required (1 active)" in live.log("api3")
    finally:
        live.stop()


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("192.0.2.7", False), ("::ffff:192.0.2.7", False), ("", False),
    ("testclient", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
