#!/bin/sh
# Container entrypoint. `serve` (the default) execs basehold as PID 1, so SIGTERM from
# `docker stop` / Kubernetes reaches it directly: it cancels loads, unloads every model
# (what it held is restored at the next start) and exits 0. Anything else is exec'd as given.
set -eu

# A start that cannot be right stops here with one line (exit 78, EX_CONFIG), before
# torch is imported: keys left as docker/basehold.env.example has them, or none at all
# on a non-loopback address (the env file was not made, or lacks them).
refuse() {
    echo "basehold: $*" >&2
    exit 78
}

check_keys() {
    keys=${BASEHOLD_API_KEYS:-}
    # The examples' placeholder keys contain "change-me" (docker/basehold.env.example) or
    # "replace-" (deploy/examples/secret.example.yaml); the service refuses them as well
    # (PLACEHOLDER_KEY_MARKS in service/serving/settings.py).
    case "$keys" in
    *[Cc][Hh][Aa][Nn][Gg][Ee]-[Mm][Ee]* | *[Rr][Ee][Pp][Ll][Aa][Cc][Ee]-*)
        refuse "BASEHOLD_API_KEYS still holds the example's placeholder keys (change-me-..., replace-...):" \
            "generate each key with" \
            "python3 -c \"import secrets; print(secrets.token_urlsafe(24))\"" \
            "and put them in docker/basehold.env (BASEHOLD_WORKER_TOKEN: the job key)"
        ;;
    esac
    # No keys: only a loopback address, or an explicit BASEHOLD_ALLOW_UNAUTHENTICATED_REMOTE
    # (whose value basehold itself judges), may serve.
    if [ -z "$(printf '%s' "$keys" | tr -d ' \t{}')" ] &&
        [ -z "${BASEHOLD_ALLOW_UNAUTHENTICATED_REMOTE:-}" ]; then
        case "${BASEHOLD_HOST:-0.0.0.0}" in
        127.* | localhost | ::1) ;;
        *)
            refuse "no API keys (BASEHOLD_API_KEYS is empty): with compose," \
                "cp docker/basehold.env.example docker/basehold.env and put generated keys in;" \
                "with docker run, pass -e BASEHOLD_API_KEYS='{\"<key>\": [\"admin\"]}'"
            ;;
        esac
    fi
}

if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    if [ "$#" -gt 0 ]; then
        shift
    fi
    check_keys
    exec basehold serve --host "${BASEHOLD_HOST:-0.0.0.0}" --port "${BASEHOLD_PORT:-8000}" "$@"
fi
exec "$@"
