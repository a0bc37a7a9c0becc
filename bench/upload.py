"""Server memory while a 100 MB JSONL file is uploaded and ingested.

Starts ``neoxq api`` (uvicorn) as a subprocess on a fresh SQLite file and an isolated
Redis queue, streams a generated file to it (the client never holds it either), and
reads the server's peak resident memory (``VmHWM`` in /proc: the exact high-water mark,
not a sample) before and after. Two paths:

- ``native``: ``POST /batches`` with a raw body - upload, line-by-line validation,
  item inserts and chunk enqueueing, all inside the request;
- ``openai``: ``POST /v1/files`` (multipart, spooled by Starlette) then ``POST
  /v1/batches`` (ingestion from the stored file).

    python -m bench.upload            # -> bench/results/api_upload.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.common import drop_redis_keys, git_commit, stop

ROOT = Path(__file__).resolve().parents[1]
LINE_PAD = 900  # characters of prompt per line: ~1 KB lines, ~100,000 lines per 100 MB


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(target_bytes: int, fmt: str) -> tuple[int, int]:
    """(line count, exact byte size) of the generated file."""
    n, size = 0, 0
    for chunk in _gen(target_bytes, fmt):
        n += chunk.count(b"\n")
        size += len(chunk)
    return n, size


def _gen(target_bytes: int, fmt: str, block: int = 1 << 20) -> Iterator[bytes]:
    """Deterministic JSONL of about ``target_bytes``, yielded ~1 MB at a time."""
    buf: list[bytes] = []
    size = total = i = 0
    pad = "lorem ipsum " * (LINE_PAD // 12)
    while total < target_bytes:
        prompt = f"Request {i}: {pad}"
        if fmt == "openai":
            obj: dict[str, Any] = {"custom_id": f"r{i}", "method": "POST",
                                   "url": "/v1/completions",
                                   "body": {"model": "m", "prompt": prompt, "max_tokens": 16}}
        else:
            obj = {"custom_id": f"r{i}", "prompt": prompt, "max_tokens": 16}
        line = json.dumps(obj).encode() + b"\n"
        buf.append(line)
        size += len(line)
        total += len(line)
        i += 1
        if size >= block:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


def start_server(tmp: Path, *, redis_url: str, prefix: str) -> tuple[subprocess.Popen, str, dict]:
    """``neoxq api`` on a free port; returns (process, base url, env)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXQ_")}
    env.update({"NEOXQ_DATABASE_URL": f"sqlite:///{tmp / 'neoxq.db'}",
                "NEOXQ_DATA_DIR": str(tmp / "data"), "NEOXQ_REDIS_URL": redis_url,
                "NEOXQ_QUEUE": prefix.rstrip(":"), "NEOXQ_REDIS_KEY_PREFIX": prefix,
                "NEOXQ_MAX_LINES": "1000000", "NEOXQ_MAX_FILE_BYTES": str(300 << 20)})
    log = open(tmp / "api.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / "api.log").read_text())
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url, env
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("api did not start")


def measure(tmp: Path, *, size_mb: int = 100, paths: tuple[str, ...] = ("native", "openai"),
            redis_url: str = "redis://127.0.0.1:6379/1", create_openai_batch: bool = True
            ) -> dict[str, Any]:
    """Upload ``size_mb`` MB through each path on a fresh server; peak RSS per path."""
    out: dict[str, Any] = {"size_mb": size_mb, "paths": {}}
    for path in paths:
        prefix = f"neoxq_bench_{os.urandom(4).hex()}:"
        work = tmp / path
        work.mkdir(parents=True, exist_ok=True)
        proc, url, _ = start_server(work, redis_url=redis_url, prefix=prefix)
        try:
            target = size_mb * 1_000_000
            fmt = "openai" if path == "openai" else "native"
            n_lines, n_bytes = _lines(target, fmt)
            base_kb = _rss_kb(proc.pid, "VmRSS")
            t0 = time.perf_counter()
            with httpx.Client(base_url=url, timeout=600) as c:
                if path == "native":
                    r = c.post("/batches", content=_gen(target, fmt),
                               headers={"Content-Type": "application/x-ndjson",
                                        "Content-Length": str(n_bytes)})
                    r.raise_for_status()
                    batch = r.json()
                    total, status = batch["counts"]["total"], batch["status"]
                    t_upload = None
                else:
                    f = _multipart_upload(c, _gen(target, fmt), n_bytes)
                    t_upload = time.perf_counter() - t0
                    total, status = 0, "uploaded"
                    if create_openai_batch:
                        r = c.post("/v1/batches", json={"input_file_id": f["id"],
                                                        "endpoint": "/v1/completions",
                                                        "completion_window": "24h"})
                        r.raise_for_status()
                        total = r.json()["request_counts"]["total"]
                        status = r.json()["status"]
            seconds = time.perf_counter() - t0
            peak_kb = _rss_kb(proc.pid, "VmHWM")
            out["paths"][path] = {
                "bytes": n_bytes, "lines": n_lines, "items_stored": total, "status": status,
                "baseline_rss_mb": round(base_kb / 1024, 1),
                "peak_rss_mb": round(peak_kb / 1024, 1),
                "peak_over_baseline_mb": round((peak_kb - base_kb) / 1024, 1),
                "seconds": round(seconds, 2),
                "upload_seconds": round(t_upload, 2) if t_upload is not None else None,
                "mb_per_s": round(n_bytes / 1e6 / seconds, 1),
            }
        finally:
            stop(proc, timeout=20)
            drop_redis_keys(redis_url, prefix)
    return out


def _multipart_upload(c: httpx.Client, chunks: Iterator[bytes], n_bytes: int) -> dict:
    """A streamed multipart body (httpx would read a generator whole for ``files=``)."""
    boundary = "neoxqbench" + os.urandom(8).hex()
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"batch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        yield from chunks
        yield tail

    r = c.post("/v1/files", content=body(), headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + n_bytes + len(tail))})
    r.raise_for_status()
    return r.json()


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and write bench/results/api_upload.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=100)
    p.add_argument("--redis-url", default=os.environ.get("NEOXQ_TEST_REDIS",
                                                         "redis://127.0.0.1:6379") + "/1")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api_upload.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), size_mb=args.size_mb, redis_url=args.redis_url)
    commit = git_commit()
    result = {"benchmark": "api_upload", "commit": commit,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": f"{platform.processor() or platform.machine()} x{os.cpu_count()} (CPU)",
              "python": platform.python_version(), "database": "sqlite",
              "note": "peak_rss_mb is the API server's VmHWM (whole-process high-water mark) "
                      "after the upload and ingestion", **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
