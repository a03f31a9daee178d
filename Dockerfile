# tensafe serve with the torch backend, privacy accountants and TGSP packages (CPU build of torch).
# Build:  docker build -t tensafe .        Run with PostgreSQL: docker compose up (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/tensafe
COPY tensafe-core ./tensafe-core
COPY tensafe-torch ./tensafe-torch
COPY tensafe-privacy ./tensafe-privacy
COPY tensafe-tgsp ./tensafe-tgsp
# The server extra brings FastAPI, SQLAlchemy, Alembic, Prometheus metrics and Swagger UI's assets; postgres adds psycopg.
RUN python -m pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        "./tensafe-core[server,postgres]" ./tensafe-torch ./tensafe-privacy ./tensafe-tgsp

# An unprivileged user owns the data directory (the server makes it 0700 and its files 0600).
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin tensafe \
    && mkdir -p /data && chown tensafe /data && chmod 0700 /data
USER tensafe
ENV TENSAFE_DATA_DIR=/data
VOLUME /data
EXPOSE 8700

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8700/readyz', timeout=4).status != 200)"]

# Models: mount them read-only and add --model NAME=/models/DIR (without one, the backend's embedded model).
CMD ["tensafe", "serve", "--host", "0.0.0.0", "--port", "8700", "--log-format", "json"]
