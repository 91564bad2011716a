# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target api    -t star-api .      # python:3.11-slim, no torch (~200 MB)
#   docker build --target worker -t star-worker .   # CUDA PyTorch base + the worker extra
#
# CPU worker for laptops (deploy/compose.cpu.yml passes these):
#   docker build --target worker \
#     --build-arg WORKER_BASE=python:3.11-slim \
#     --build-arg TORCH_SPEC=torch==2.13.0 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t star-worker:cpu .
#
# Both images run as the unprivileged user `star` (uid 10001) and carry a HEALTHCHECK that asks
# the process itself (`star healthcheck api|worker`).

ARG PYTHON_IMAGE=python:3.11-slim
# Its torch must satisfy the worker extra's range (torch>=2.5,<2.15); pip keeps the base's build.
ARG WORKER_BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/star

# Dependencies first (cached while only the source changes), read from pyproject.toml: the api
# and client extras (`star generate` works in the API image too).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
e = p['optional-dependencies']; print('\n'.join(p['dependencies'] + e['api'] + e['client']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY app ./app
COPY client ./client
COPY model ./model
COPY worker ./worker
RUN pip install --no-deps . \
 && python -c "import sys, app.cli, app.settings; assert 'torch' not in sys.modules" \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/star star \
 && mkdir -p /data/images \
 && chown star:star /data/images

USER 10001:10001
ENV STAR_HOST=0.0.0.0 \
    STAR_PORT=8000 \
    STAR_STORAGE_DIR=/data/images
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["star", "healthcheck", "api"]
CMD ["star", "api"]

# ---------------------------------------------------------------------------------------------
FROM ${WORKER_BASE} AS worker

# Set both to install a specific torch build on a base image without one (the CPU image).
ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
WORKDIR /opt/star

# TORCH_SPEC carries its own pin (e.g. torch==2.13.0).
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_SPEC" ]; then \
        pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"; \
    fi \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt

COPY pyproject.toml README.md ./
# The worker extra names the api extra as `star-service[api]`: its requirements are listed instead.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
e = p['optional-dependencies']; print('\n'.join(r for r in p['dependencies'] + e['api'] + e['worker'] \
if not r.startswith('star-service')))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt --constraint /tmp/keep-torch.txt

COPY app ./app
COPY client ./client
COPY model ./model
COPY worker ./worker
RUN pip install --no-deps . \
 && (getent group star || groupadd --system --gid 10001 star) \
 && useradd --system --uid 10001 --gid star --create-home --home-dir /home/star star \
 && mkdir -p /data/images /weights \
 && chown star:star /data/images /weights

USER 10001:10001
# Weights are mounted read-only at /weights (a directory written by `star convert`).
ENV STAR_STORAGE_DIR=/data/images \
    STAR_METRICS_PORT=9100 \
    STAR_DEVICE=auto
EXPOSE 9100
# Loading a large model takes minutes: failures during start-period do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["star", "healthcheck", "worker"]
CMD ["star", "worker"]
