"""The compose worker's entrypoint (worker side): ensure the base a job trains on, then run
the job on it.

    ensure_and_run.py COMMAND [ARGS...]

Ensures BASEHOLD_WORKER_LOAD (a load request: the JSON body of POST /v1/models) at
BASEHOLD_URL with BASEHOLD_WORKER_TOKEN, a key with the "ensure" and "worker" scopes: the
service loads the model unless it holds it already, and this waits until it is ready
(`"device_map": "this-gpu"` names the GPU this container sees). Then it execs COMMAND with
BASEHOLD_MODEL (the model's id) and BASEHOLD_TOKEN set, which examples/train_lora.py reads.
A setting that is wrong, or a load that fails, ends it with one line naming what to change.
"""

from __future__ import annotations

import json
import os
import sys

import httpx

from service.client import BaseholdError, Client
from service.worker.gpu import GpuNotFound

# What the examples' placeholder keys contain (PLACEHOLDER_KEY_MARKS of settings.py: not
# imported, the worker side imports nothing of the serving side).
PLACEHOLDER_KEY_MARKS = ("change-me", "replace-")
EX_CONFIG = 78


class Refused(Exception):
    """A setting of the worker's environment is wrong: the message says which and how."""


def token_from(env: dict[str, str]) -> str:
    token = env.get("BASEHOLD_WORKER_TOKEN", "").strip()
    if not token:
        raise Refused(
            "BASEHOLD_WORKER_TOKEN is not set: put the job key (scopes ensure and worker) "
            "in docker/basehold.env"
        )
    if any(mark in token.lower() for mark in PLACEHOLDER_KEY_MARKS):
        raise Refused(
            "BASEHOLD_WORKER_TOKEN is still the example's placeholder: set it to the job key "
            "of BASEHOLD_API_KEYS in docker/basehold.env"
        )
    return token


def load_request_from(env: dict[str, str]) -> dict[str, object]:
    text = env.get("BASEHOLD_WORKER_LOAD", "")
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Refused(f"BASEHOLD_WORKER_LOAD is not JSON ({exc.msg})") from None
    if not isinstance(request, dict) or not request.get("source"):
        raise Refused(
            'BASEHOLD_WORKER_LOAD must be a load request, e.g. {"source": "Qwen/Qwen2.5-0.5B", '
            '"device_map": "this-gpu"}'
        )
    return request


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: ensure_and_run.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    env = dict(os.environ)
    try:
        token = token_from(env)
        request = load_request_from(env)
    except Refused as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return EX_CONFIG
    timeout = float(env.get("BASEHOLD_WORKER_WAIT", "3600"))
    source = request["source"]
    print(f"worker: ensuring {source} (loaded unless held; waits until ready)", flush=True)
    try:
        status = Client(env.get("BASEHOLD_URL"), token=token).ensure(request, timeout=timeout)
    except (BaseholdError, GpuNotFound, httpx.HTTPError, OSError) as exc:
        print(f"worker: could not ensure {source}: {exc}", file=sys.stderr)
        return 1
    model_id = str(status["id"])
    print(f"worker: {model_id} is ready; running {' '.join(argv)}", flush=True)
    os.execvpe(argv[0], argv, {**env, "BASEHOLD_MODEL": model_id, "BASEHOLD_TOKEN": token})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
