"""Schemathesis against the OpenAPI schema: generated requests to every route never get
a 5xx. Bounded (a few examples per operation, derandomized) to stay well under a minute."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from api.app import create_app
from store.db import create_all, make_engine, session_scope
from store.keys import create_key
from tests.api.conftest import drop_redis_keys, make_settings
from tests.conftest import REDIS_HOST_URL

KEY: dict[str, str] = {}


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{tmp / 'neoxq.db'}"
    redis_url = f"{REDIS_HOST_URL}/1"
    s = make_settings(url, redis_url, f"fuzz{tmp.name[-6:]}", tmp, max_file_bytes=1 << 20)
    db = make_engine(url)
    create_all(db)
    with session_scope(db) as session:
        _, KEY["key"] = create_key(session=session, name="fuzz")
    app = create_app(s, db=db, enqueue=lambda chunk: None)
    # Real objects, so that generated requests also reach past the 404s.
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        auth = {"Authorization": f"Bearer {KEY['key']}"}
        KEY["batch_id"] = c.post("/batches", content=b'{"prompt": "p"}\n', headers=auth
                                 ).json()["id"]
        KEY["file_id"] = c.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")},
                                data={"purpose": "batch"}, headers=auth).json()["id"]
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    db.dispose()
    drop_redis_keys(redis_url, s.redis_key_prefix)


def test_no_server_errors(fuzz_schema) -> None:
    # Hypothesis directly over each operation's strategy (schemathesis' pytest plugin does
    # not load with this pytest); every failure is collected, not just the first.
    failures: list[str] = []
    seen: list[tuple[str, str, int]] = []
    headers = {"Authorization": f"Bearer {KEY['key']}"}
    operations = [r.ok() for r in fuzz_schema.get_all_operations()]
    assert len(operations) >= 13

    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            if case.path_parameters and len(seen) % 2:  # every other case: a real object
                for name in case.path_parameters:  # parameters with no real object stay random
                    case.path_parameters[name] = KEY.get(name, case.path_parameters[name])
            response = case.call(headers=headers)
            seen.append((case.method, case.path, response.status_code))
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.query} -> "
                                f"{response.status_code}: {response.text[:300]}")

        run()
    assert not failures, "\n".join(failures[:20])
