# syntax=docker/dockerfile:1.7
# The vitaudit GPU worker: CUDA runtime, torch (CUDA build), timm, onnxruntime-gpu.
#   docker build -f deploy/worker.Dockerfile -t vitaudit-worker-gpu .
# On a GPU, `vitaudit worker` runs jobs in its own process (RQ SimpleWorker): CUDA cannot
# be used after a fork. The CPU variant is deploy/worker-cpu.Dockerfile.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch and torchvision come as a matched pair built for the CUDA of the base image.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    VITAUDIT_DATA_DIR=/data \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --gid 10001 vitaudit \
    && useradd --uid 10001 --gid vitaudit --no-create-home --shell /usr/sbin/nologin vitaudit \
    && mkdir -p /app /data && chown vitaudit:vitaudit /data

WORKDIR /app
RUN pip install --index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION}
COPY deploy/requirements-api.txt deploy/requirements-worker.txt /app/
RUN pip install -r /app/requirements-api.txt -r /app/requirements-worker.txt
COPY pyproject.toml README.md /app/
COPY service /app/service
COPY workers /app/workers
COPY deploy/worker_healthcheck.py /app/worker_healthcheck.py
RUN pip install --no-deps /app

USER vitaudit
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/app/worker_healthcheck.py"]
# RQ's warm shutdown: on SIGTERM the worker finishes its current audit, then exits. Give the
# container a stop grace period as long as an audit may run (compose stop_grace_period,
# Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
CMD ["vitaudit", "worker"]
