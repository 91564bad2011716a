# Two images from one file. No `# syntax=` line: BuildKit uses its built-in frontend and pulls no
# image of its own, so a build needs only its base image and PyPI (or a mirror) for the packages.
#   docker build --target api    -t star-api .      # python:3.11-slim, no torch (~200 MB)
#   docker build --target worker -t star-worker .   # CUDA PyTorch base + the worker extra
#
# CPU worker for laptops (deploy/compose.cpu.yml passes these):
#   docker build --target worker \
#     --build-arg WORKER_BASE=python:3.11-slim \
#     --build-arg TORCH_SPEC=torch==2.13.0 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t star-worker:cpu .
# Torch from a local wheel or a mirror instead (docs/deploy.md, "Torch from a local wheel"):
#   python3 -m http.server 8765 --bind 127.0.0.1 --directory /path/to/wheels &
#   docker build --network host --target worker --build-arg WORKER_BASE=python:3.11-slim \
#     --build-arg TORCH_SPEC=torch==2.13.0 --build-arg TORCH_FIND_LINKS=http://127.0.0.1:8765/ ...
#
# Layers, most stable first: base image, torch (worker), the pinned dependencies (rebuilt only when
# the list of requirements changes, not when pyproject.toml's other fields or README.md do), then
# the source. Both images run as the unprivileged user `star` (uid 10001) and carry a HEALTHCHECK
# that asks the process itself (`star healthcheck api|worker`).

ARG PYTHON_IMAGE=python:3.11-slim
# Its torch must satisfy the worker extra's range (torch>=2.5,<2.15); pip keeps the base's build.
ARG WORKER_BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------------------------
# The requirement lists, read from pyproject.toml: a later stage copies only these small files, so
# its dependency layer stays cached while pyproject.toml changes elsewhere. The API image gets the
# api, client and s3 extras (`star generate` works there too); the worker image the api, worker and s3
# extras (the worker extra's own `star-service[api]` line is spelled out, as pip cannot resolve it here).
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb')); \
build = p['build-system']['requires']; deps = p['project']['dependencies']; \
e = p['project']['optional-dependencies']; own = lambda reqs: [r for r in reqs if not r.startswith('star-service')]; \
open('/tmp/api.txt', 'w').write('\n'.join(build + deps + e['api'] + e['client'] + e['s3']) + '\n'); \
open('/tmp/worker.txt', 'w').write('\n'.join(build + deps + e['api'] + own(e['worker']) + e['s3']) + '\n')"

# The project's source: pyproject.toml's packages, one line each (a new package: add its line).
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY client /src/client
COPY model /src/model
COPY training /src/training
COPY worker /src/worker

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/star

# Dependencies first (cached while only the source changes); setuptools too, so installing the
# source needs no download.
COPY --from=requirements /tmp/api.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

COPY --from=source /src/ ./
RUN pip install --no-deps --no-build-isolation . \
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

# Set TORCH_SPEC to install a specific torch build on a base image without one (the CPU image),
# from TORCH_INDEX_URL (an index replacing PyPI) and/or TORCH_FIND_LINKS (a directory of wheels,
# e.g. a local wheel served over loopback to a build on the host network; the highest version
# matching TORCH_SPEC wins, so a local 2.13.0+cpu is preferred to PyPI's 2.13.0).
ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=""
ARG TORCH_FIND_LINKS=""
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
        pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
                    ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} "$TORCH_SPEC"; \
    fi \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt

COPY --from=requirements /tmp/worker.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt --constraint /tmp/keep-torch.txt

COPY --from=source /src/ ./
RUN pip install --no-deps --no-build-isolation . \
 && (getent group star || groupadd --system --gid 10001 star) \
 && useradd --system --uid 10001 --gid star --create-home --home-dir /home/star star \
 && mkdir -p /data/images /weights \
 && chown star:star /data/images /weights

USER 10001:10001
# Weights are mounted read-only at /weights (a directory written by `star convert`). Prometheus
# scrapes workers over the network: /metrics listens on all interfaces here (loopback by default).
ENV STAR_STORAGE_DIR=/data/images \
    STAR_METRICS_HOST=0.0.0.0 \
    STAR_METRICS_PORT=9100 \
    STAR_DEVICE=auto
EXPOSE 9100
# Loading a large model takes minutes: failures during start-period do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["star", "healthcheck", "worker"]
CMD ["star", "worker"]
