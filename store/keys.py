"""API keys: created once (the plain key is shown only then), stored as a SHA-256 hash.

A key is 32 random bytes, so a fast unsalted hash is enough: nobody can brute-force
2^256 keys, and a lookup by hash is one indexed read per request. Once any key has
ever been created the server requires keys on every request (revoking the last key does
not silently open the server again).
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.tables import ApiKey, Batch, File, new_id, now

KEY_PREFIX = "nxq-"
# The owner of what is created while no key exists (loopback-only use).
LOCAL_OWNER = "local"


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256 hex."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def create_key(*, session: Session, name: str) -> tuple[ApiKey, str]:
    """Create a key named ``name``; returns its row and the plain key (shown only now).

    The first key ever created adopts what was made before keys existed (owner
    ``local``): once a key exists every request needs one, and no key could otherwise
    ever reach those batches and files again."""
    first = not keys_exist(session=session)
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key_"), name=name, key_hash=hash_key(plain),
                 prefix=plain[:12], created_at=now(), revoked_at=None)
    session.add(row)
    session.flush()
    if first:
        for table in (Batch, File):
            session.execute(update(table).where(table.owner == LOCAL_OWNER)
                            .values(owner=row.id).execution_options(synchronize_session=False))
    return row, plain


def list_keys(*, session: Session, include_revoked: bool = True) -> list[ApiKey]:
    """Keys, oldest first."""
    q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(q))


def revoke_key(*, session: Session, key_id: str) -> bool:
    """Revoke a key by id (or by its shown prefix); True if a live key was revoked."""
    res = session.execute(
        update(ApiKey)
        .where((ApiKey.id == key_id) | (ApiKey.prefix == key_id), ApiKey.revoked_at.is_(None))
        .values(revoked_at=now())
        .execution_options(synchronize_session=False)
    )
    return res.rowcount > 0


def verify_key(*, session: Session, key: str) -> ApiKey | None:
    """The live key row matching ``key``, or None."""
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).first()
    if row is None or row.revoked_at is not None:
        return None
    return row


def keys_exist(*, session: Session) -> bool:
    """Whether any key was ever created (then every request needs one)."""
    return session.scalars(select(ApiKey.id).limit(1)).first() is not None
