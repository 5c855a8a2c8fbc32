#!/bin/sh
# Build the image on a local Debian base and run it: load a tiny model from a mounted
# directory through the API; a second container of the image (another uid in the socket
# group, its own PID namespace, only the socket folder shared) attaches to it, trains 3
# LoRA steps and gets from_pretrained's logits; unload it, stop the container (SIGTERM)
# and expect exit 0.
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
    docker rm -f basehold-smoke basehold-smoke-worker >/dev/null 2>&1 || true
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
# The socket folder on the host, as the DaemonSet's hostPath: the service's (uid 10001),
# group 20001 (BASEHOLD_SOCKET_GROUP), in a parent only root can write.
run="$work/run"
rm -rf "$run"
install -d -m 0755 "$run"
install -d -m 0750 -o 10001 -g 20001 "$run/socket"

docker run -d --name basehold-smoke --network host \
    -v "$models:/models:ro" -v "$run:/run/basehold-host" --group-add 20001 \
    -e BASEHOLD_SOCKET=/run/basehold-host/socket/basehold.sock -e BASEHOLD_SOCKET_GROUP=20001 \
    -e BASEHOLD_PORT="$port" -e BASEHOLD_HOST=127.0.0.1 \
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
print("smoke: loaded through the API")
PY
# The training job: another container, uid 20002 in group 20001, a PID namespace of its
# own (docker's default), nothing shared but the socket folder; the script on stdin.
docker run -i --rm --name basehold-smoke-worker --network host --user 20002:20002 \
    --group-add 20001 -v "$run:/run/basehold-host" -e HOME=/tmp \
    --entrypoint /opt/basehold/bin/python3 basehold:smoke - "http://127.0.0.1:$port" tiny \
    <docker/smoke_worker.py >"$work/worker.json" 2>"$work/worker.log" || {
    tail -30 "$work/worker.log"
    exit 1
}
"$python" - "$port" "$models/tiny" "$work/worker.json" <<'PY'
import json, sys, httpx, torch
from transformers import AutoModelForCausalLM
url, path, out = f"http://127.0.0.1:{sys.argv[1]}", sys.argv[2], sys.argv[3]
got = json.loads(open(out).read().strip().splitlines()[-1])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
with torch.no_grad():
    expected = model(torch.tensor([[1, 15, 27, 300, 400, 9, 81, 2]])).logits
assert got["uid"] == 20002, got["uid"]
assert torch.allclose(torch.tensor(got["logits"]), expected, atol=1e-5), "logits differ"
assert len(got["losses"]) == 3 and got["losses"][-1] < got["losses"][0], got["losses"]
assert httpx.delete(f"{url}/v1/models/tiny").status_code == 204
print(f"smoke: a worker container (uid 20002) attached, logits = from_pretrained, "
      f"LoRA losses {got['losses'][0]:.3f} -> {got['losses'][-1]:.3f}; unloaded")
PY
docker logs basehold-smoke 2>&1 | grep "another PID namespace uid 20002" >/dev/null || {
    echo "smoke: the service did not log the worker as another PID namespace"
    docker logs basehold-smoke 2>&1 | tail -20
    exit 1
}
log "two containers: the worker attached through the shared socket folder"
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
