# syntax=docker/dockerfile:1
# One image for every role: edge (daphne, the default command), relay (run_backplane), the
# compaction job, a one-shot migrate, or the single-node `serve`. Pick the role with the command
# (deploy/compose.yaml runs them all). Runtime dependencies only: requirements.txt up to its
# "# Tests and tooling" line, under constraints.txt.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY requirements.txt constraints.txt ./
RUN sed '/^# Tests and tooling/,$d' requirements.txt > runtime.txt \
    && python -m venv /venv \
    && /venv/bin/pip install --no-cache-dir -r runtime.txt -c constraints.txt
COPY manage.py ./
COPY tyrum ./tyrum
COPY backplane ./backplane
# The admin's CSS, served by WhiteNoise from every edge; the settings need no services for this.
RUN /venv/bin/python manage.py collectstatic --no-input -v 0

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DJANGO_SETTINGS_MODULE=tyrum.settings PATH=/venv/bin:$PATH
RUN useradd --system --uid 10001 --no-create-home --home-dir /app tyrum
WORKDIR /app
COPY --from=build /venv /venv
COPY --from=build /src/manage.py ./
COPY --from=build /src/tyrum ./tyrum
COPY --from=build /src/backplane ./backplane
COPY --from=build --chown=tyrum /src/var ./var
USER tyrum
EXPOSE 8000
# An edge's liveness (/livez answers whatever the Host). Relays and the compactor serve no HTTP:
# deploy/compose.yaml gives them their own checks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"]

# Edge:       docker run -e EDGE_ID=edge-a -e SECRET_KEY=… -e DATABASE_URL=… -e REDIS_URL=… IMAGE
# Relay:      docker run … IMAGE python manage.py run_backplane
# Compaction: docker run … IMAGE python manage.py compact_outbox
# Migrate:    docker run … IMAGE python manage.py migrate --no-input
# Embedded:   docker run -p 8000:8000 IMAGE sh -c "python manage.py migrate && python manage.py serve --host 0.0.0.0"
# --proxy-headers only behind a proxy that sets X-Forwarded-For (deploy/compose.yaml does).
# --websocket_connect_timeout 30: in a reconnect storm a handshake waits its turn instead of
# being dropped at 5 s and retried (docs/decisions/0026-handshakes-in-batches.md).
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "--websocket_connect_timeout", "30", "tyrum.asgi:application"]
