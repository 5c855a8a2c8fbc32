"""The real loader template (`service.loader.forker`), started by gpu_check with one
observation first: it imports the template's preload list module by module, as the
template does, and prints one JSON line naming the first module after which torch had
initialized CUDA (null: none did); then it runs the template's own entry point, which
prints "ready" once it serves (and, where the template checks this itself, refuses).

    python bench/gpu_check_template.py --listen PATH --owned
"""

from __future__ import annotations

import importlib
import json
import sys


def observe() -> dict[str, object]:
    import torch

    from service.loader.imports import preload

    first, missing = None, []
    before, after = preload()  # the template's two lists: before it serves, once it idles
    for name in [*before, *after]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
            continue
        if first is None and torch.cuda.is_initialized():
            first = name
    return {"initialized_by": first, "initialized": torch.cuda.is_initialized(), "missing": missing}


def main() -> int:
    print(json.dumps(observe()), flush=True)
    from service.loader.forker import main as template

    return template(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
