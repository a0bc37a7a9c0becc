"""Uploads streamed to disk: raw bodies and multipart forms, with the size limit enforced
while the bytes arrive (413 as soon as the limit is passed, not after the whole upload).

Nothing holds a file whole: the raw body goes to disk 64 KB at a time; a multipart file
part is spooled to a temporary file by Starlette (1 MB in memory at most) and copied.
On the way, the longest line is checked, since ingestion reads one line at a time and a
single 200 MB "line" would otherwise be read into memory at once.

An upload is written under a temporary name (:func:`upload_paths`) and renamed to its
final name only after its row is committed, so a file under a final name always has a
row. Whatever a crash leaves under a temporary name, the sweeper (api/sweeper.py)
finishes (row committed: rename) or deletes (no row).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from api.errors import ApiError

# A line is one request; the model's context is 2,048 tokens (~10 KB of text), so a 4 MiB
# line can only be a mistake (a file without newlines, a binary upload).
MAX_LINE_BYTES = 4 * 1024 * 1024
# Multipart framing and small form fields on top of the file part itself.
MULTIPART_SLACK = 1024 * 1024
_COPY = 1024 * 1024


TMP_PREFIX = ".tmp-"


class _TooLarge(Exception):
    pass


class InFlight:
    """The temporary upload paths this process is writing or ingesting right now, which
    its sweeper must leave alone however old their last write (a large file is ingested
    long after its last byte arrived). Other API processes are protected by the
    sweeper's age limit."""

    def __init__(self) -> None:
        self._paths: set[Path] = set()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, path: Path) -> Iterator[None]:
        with self._lock:
            self._paths.add(path)
        try:
            yield
        finally:
            with self._lock:
                self._paths.discard(path)

    def __contains__(self, path: object) -> bool:
        with self._lock:
            return path in self._paths


def upload_paths(files_dir: Path, file_id: str) -> tuple[Path, Path]:
    """``(temporary, final)`` paths of an upload's content."""
    name = f"{file_id}.jsonl"
    return files_dir / f"{TMP_PREFIX}{name}", files_dir / name


def final_path(tmp: Path) -> Path:
    """The final path of a temporary upload path."""
    return tmp.with_name(tmp.name.removeprefix(TMP_PREFIX))


def safe_filename(name: str) -> str:
    """A client-given file name as stored: at most 512 characters, without NUL or lone
    surrogates (which the database cannot hold; replaced, not refused: it is a label)."""
    name = name.replace("\x00", "\ufffd")
    name = name.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    return name[:512] or "upload.jsonl"


def too_large(limit: int) -> ApiError:
    """The 413 answer for an upload over ``limit`` bytes."""
    return ApiError(413, f"The file is larger than the limit of {limit} bytes "
                         f"({limit / 2**20:.0f} MiB; NEOXQ_MAX_FILE_BYTES).",
                    code="file_too_large", param="file")


class LineScan:
    """Tracks the longest line of a byte stream fed in arbitrary chunks."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line, self.line, self.current = max_line, 1, 0
        self.too_long: int | None = None  # 1-based line number of the first too-long line

    def feed(self, chunk: bytes) -> None:
        if self.too_long is not None or not chunk:
            return
        parts = chunk.split(b"\n")
        lengths = [self.current + len(parts[0]), *map(len, parts[1:])]
        if len(parts) > 1:
            lengths_done = lengths[:-1]
            if max(lengths_done) > self.max_line:
                self.too_long = self.line + next(
                    i for i, n in enumerate(lengths_done) if n > self.max_line)
                return
        self.line += len(parts) - 1
        self.current = lengths[-1]
        if self.current > self.max_line:
            self.too_long = self.line

    def check(self) -> None:
        """Raise the 400 for a too-long line, if one was seen."""
        if self.too_long is not None:
            raise ApiError(400, f"line {self.too_long}: longer than {self.max_line} bytes "
                                "(one request per line expected)",
                           code="line_too_long", param="file", line=self.too_long)



class _ScannedWriter:
    """Writes an upload to ``out`` chunk by chunk, as it arrives: the 413 past ``limit``
    bytes, and every line's length checked on the way (:class:`LineScan`)."""

    def __init__(self, out: IO[bytes], limit: int) -> None:
        self.out, self.limit, self.size, self.scan = out, limit, 0, LineScan()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise too_large(self.limit)
        self.scan.feed(chunk)
        self.out.write(chunk)

    def finish(self) -> int:
        """Bytes written; the 400 for a too-long line, if one was seen."""
        self.scan.check()
        return self.size

def _check_declared_length(request: Request, limit: int, slack: int = 0) -> None:
    # The message names the file limit, whatever framing the request adds on top of it.
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + slack:
        raise too_large(limit)


async def save_raw_body(request: Request, dest: Path, *, limit: int) -> int:
    """Write the request body to ``dest``; returns its size. 413 past ``limit`` bytes."""
    _check_declared_length(request, limit)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with dest.open("wb") as out:
            writer = _ScannedWriter(out, limit)
            async for chunk in request.stream():
                writer.write(chunk)
        size = writer.finish()
    except ClientDisconnect:
        dest.unlink(missing_ok=True)
        raise ApiError(400, "the client disconnected during the upload",
                       code="incomplete") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return size


def _limited_receive(receive: Callable[[], Awaitable[dict[str, Any]]], limit: int):
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
        return message

    return wrapped


def _copy_scanned(src: IO[bytes], dest: Path, limit: int) -> int:
    src.seek(0)
    with dest.open("wb") as out:
        writer = _ScannedWriter(out, limit)
        while chunk := src.read(_COPY):
            writer.write(chunk)
    return writer.finish()


async def save_multipart(request: Request, dest: Path, *, limit: int,
                         file_field: str = "file") -> tuple[int, str, list[tuple[str, str]]]:
    """Parse a multipart form whose ``file_field`` part is written to ``dest``.

    Returns ``(size, filename, other fields)``. 413 past ``limit`` bytes of file.
    """
    from starlette.concurrency import run_in_threadpool

    _check_declared_length(request, limit, MULTIPART_SLACK)
    limited = Request(request.scope, _limited_receive(request.receive, limit + MULTIPART_SLACK))
    try:
        form = await limited.form(max_files=1, max_fields=50)
    except _TooLarge:
        raise too_large(limit) from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected during the upload",
                       code="incomplete") from None
    try:
        upload = form.get(file_field)
        if not isinstance(upload, UploadFile):
            raise ApiError(400, f"{file_field}: a file part named {file_field!r} expected",
                           code="missing_file", param=file_field)
        fields = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = await run_in_threadpool(_copy_scanned, upload.file, dest, limit)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return size, safe_filename(upload.filename or "upload.jsonl"), fields
    finally:
        await form.close()


def multipart_or_raw(request: Request) -> str:
    """``"multipart"`` or ``"raw"`` from the request's content type."""
    ctype = request.headers.get("content-type", "").lower()
    return "multipart" if ctype.startswith("multipart/form-data") else "raw"


def remove(path: Path) -> None:
    """Delete a stored upload (ignoring one that is already gone)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
