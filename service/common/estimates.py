"""What a load will take, as a loader prices it and the serving process admits it: bytes
per device, and for a hub source what its download writes first and the snapshot priced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.common.load.pin import HubPin


@dataclass(frozen=True)
class Download:
    """What a hub load will write to the HF cache's disk before it loads."""

    cache: str  # the HF cache folder
    snapshot: str  # repo@commit: loads of one snapshot share its download
    bytes: int  # what the cache lacks (partial files count as fetched)
    free: int  # the cache disk's free bytes when it was priced (no probe under a lock)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Download:
        cache, snapshot = str(data["cache"]), str(data["snapshot"])
        return cls(cache, snapshot, int(data["bytes"]), int(data["free"]))


@dataclass(frozen=True)
class Estimate:
    """What a load will take (from `service.loader.estimate`, run in a loader process)."""

    total_bytes: int  # the model's own bytes
    by_device: dict[str, int]  # what the load peaks at on each device (admission uses it)
    largest_layer_bytes: int
    download: Download | None = None  # hub sources with files to fetch
    pin: HubPin | None = None  # hub sources: the snapshot priced, which the load downloads
    # Included in by_device: what placing the model in device segments adds on its GPU.
    placing_bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "total_bytes": self.total_bytes,
            "by_device": self.by_device,
            "largest_layer_bytes": self.largest_layer_bytes,
            "download": None if self.download is None else vars(self.download),
            "pin": None if self.pin is None else self.pin.model_dump(mode="json"),
            "placing_bytes": self.placing_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Estimate:
        download, pin = data.get("download"), data.get("pin")
        return cls(
            total_bytes=int(data["total_bytes"]),
            by_device={str(k): int(v) for k, v in data["by_device"].items()},
            largest_layer_bytes=int(data["largest_layer_bytes"]),
            download=None if download is None else Download.from_json(download),
            pin=None if pin is None else HubPin.model_validate(pin),
            placing_bytes=int(data.get("placing_bytes", 0)),
        )
