"""API keys: bearer auth, hashed storage, and isolation (another key's objects are 404)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from store.db import session_scope
from store.keys import hash_key, list_keys, revoke_key
from store.tables import ApiKey
from tests.api.conftest import Api, jsonl, prompts

NDJSON = {"content-type": "application/x-ndjson"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_stored_hashed(api: Api) -> None:
    key = api.key("alice")
    with session_scope(api.db) as s:
        row = s.scalars(select(ApiKey)).one()
        assert row.key_hash == hash_key(key) and key not in (row.key_hash, row.prefix, row.id)
        assert key.startswith(row.prefix)


def test_requests_need_a_live_key_once_keys_exist(api: Api) -> None:
    assert api.client.get("/batches").status_code == 200  # no keys yet: loopback is open
    key = api.key()
    r = api.client.get("/batches")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert api.client.get("/batches", headers=bearer("nxq-wrong")).status_code == 401
    assert api.client.get("/batches", headers={"Authorization": key}).status_code == 401
    assert api.client.get("/batches", headers=bearer(key)).status_code == 200
    assert api.client.get("/healthz").status_code == 200  # health needs no key
    with session_scope(api.db) as s:
        kid = list_keys(session=s)[0].id
        assert revoke_key(session=s, key_id=kid)
    assert api.client.get("/batches", headers=bearer(key)).status_code == 401
    # Revoking the last key does not open the server again.
    assert api.client.get("/batches").status_code == 401


def test_two_keys_see_only_their_own_batches_and_files(api: Api) -> None:
    alice, bob = api.key("alice"), api.key("bob")
    c = api.client
    a_batch = c.post("/batches", content=jsonl(prompts(2)),
                     headers={**NDJSON, **bearer(alice)}).json()["id"]
    a_file = c.post("/v1/files", files={"file": ("in.jsonl", jsonl([
        {"custom_id": "x", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "p"}}]))}, data={"purpose": "batch"},
        headers=bearer(alice)).json()["id"]
    a_obatch = c.post("/v1/batches", json={"input_file_id": a_file,
                                           "endpoint": "/v1/completions",
                                           "completion_window": "24h"},
                      headers=bearer(alice)).json()["id"]
    b_batch = c.post("/batches", content=jsonl(prompts(1)),
                     headers={**NDJSON, **bearer(bob)}).json()["id"]
    for method, path, body in [
        ("GET", f"/batches/{a_batch}", None), ("POST", f"/batches/{a_batch}/cancel", None),
        ("GET", f"/batches/{a_batch}/results", None), ("GET", f"/batches/{a_batch}/errors", None),
        ("GET", f"/v1/files/{a_file}", None), ("GET", f"/v1/files/{a_file}/content", None),
        ("DELETE", f"/v1/files/{a_file}", None), ("GET", f"/v1/batches/{a_obatch}", None),
        ("POST", f"/v1/batches/{a_obatch}/cancel", None),
        ("POST", "/v1/batches", {"input_file_id": a_file, "endpoint": "/v1/completions",
                                 "completion_window": "24h"}),
    ]:
        r = c.request(method, path, json=body, headers=bearer(bob))
        assert r.status_code == 404, (method, path, r.status_code)
        assert r.json()["error"]["code"] == "not_found"
    assert [b["id"] for b in c.get("/batches", headers=bearer(bob)).json()["data"]] == [b_batch]
    b_input = c.get(f"/batches/{b_batch}", headers=bearer(bob)).json()["input_file_id"]
    assert [f["id"] for f in c.get("/v1/files", headers=bearer(bob)).json()["data"]] == [
        b_input]  # his native upload, not Alice's file
    assert [b["id"] for b in c.get("/v1/batches", headers=bearer(bob)).json()["data"]] == [
        b_batch]
    # Bob cannot page through Alice's list with her ids either.
    assert c.get("/batches", params={"after": a_batch}, headers=bearer(bob)
                 ).json()["data"] == []
    # Alice still has everything.
    assert c.get(f"/batches/{a_batch}", headers=bearer(alice)).status_code == 200
    assert c.get(f"/v1/files/{a_file}/content", headers=bearer(alice)).status_code == 200
    assert len(c.get("/batches", headers=bearer(alice)).json()["data"]) == 2


def test_without_keys_only_loopback_clients_are_served(api: Api) -> None:
    remote = TestClient(create_app(api.settings, db=api.db), client=("203.0.113.7", 4000))
    r = remote.get("/batches")
    assert r.status_code == 401 and "loopback" in r.json()["error"]["message"]
    key = api.key()
    assert remote.get("/batches", headers=bearer(key)).status_code == 200
