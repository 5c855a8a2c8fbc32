"""The hub snapshot a load was priced at: its commit and file list, carried from the
admission helper through the serving process to the loader, so the loader downloads what
admission priced and resolves nothing again (the branch may have moved meanwhile).

The serving process only carries it; the loader checks it again as it would a hub's
listing (`hub.Plan.from_pin`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PinnedFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(max_length=1024)
    size: int = Field(ge=0)
    etag: str = Field(max_length=64)


class HubPin(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    commit: str = Field(max_length=40)
    files: tuple[PinnedFile, ...] = Field(max_length=100_000)
    # Offline, or the Hub did not answer: the complete cached snapshot admission found.
    cached_folder: str | None = Field(default=None, max_length=4096)
