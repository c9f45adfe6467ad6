# syntax=docker/dockerfile:1.7
# The vitaudit CPU worker: torch (CPU build), timm, onnxruntime-gpu (it runs on its CPU
# provider without a GPU; never install `onnxruntime` beside it, both write one package).
#   docker build -f deploy/worker-cpu.Dockerfile -t vitaudit-worker-cpu .
# On a CPU, `vitaudit worker` forks a work-horse per audit (RQ Worker).
FROM python:3.11.7-slim-bookworm

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    VITAUDIT_DATA_DIR=/data

RUN groupadd --gid 10001 vitaudit \
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
STOPSIGNAL SIGTERM
CMD ["vitaudit", "worker"]
