"""`Client.lease_callback(model)`: a `transformers.TrainerCallback` for attached models.

- When the lease is lost (a forced unload, an expiry), it asks the Trainer to save a
  checkpoint and stop at the end of the current step, so no work is lost silently. With
  `on_lost="raise"` the step in flight finishes first: the raise comes only if training
  goes on after that.
- At the start of training it records the base model's provenance (the hub id and commit
  for hub loads) in the PEFT configs that do not name it yet, so the saved adapter's
  `adapter_config.json` names its base, never a server path.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from service.worker.lease_state import LeaseState

log = logging.getLogger("basehold.client")


class LeaseCallback(TrainerCallback):
    def __init__(self, lease: LeaseState, base_name: str, revision: str | None) -> None:
        self.lease = lease
        lease.deferred = True  # a loss now stops training at a step boundary, here
        self.base_name = base_name
        self.revision = revision

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for config in (getattr(kwargs.get("model"), "peft_config", None) or {}).values():
            if not getattr(config, "base_model_name_or_path", None):
                config.base_model_name_or_path = self.base_name
            if self.revision is not None and getattr(config, "revision", None) is None:
                config.revision = self.revision

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.lease.lost:
            log.warning(
                "stopping training at step %d with a checkpoint: %s",
                state.global_step,
                self.lease.why_not_usable(),
            )
            control.should_save = True
            control.should_training_stop = True
            self.lease.stopped = True  # from here on, forward passes raise
        return control
