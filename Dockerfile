# One image for every role: edge (daphne), relay (run_backplane), compaction job, or the
# single-node `serve`. Pick the role with the command.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DJANGO_SETTINGS_MODULE=tyrum.settings
WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY manage.py ./
COPY tyrum ./tyrum
COPY backplane ./backplane

RUN useradd --system --home /app tyrum && mkdir -p /app/var && chown tyrum /app/var
USER tyrum
EXPOSE 8000

# Edge:       docker run -e EDGE_ID=edge-a -e DATABASE_URL=… -e REDIS_URL=… IMAGE
# Relay:      docker run … IMAGE python manage.py run_backplane
# Compaction: docker run … IMAGE python manage.py compact_outbox --retention 24h
# Embedded:   docker run -p 8000:8000 IMAGE sh -c "python manage.py migrate && python manage.py serve --host 0.0.0.0"
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "tyrum.asgi:application"]
