"""Settings validated at start-up; chunk payloads validated on receipt."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.celery_app import RUN_CHUNK, make_celery
from core.payloads import ChunkPayload
from core.settings import Settings


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEOXQ_QUEUE", "gpu-a")
    monkeypatch.setenv("NEOXQ_CHUNK_ITEMS", "64")
    s = Settings()
    assert (s.queue, s.chunk_items) == ("gpu-a", 64)
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("neoxq.db")


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ValidationError, match="database_url"):
        Settings(environment="production", database_url="")
    with pytest.raises(ValidationError, match="queue"):
        Settings(queue="two words")
    with pytest.raises(ValidationError):
        Settings(chunk_items=0)


def test_celery_app_is_explicit() -> None:
    app = make_celery(Settings(queue="q1", redis_key_prefix="p:", visibility_timeout=100))
    c = app.conf
    assert c.task_default_queue == "q1" and [q.name for q in c.task_queues] == ["q1"]
    assert c.task_create_missing_queues is False
    assert c.task_acks_late and c.task_reject_on_worker_lost
    assert c.worker_prefetch_multiplier == 1
    assert c.broker_transport_options["visibility_timeout"] == 100
    assert c.broker_transport_options["global_keyprefix"] == "p:"
    assert c.task_routes[RUN_CHUNK]["queue"] == "q1"


def test_chunk_payload_validation() -> None:
    p = ChunkPayload.parse({"batch_id": "batch_1", "start": 0, "end": 10})
    assert (p.batch_id, p.start, p.end, p.v) == ("batch_1", 0, 10, 1)
    for bad in ({"batch_id": "b", "start": 5, "end": 5}, {"batch_id": "", "start": 0, "end": 1},
                {"batch_id": "b", "start": -1, "end": 1}, {"batch_id": "b", "start": 0},
                {"batch_id": "b", "start": 0, "end": 1, "x": 1}, "garbage"):
        with pytest.raises(ValidationError):
            ChunkPayload.parse(bad)
