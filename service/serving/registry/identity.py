"""Normalized specs and the ids derived from them."""

from __future__ import annotations

import hashlib
import json
import re

from service.common.load.spec import LoadRequest

# Every id basehold gives: a request's `name`, or a derived id (slug + hash).
MODEL_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def spec_key(spec: LoadRequest) -> str:
    canonical = json.dumps(spec.canonical(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def derived_id(spec: LoadRequest, key: str) -> str:
    """A readable, stable id: the source's last path part plus a short spec hash."""
    tail = spec.source.rstrip("/").rsplit("/", 1)[-1].lower()
    slug = re.sub(r"[^a-z0-9._-]+", "-", tail).strip("-._")[:48] or "model"
    return f"{slug}-{key[:8]}"
