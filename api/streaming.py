"""Streaming responses whose body generators are closed when the stream ends."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi.responses import StreamingResponse


class ClosingStream(StreamingResponse):
    """A streaming response that closes its body iterator however the stream ends.

    When the client hangs up, Starlette cancels the streaming task; if the cancellation
    lands while it is writing a chunk (the socket's buffer full, as when the client
    stopped reading), the body generator stays suspended at its ``yield`` and its
    ``finally`` (a completion's abort in the engine, a download's database session) would
    only run whenever the generator is garbage-collected."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()


__all__ = ["ClosingStream"]
