"""Message payloads: what travels through Redis.

Messages carry *descriptors*, not prompts: a chunk is a batch id and a range of item
indexes, and the worker reads the prompts from the SQL store. A message stays small
whatever the prompts weigh, and the store stays the one source of truth (a chunk of a
cancelled batch is recognised when it is picked up).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChunkPayload(BaseModel):
    """Items ``[start, end)`` (0-based item indexes) of batch ``batch_id``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = Field(default=1, description="payload version")
    batch_id: str = Field(min_length=1, max_length=64)
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    # The batch's model: which queue the message goes to (core.celery_app.model_queue).
    # Workers read everything else from the store.
    model: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _range(self) -> ChunkPayload:
        if self.end <= self.start:
            raise ValueError(f"end: must be > start ({self.start}), got {self.end}")
        return self

    @classmethod
    def parse(cls, data: Any) -> ChunkPayload:
        """Validate a message body (a dict); raises pydantic's ValidationError."""
        return cls.model_validate(data)
