"""``neoxq api``: without keys it binds loopback only, whatever --host says, and says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.api.live import ROOT, free_port, start_stack


def test_without_keys_api_binds_loopback_and_says_so(tmp_path: Path) -> None:
    live = start_stack(tmp_path, worker=False)
    try:
        port = free_port()
        live.start("api2", "api", "--host", "0.0.0.0", "--port", str(port))
        live.procs["api"], live.procs["api_first"] = live.procs["api2"], live.procs["api"]
        live.url = f"http://127.0.0.1:{port}"
        live.wait_ready()
        log = live.log("api2")
        assert "no API keys exist, so listening on 127.0.0.1 only (not 0.0.0.0)" in log
        assert httpx.get(live.url + "/readyz").json()["status"] == "ok"
        # With a key, a restart binds what it is told and requires keys.
        subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", "x"], cwd=ROOT,
                       env=live.env, check=True, capture_output=True)
        port3 = free_port()
        live.start("api3", "api", "--host", "0.0.0.0", "--port", str(port3))
        live.procs["api"] = live.procs["api3"]
        live.url = f"http://127.0.0.1:{port3}"
        live.wait_ready()
        assert "API keys required (1 active)" in live.log("api3")
        assert httpx.get(live.url + "/batches").status_code == 401
    finally:
        live.stop()
