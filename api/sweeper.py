"""The API's housekeeping thread: what no request will ever come back for.

Every ``sweep_interval`` seconds (and once at start-up):

- batches past ``expires_at`` become ``expired`` (store.queries.expire_batches), and
  batches left ``validating`` by an older version are failed;
- uploads a crash left behind are settled: an upload is written under a temporary name
  and renamed after its row is committed (api/uploads.py), so a temporary file untouched
  for ``stale_upload_after`` seconds is either committed (its row exists: finish the
  rename) or abandoned (no row: delete it); a file under a final name with no row (its
  row deleted by hand, a crash of an older version) is deleted too.

Several API processes may sweep the same directory and database at once: every step is
a conditional UPDATE or a rename/unlink that tolerates the file being gone already.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select

from api.uploads import TMP_PREFIX, final_path
from core.settings import Settings
from store.db import session_scope
from store.queries import expire_batches, fail_stale_validating
from store.tables import File

log = logging.getLogger("neoxq.api")


@dataclass
class SweepReport:
    """What one sweep did."""

    expired: int = 0
    failed_validating: int = 0
    renamed: int = 0
    removed: int = 0


def _file_rows(db: Engine, file_ids: list[str]) -> dict[str, str | None]:
    """``file id -> stored path`` of the ids that have a row."""
    out: dict[str, str | None] = {}
    with session_scope(db) as session:
        for i in range(0, len(file_ids), 500):
            out.update(session.execute(select(File.id, File.path).where(
                File.id.in_(file_ids[i:i + 500]))).tuples().all())
    return out


def sweep_uploads(db: Engine, files_dir: Path, *, stale_after: float,
                  at: float | None = None, busy: Container[Path] = ()) -> SweepReport:
    """Settle upload files older than ``stale_after`` seconds (see the module doc),
    except the ``busy`` ones (this process's uploads in flight)."""
    report = SweepReport()
    if not files_dir.is_dir():
        return report
    t = time.time() if at is None else at
    old: dict[str, Path] = {}
    for path in files_dir.iterdir():
        try:
            if path in busy or not path.is_file() or path.stat().st_mtime > t - stale_after:
                continue
        except FileNotFoundError:
            continue
        old[path.name.removeprefix(TMP_PREFIX).removesuffix(".jsonl")] = path
    if not old:
        return report
    rows = _file_rows(db, list(old))
    for file_id, path in old.items():
        tmp = path.name.startswith(TMP_PREFIX)
        target = final_path(path) if tmp else path
        try:
            if file_id in rows and rows[file_id] == str(target):
                if tmp:  # committed, then the process died before the rename
                    path.rename(target)
                    report.renamed += 1
                continue
            path.unlink()
            report.removed += 1
        except FileNotFoundError:
            continue
    if report.renamed or report.removed:
        log.info("uploads swept: %d renamed, %d removed", report.renamed, report.removed)
    return report


def sweep(db: Engine, settings: Settings, busy: Container[Path] = ()) -> SweepReport:
    """One sweep: expiry, stale validating batches, upload leftovers."""
    with session_scope(db) as session:
        expired = expire_batches(session=session)
        stale = fail_stale_validating(session=session, older_than=settings.stale_upload_after)
    if expired:
        log.info("batches expired: %s", expired)
    report = sweep_uploads(db, settings.files_dir, stale_after=settings.stale_upload_after,
                           busy=busy)
    report.expired, report.failed_validating = len(expired), len(stale)
    return report


class Sweeper(threading.Thread):
    """Runs :func:`sweep` every ``sweep_interval`` seconds until stopped."""

    def __init__(self, db: Engine, settings: Settings, busy: Container[Path] = ()) -> None:
        super().__init__(name="neoxq-sweeper", daemon=True)
        self.db, self.settings, self.busy = db, settings, busy
        self._stop_evt = threading.Event()

    def stop(self) -> None:
        self._stop_evt.set()

    def run(self) -> None:
        while True:
            try:
                sweep(self.db, self.settings, self.busy)
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try next time
                log.warning("sweep failed: %s", exc)
            if self._stop_evt.wait(self.settings.sweep_interval):
                return
