# syntax=docker/dockerfile:1.7
# CPU serving image: `recsys serve` (also runs `recsys retrain` / `prepare` / `evaluate` on CPU).
#
#   docker build -f deploy/docker/cpu.Dockerfile -t recsys:cpu .        # from the repository root
#
# Two stages: the build stage has a compiler (hnswlib ships as an sdist and is compiled on install) and fills a
# virtualenv; the final stage copies only that virtualenv onto a clean slim base and runs as a non-root uid.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Portable compiled code: hnswlib and recsys._hnsw build with -march=native by default, which would tie the image to
# the build machine's CPU (SIGILL elsewhere); these keep -O3 without it.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HNSWLIB_NO_NATIVE=1 \
    RECSYS_PORTABLE_BUILD=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU wheel first, from the PyTorch CPU index, so `torch>=2.4` in pyproject is already met and pip never pulls
# the multi-GB CUDA build from PyPI. Same pin as the Makefile's TORCH_SPEC.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "${TORCH_SPEC}"
WORKDIR /src
# Dependency layer: .dockerignore keeps tests, data, runs and the local .venv out of the context.
COPY . .
RUN pip install --no-cache-dir . \
    && python -c "import recsys, recsys._hnsw, grpc, hnswlib, polars, torch; print('torch', torch.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# libgomp is torch's OpenMP runtime; everything else comes in the virtualenv.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 recsys \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin recsys \
    && mkdir -p /models /logs \
    && chown 10001:10001 /models /logs
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
# Numeric uid:gid so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 50051 9090
# Standard grpc.health.v1 check (no grpc_health_probe binary): exit 0 only when the server reports SERVING,
# which it does once a model bundle is loaded. Connection errors raise, which also exits non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; r = hg.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(service=''), timeout=4); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["recsys"]
CMD ["serve", "--models", "/models", "--port", "50051", "--metrics-port", "9090"]
