# loom-ha with every backend (Redis, NATS, Consul, Loom). Entrypoint: the `loom-ha` CLI.
#   docker build -t loom-ha:local .
#   docker run --rm loom-ha:local demo
# Build wheels in one stage, install them in a clean one: no compilers or caches shipped.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY loom_ha ./loom_ha
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[redis,nats,consul,loom,hiredis]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOOM_TRANSPORT=memory
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels \
        "loom-ha[redis,nats,consul,loom,hiredis]" \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 loom
USER loom
WORKDIR /home/loom
ENTRYPOINT ["loom-ha"]
CMD ["demo"]
