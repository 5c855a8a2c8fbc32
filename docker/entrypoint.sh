#!/bin/sh
# Container entrypoint. `serve` (the default) execs basehold as PID 1, so SIGTERM from
# `docker stop` / Kubernetes reaches it directly: it cancels loads, unloads every model
# (arenas in /dev/shm are removed) and exits 0. Anything else is exec'd as given.
set -eu

if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    if [ "$#" -gt 0 ]; then
        shift
    fi
    shm_kib=$(df -Pk /dev/shm | awk 'NR == 2 { print $2 }')
    if [ "${shm_kib:-0}" -lt 1048576 ]; then
        echo "basehold: /dev/shm is only ${shm_kib} KiB; models lent to workers live there." \
            "Start the container with --shm-size (compose: shm_size) >= their footprint." >&2
    fi
    exec basehold serve --host "${BASEHOLD_HOST:-0.0.0.0}" --port "${BASEHOLD_PORT:-8000}" "$@"
fi
exec "$@"
