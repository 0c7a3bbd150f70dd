# syntax=docker/dockerfile:1.7
# CUDA training image: `recsys train --device cuda`, single GPU or `torchrun --nproc_per_node N -m recsys train`.
#
#   docker build -f deploy/docker/cuda.Dockerfile -t recsys:cuda .       # from the repository root
#
# The official PyTorch runtime image already holds torch + CUDA + cuDNN in /opt/conda. The build stage (the
# matching -devel image, which has a compiler for hnswlib's sdist) makes a virtualenv that sees that torch
# through --system-site-packages and adds only the project and its other dependencies; the final stage copies
# that virtualenv onto the runtime image. Bump both tags together (same torch, CUDA and Python).

ARG BUILD_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-devel
ARG RUNTIME_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

FROM ${BUILD_IMAGE} AS build
# Portable compiled code: hnswlib and recsys._hnsw build with -march=native by default, which would tie the image to
# the build machine's CPU (SIGILL elsewhere); these keep -O3 without it.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HNSWLIB_NO_NATIVE=1 \
    RECSYS_PORTABLE_BUILD=1
RUN python -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
# torch>=2.4 is met by the base image's torch, so pip installs no second (CPU or CUDA) torch.
RUN pip install --no-cache-dir . \
    && python -c "import recsys, torch; assert torch.version.cuda, 'expected a CUDA build of torch'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

FROM ${RUNTIME_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --system --gid 10001 recsys \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin recsys \
    && mkdir -p /data /runs /models \
    && chown 10001:10001 /data /runs /models
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["recsys"]
CMD ["train", "--data", "/data", "--out", "/runs/train", "--device", "cuda"]
