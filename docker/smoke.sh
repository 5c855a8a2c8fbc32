#!/bin/sh
# Build the image on a local Debian base and run it: load a tiny model from a mounted
# directory through the API, unload it, stop the container (SIGTERM) and expect exit 0.
# Needs root. No image can be pulled here, so the base is made with debootstrap and the
# CPU torch wheel comes from the machine's disk (/opt/wheels) through docker/wheels/.
set -eu
cd "$(dirname "$0")/.."
start=$(date +%s)
work=${SMOKE_WORK:-/var/tmp/basehold-smoke}
sock=unix://$work/docker.sock
port=${SMOKE_PORT:-18765}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$work"

log() { echo "smoke: $* ($(( $(date +%s) - start ))s)"; }

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi

docker() { command docker --host "$sock" "$@"; }
dockerd_pid=""
cleanup() {
    docker rm -f basehold-smoke >/dev/null 2>&1 || true
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# overlay2 where the kernel allows it (fast); vfs otherwise (every layer a full copy).
start_engine() {
    dockerd --host "$sock" --data-root "$work/data-$1" --exec-root "$work/exec" \
        --pidfile "$work/dockerd.pid" --bridge=none --iptables=false --ip6tables=false \
        --storage-driver="$1" >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    i=0
    until docker info >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge 30 ] || ! kill -0 "$dockerd_pid" 2>/dev/null; then
            kill "$dockerd_pid" 2>/dev/null || true
            wait "$dockerd_pid" 2>/dev/null || true
            dockerd_pid=""
            return 1
        fi
        sleep 1
    done
}
if start_engine overlay2; then
    driver=overlay2
else
    start_engine vfs || { cat "$work/dockerd.log"; exit 1; }
    driver=vfs
fi
log "docker engine up (storage driver $driver)"

if ! docker image inspect basehold-base:local >/dev/null 2>&1; then
    rootfs="$work/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1
    tar -C "$rootfs" -c . | docker import - basehold-base:local >/dev/null
    rm -rf "$rootfs"
    log "local base image built"
fi

cp /opt/wheels/torch-2.13.0+cpu-*.whl docker/wheels/ 2>/dev/null || true
# This machine reaches PyPI through a TLS-intercepting proxy: hand its CA to pip.
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" docker/wheels/ca-bundle.crt
docker build --network host -q -t basehold:smoke \
    --build-arg BASE_IMAGE=basehold-base:local \
    --build-arg PIP_CERT=/docker/wheels/ca-bundle.crt \
    --build-arg TORCH_SPEC=torch==2.13.0+cpu . >"$work/build.log" 2>&1 || {
    tail -30 "$work/build.log"
    exit 1
}
log "image built"

models="$work/models"
rm -rf "$models"
mkdir -p "$models"
"$python" -c "
import sys; sys.path.insert(0, '.')
from tests.checkpoints import llama
llama(__import__('pathlib').Path('$models/tiny'))
"
chmod -R a+rX "$models"

docker run -d --name basehold-smoke --network host \
    -v "$models:/models:ro" -e BASEHOLD_PORT="$port" -e BASEHOLD_HOST=127.0.0.1 \
    basehold:smoke >/dev/null
"$python" - "$port" <<'PY'
import sys, time, httpx
url = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 180
while True:
    try:
        if httpx.get(f"{url}/readyz").status_code == 200:
            break
    except httpx.TransportError:
        pass
    assert time.monotonic() < deadline, "container never became ready"
    time.sleep(0.5)
created = httpx.post(f"{url}/v1/models", json={"source": "/models/tiny", "name": "tiny"})
assert created.status_code == 202, created.text
while (status := httpx.get(f"{url}/v1/models/tiny").json())["state"] in ("queued", "loading"):
    time.sleep(0.2)
assert status["state"] == "ready", status
assert status["shareable"] is True, status
assert httpx.delete(f"{url}/v1/models/tiny").status_code == 204
print("smoke: load/unload through the API ok")
PY
i=0
until [ "$(docker inspect --format '{{.State.Health.Status}}' basehold-smoke)" = healthy ]; do
    i=$((i + 1))
    if [ "$i" -ge 60 ]; then
        docker inspect --format '{{json .State.Health}}' basehold-smoke
        exit 1
    fi
    sleep 1
done
log "HEALTHCHECK reports healthy"
docker stop --time 60 basehold-smoke >/dev/null
code=$(docker inspect --format '{{.State.ExitCode}}' basehold-smoke)
docker logs basehold-smoke 2>&1 | tail -5
[ "$code" = 0 ] || { echo "smoke: container exited $code"; exit 1; }
log "container stopped by SIGTERM with exit 0; smoke run done"
