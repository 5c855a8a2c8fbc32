"""Skipping initializers on `meta` (attach, the estimate's skeleton) leaves every other
tensor's initialization to torch, from any thread, and puts torch's own back after."""

from __future__ import annotations

import threading

import torch
from torch import nn

from service.common import meta_init


def test_skipping_meta_init_leaves_every_other_tensor_to_torch() -> None:
    originals = {name: getattr(nn.init, name) for name in meta_init.INITIALIZERS}
    seen: dict[str, torch.Tensor] = {}

    def initialize_elsewhere() -> None:
        seen["thread"] = nn.init.ones_(torch.empty(3))

    with meta_init.skip_meta_init():
        on_meta = torch.empty(4, 4, device="meta")
        assert nn.init.kaiming_uniform_(on_meta, a=5**0.5) is on_meta
        assert nn.init.normal_(tensor=on_meta) is on_meta
        seen["here"] = nn.init.constant_(torch.empty(2, 2), 7.0)
        linear = nn.Linear(8, 8)  # on the CPU: initialized as ever
        thread = threading.Thread(target=initialize_elsewhere)
        thread.start()
        thread.join()
    assert torch.equal(seen["here"], torch.full((2, 2), 7.0))
    assert torch.equal(seen["thread"], torch.ones(3))
    assert linear.weight.abs().sum() > 0
    assert {name: getattr(nn.init, name) for name in meta_init.INITIALIZERS} == originals
