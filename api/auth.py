"""Who is asking: bearer API keys, and the database session as dependencies.

Every batch and file belongs to an owner: the id of the key that created it, or
``local`` while no key exists. Without keys the server serves loopback clients only,
whatever address it binds; once a key has been created (by any process: it is looked up
per request until one exists) every request needs a live one, and an object of another
key answers 404, as a missing one does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from api.errors import ApiError
from core.settings import Settings
from store.db import make_sessionmaker
from store.keys import LOCAL_OWNER, keys_exist, verify_key


def is_loopback(host: str) -> bool:
    """Whether a client address is this machine (127.0.0.0/8, ::1, IPv4-mapped forms)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def get_settings_dep(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_db(request: Request) -> Engine:
    """The app's database engine."""
    return request.app.state.db


def get_session(request: Request) -> Iterator[Session]:
    """A session per request; routes that write commit explicitly."""
    with make_sessionmaker(request.app.state.db)() as session:
        yield session


def _keys_required(request: Request, session: Session) -> bool:
    # Keys are never deleted (revoked keys stay), so "required" never goes back to False:
    # cache it once seen.
    state = request.app.state
    if not getattr(state, "keys_required", False):
        state.keys_required = keys_exist(session=session)
    return state.keys_required


def current_owner(request: Request) -> str:
    """The caller's owner id from ``Authorization: Bearer <key>`` (or ``local``)."""
    # A session of its own, closed at once: an upload that follows may take minutes and
    # must not hold a pooled connection meanwhile.
    with make_sessionmaker(request.app.state.db)() as session:
        return _owner(request, session)


def _owner(request: Request, session: Session) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not _keys_required(request, session):
        host = request.client.host if request.client else ""
        if not is_loopback(host):
            raise ApiError(401, "No API keys exist; this server only answers loopback clients (its "
                                "own machine) until one does. Create a key with `neoxq keys "
                                "create NAME` (no restart needed) and send it as "
                                "'Authorization: Bearer <key>'.", code="invalid_api_key")
        return LOCAL_OWNER
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
    key = verify_key(session=session, key=token.strip())
    if key is None:
        raise ApiError(401, "Incorrect or revoked API key.", code="invalid_api_key")
    return key.id


SessionDep = Annotated[Session, Depends(get_session)]
OwnerDep = Annotated[str, Depends(current_owner)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
