"""Where the serving process finds its keeper (`service.keeper`): the environment the
keeper starts it with. Stdlib only, as the keeper is."""

from __future__ import annotations

FD_SETTING = "BASEHOLD_KEEPER_FD"  # the serving process's end of the keeper's socketpair
RESTARTS_SETTING = "BASEHOLD_KEEPER_RESTARTS"  # how many times the keeper started it again
