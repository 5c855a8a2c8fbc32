"""What a load may start before transformers loads: the arena written while it loads, by
a copy of the files' bytes (`direct.Prefetch`) or by its casts (`cast_arena.CastArena`).
Both are run within (`loading()`), adopted by `share` (`adopt`) and closed by the load."""

from __future__ import annotations

from service.loader.cast_arena import CastArena
from service.loader.direct import Prefetch

Ahead = Prefetch | CastArena
