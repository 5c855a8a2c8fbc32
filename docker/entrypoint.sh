#!/bin/sh
# Container entrypoint. `serve` (the default) execs basehold as PID 1, so SIGTERM from
# `docker stop` / Kubernetes reaches it directly: it cancels loads, unloads every model
# (what it held is restored at the next start) and exits 0. Anything else is exec'd as given.
set -eu

if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    if [ "$#" -gt 0 ]; then
        shift
    fi
    exec basehold serve --host "${BASEHOLD_HOST:-0.0.0.0}" --port "${BASEHOLD_PORT:-8000}" "$@"
fi
exec "$@"
