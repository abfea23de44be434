# syntax=docker/dockerfile:1
# realtime-service container: a wheel built in one stage, installed into a slim, non-root runtime.
#
#   docker build -t realtime-service .
#   docker run -p 8080:8080 \
#     -e REALTIME_DATABASE_URL=postgresql://realtime_ro:...@replica:5432/app \
#     -e REALTIME_JWT_SECRET=... \
#     realtime-service                      # = realtime-service serve
#   # with a config file (keys: config/default.toml; environment variables still win):
#   docker run -v "$PWD/config/production.example.toml:/etc/realtime/config.toml:ro" ... \
#     realtime-service serve --config /etc/realtime/config.toml
#   # other commands: `... realtime-service migrate`, `... realtime-service token --sub 456`
#
# SIGTERM (docker stop, Kubernetes) drains: clients are closed service_restart over REALTIME_DRAIN_PERIOD and the
# process exits within REALTIME_SHUTDOWN_GRACE; give `docker stop -t` / terminationGracePeriodSeconds more.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the project and every dependency as wheels ------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY migrations ./migrations
COPY realtime_service ./realtime_service
RUN pip wheel --wheel-dir /wheels .

# --- runtime ----------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    REALTIME_PORT=8080
RUN groupadd --system --gid 10001 realtime \
 && useradd --system --uid 10001 --gid realtime --home-dir /var/lib/realtime --create-home \
            --shell /usr/sbin/nologin realtime \
 && mkdir -p /etc/realtime
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels realtime-service \
 && realtime-service --help >/dev/null
# `dev` keeps its embedded database under the working directory, which the service user owns.
WORKDIR /var/lib/realtime
USER 10001:10001
EXPOSE 8080
# No curl in slim images: Python's urllib asks /healthz on the configured port.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REALTIME_PORT', '8080'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["realtime-service"]
CMD ["serve"]
