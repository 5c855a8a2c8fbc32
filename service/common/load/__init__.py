"""The load request and what every side derives from it: normalization, device maps,
sources (local or hub), hub names and revisions, the pinned snapshot, progress."""
