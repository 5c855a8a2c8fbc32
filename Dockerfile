# basehold: one container per GPU node; training workers run beside it, share the folder
# of its arena socket (/run/basehold: workers get the sealed arenas and the GPU segments'
# fds there).
#
#   docker build -t basehold .
#   docker run --gpus all -p 8000:8000 -v basehold-run:/run/basehold \
#     -e BASEHOLD_API_KEYS='{"<admin key>": ["admin"], "<worker key>": ["worker"]}' \
#     -v hf-cache:/var/cache/huggingface -v basehold-state:/var/lib/basehold basehold
#
# NVIDIA_VISIBLE_DEVICES=void: CUDA base images say `all`, which hands every GPU of the node
# to any container of this image, outside the scheduler. A container sees the GPUs it asks
# for (docker --gpus, compose's device reservation, nvidia.com/gpu or a DRA claim), no more.
# BASE_IMAGE must provide python3 with venv. The default brings CUDA and a CUDA build of
# torch; CI passes a local Debian base and a CPU torch wheel through docker/wheels/.
# Few layers on purpose: each one is a full copy with the vfs storage driver CI uses.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
# Optional: a CA bundle for a TLS-intercepting proxy, placed in docker/wheels/ (CI uses it).
ARG PIP_CERT=""
COPY . /src
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; else PIP_CERT="/src$PIP_CERT"; export PIP_CERT; fi \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --quiet build==1.3.0 \
    && /opt/build/bin/python -m build --wheel --outdir /dist /src

FROM ${BASE_IMAGE}
ARG TORCH_SPEC="torch>=2.4,<2.15"
# The CUDA major of BASE_IMAGE: cuda-bindings of that major (the gpu-cuN extra), never a
# newer one, which a node's driver of this CUDA would refuse. Change both together.
ARG CUDA_MAJOR=12
ARG PIP_CERT=""
ENV VIRTUAL_ENV=/opt/basehold \
    PATH=/opt/basehold/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/cache/huggingface \
    BASEHOLD_STATE_DIR=/var/lib/basehold/state \
    BASEHOLD_MODEL_ROOTS='["/models", "/var/lib/basehold/models"]' \
    BASEHOLD_SOCKET=/run/basehold/basehold.sock \
    BASEHOLD_PORT=8000 \
    NVIDIA_VISIBLE_DEVICES=void
# Metadata first: with the legacy builder + vfs, every later step copies the whole image.
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "/usr/local/lib/basehold/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/basehold-entrypoint"]
CMD ["serve"]
WORKDIR /var/lib/basehold
COPY --from=build /dist /tmp/inputs/dist
COPY . /tmp/inputs
# --system-site-packages: a base image's own torch (with CUDA) is used as is. TORCH_SPEC is
# a range on purpose (the base's torch satisfies it); the project wheel pins the rest.
# hadolint ignore=DL3013
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; else PIP_CERT="/tmp/inputs$PIP_CERT"; export PIP_CERT; fi \
    && python3 -m venv --system-site-packages /opt/basehold \
    && pip install --no-cache-dir --quiet --find-links /tmp/inputs/docker/wheels "${TORCH_SPEC}" \
    && for wheel in /tmp/inputs/dist/*.whl; do \
        pip install --no-cache-dir --quiet --find-links /tmp/inputs/docker/wheels "${wheel}[train,gpu-cu${CUDA_MAJOR}]"; \
    done \
    && install -m 0755 /tmp/inputs/docker/entrypoint.sh /usr/local/bin/basehold-entrypoint \
    && install -D -m 0644 /tmp/inputs/docker/healthcheck.py /usr/local/lib/basehold/healthcheck.py \
    && cp -r /tmp/inputs/examples /opt/basehold-examples \
    && rm -rf /tmp/inputs \
    && (getent passwd basehold || useradd --system --uid 10001 --create-home basehold) \
    && mkdir -p /var/lib/basehold/state /var/lib/basehold/models /var/cache/huggingface /models /adapters \
    && install -d -m 0700 -o 10001 /run/basehold \
    && chown -R 10001 /var/lib/basehold /var/cache/huggingface /adapters
VOLUME ["/var/cache/huggingface", "/var/lib/basehold"]
USER 10001
