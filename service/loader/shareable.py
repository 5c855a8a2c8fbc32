"""Why a model stays private (loader side)."""

from __future__ import annotations


class NotShareableModel(Exception):
    """Why a model stays private (the reason shows in ModelStatus.shareable_reason)."""
