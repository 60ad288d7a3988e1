# The Sponge image for deploy/kubernetes (front door and workers): the README's install steps
# (`pip install -e .`), plus the `kubernetes` extra for `sponge serve --backend kubernetes`.
#   docker build -t sponge:latest .
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SPONGE_CACHE_DIR=/var/cache/sponge
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sponge ./sponge
RUN python -m venv /app/.venv && /app/.venv/bin/pip install -e '.[kubernetes]' \
    && mkdir -p /var/cache/sponge && chown 65534:65534 /var/cache/sponge
ENV PATH=/app/.venv/bin:$PATH
# Not root: the front door needs only the API (its service account); a worker's CPU is resized by
# the kubelet, the worker only reads its own quota.
USER 65534:65534
EXPOSE 8000 8001 9000
CMD ["sponge", "serve", "--host", "0.0.0.0"]
