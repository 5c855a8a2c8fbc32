"""A process that knows nothing but a saved adapter's folder: it loads the adapter with
`AutoPeftModelForCausalLM.from_pretrained`, which finds the base from the adapter's own
`base_model_name_or_path`, and saves the adapted logits.

    python -m tests.worker.auto_peft ADAPTER_DIR OUT_FILE
"""

from __future__ import annotations

import json
import sys

import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import save_file

from tests.worker.hf_worker import TOKENS


def main(adapter: str, out: str) -> None:
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
    save_file({"logits": logits.contiguous()}, out)
    base = model.get_base_model()
    print(json.dumps({"base": base.config._name_or_path}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
