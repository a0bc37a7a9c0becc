"""``neoxq api`` (the HTTP server) and ``neoxq keys create|list|revoke``.

The server binds what ``--host`` says. While no API key exists it answers only clients on
this machine (loopback) and refuses others with a message naming ``neoxq keys create``; the
moment a key is created — by another process, e.g. ``docker compose exec api neoxq keys
create admin`` — every client is served with a key, no restart needed (the check is per
request: :mod:`api.auth`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def add_parser(sub: Any) -> None:
    """Register ``api`` and ``keys`` on the root parser's subparsers."""
    p = sub.add_parser(
        "api", help="run the HTTP API (native and OpenAI-compatible batches)",
        description="Serve the HTTP API with uvicorn. Until an API key exists it answers "
                    "only loopback clients; `neoxq keys create NAME` (any time, no restart) "
                    "opens it to other hosts, with keys.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (other hosts are served once an API key exists)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--database-url", default=None, help="overrides NEOXQ_DATABASE_URL")
    p.add_argument("--redis-url", default=None, help="overrides NEOXQ_REDIS_URL")
    p.add_argument("--queue", default=None, help="overrides NEOXQ_QUEUE")
    p.add_argument("--no-upgrade", action="store_true",
                   help="do not migrate the database schema at start")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_cmd_api)

    k = sub.add_parser("keys", help="API keys: create, list, revoke",
                       description="Manage bearer API keys (stored hashed; a key is shown "
                                   "once, when created).")
    k.add_argument("--database-url", default=None, help="overrides NEOXQ_DATABASE_URL")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    c = ksub.add_parser("create", help="create a key and print it (only this once)")
    c.add_argument("name", help="a label for the key (who or what uses it)")
    c.set_defaults(func=_cmd_keys_create)
    ls = ksub.add_parser("list", help="list keys (ids, prefixes, names, revoked)")
    ls.set_defaults(func=_cmd_keys_list)
    r = ksub.add_parser("revoke", help="revoke a key by id or prefix")
    r.add_argument("key_id")
    r.set_defaults(func=_cmd_keys_revoke)


def _settings(args: argparse.Namespace) -> Any:
    from core.settings import get_settings

    overrides = {k: v for k, v in {
        "database_url": getattr(args, "database_url", None),
        "redis_url": getattr(args, "redis_url", None),
        "queue": getattr(args, "queue", None)}.items() if v}
    return get_settings().model_copy(update=overrides)


def _engine(args: argparse.Namespace, upgrade: bool = True) -> Any:
    import migrations
    from store.db import make_engine

    settings = _settings(args)
    if upgrade:
        migrations.upgrade(settings.db_url)
    return make_engine(settings.db_url)


def _cmd_api(args: argparse.Namespace) -> int:
    """Run the API server until interrupted."""
    import uvicorn

    from api.app import create_app
    from store.db import session_scope
    from store.keys import keys_exist, list_keys

    settings = _settings(args)
    db = _engine(args, upgrade=not args.no_upgrade)
    with session_scope(db) as s:
        have_keys = keys_exist(session=s)
        live = len(list_keys(session=s, include_revoked=False))
    host = args.host
    if not have_keys:
        if host not in LOOPBACK_HOSTS:
            print(f"neoxq api: no API keys exist: answering loopback clients only, without "
                  f"authentication; other hosts reaching {host} are refused until a key is "
                  "created with `neoxq keys create NAME` (no restart needed)", file=sys.stderr)
        else:
            print(f"neoxq api: no API keys exist: listening on {host} (loopback) only, "
                  "without authentication", file=sys.stderr)
    else:
        print(f"neoxq api: API keys required ({live} active)", file=sys.stderr)
    print(f"neoxq api: http://{host}:{args.port} (database {_redact(settings.db_url)}, "
          f"queue {settings.queue!r})", file=sys.stderr, flush=True)
    app = create_app(settings, db=db)
    uvicorn.run(app, host=host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "(unparsable url)"


def _cmd_keys_create(args: argparse.Namespace) -> int:
    """Create an API key and print it once."""
    from store.db import session_scope
    from store.keys import create_key

    with session_scope(_engine(args)) as s:
        row, plain = create_key(session=s, name=args.name)
    print(plain)
    print(f"created {row.id} ({args.name}); store the key now: it is not shown again",
          file=sys.stderr)
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    """List API keys (never the keys themselves)."""
    import datetime as dt

    from store.db import session_scope
    from store.keys import list_keys

    with session_scope(_engine(args)) as s:
        rows = list_keys(session=s)
    print(f"{'ID':<30} {'PREFIX':<14} {'CREATED':<20} {'STATE':<8} NAME")
    for k in rows:
        created = dt.datetime.fromtimestamp(k.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M")
        state = "revoked" if k.revoked_at else "active"
        print(f"{k.id:<30} {k.prefix + '…':<14} {created:<20} {state:<8} {k.name}")
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke an API key by id or prefix."""
    from store.db import session_scope
    from store.keys import revoke_key

    with session_scope(_engine(args)) as s:
        ok = revoke_key(session=s, key_id=args.key_id)
    if not ok:
        print(f"no active key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0
