"""kombu's Redis transport, hardened for the consuming side.

A list entry that is not JSON (something other than a producer of ours wrote to the
queue) makes the stock transport raise inside the consumer loop and the Celery worker
exits, taking every in-flight chunk with it; JSON without the message envelope is
mistaken for a lost connection. This channel logs and drops such an entry
instead - it was already popped, and no retry could parse it. A well-formed message
that is not a valid task is handled by Celery itself (logged and discarded).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger("neoxq.worker")


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        try:
            return super()._brpop_read(**options)
        except (ValueError, KeyError, TypeError) as exc:
            # Not JSON, or JSON without a message's envelope (the stock transport would
            # take the KeyError for a lost connection and reconnect, re-delivering every
            # message in flight).
            log.error("dropped a queue entry that is not a message: %r", exc)
            return True


class Transport(kombu_redis.Transport):
    Channel = Channel
