# syntax=docker/dockerfile:1.7
# The vitaudit API: Litestar + RQ client, no torch (the service never imports it).
#   docker build -f deploy/api.Dockerfile -t vitaudit-api .      (context: the repository root)
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VITAUDIT_DATA_DIR=/data

RUN groupadd --gid 10001 vitaudit \
    && useradd --uid 10001 --gid vitaudit --no-create-home --shell /usr/sbin/nologin vitaudit \
    && mkdir -p /app /data && chown vitaudit:vitaudit /data

WORKDIR /app
COPY deploy/requirements-api.txt /app/requirements-api.txt
RUN pip install -r /app/requirements-api.txt
COPY pyproject.toml README.md /app/
COPY service /app/service
COPY workers /app/workers
# --no-deps: the pins above are the whole environment; the `worker` extra is not installed.
RUN pip install --no-deps /app && python -c "import service.app, sys; assert 'torch' not in sys.modules"

USER vitaudit
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
# uvicorn drains on SIGTERM: it stops accepting connections and finishes requests in flight.
STOPSIGNAL SIGTERM
CMD ["vitaudit", "serve", "--host", "0.0.0.0", "--port", "8000"]
