#!/usr/bin/env bash
# `make test-deploy`: the deployment as a user runs it. Builds both images of the Dockerfile, brings
# the Compose stack up with the CPU override (Redis, two API replicas behind nginx, a CPU worker on
# the shipped `shapes` model, Prometheus) under the project name star-deploytest, with its ports on
# 127.0.0.1 only, and checks it through the public port (tests/deploy/stack/checks.py).
#
# On a machine without Docker it installs Debian's docker.io (root), starts dockerd when none
# answers, and builds test-only stand-ins for base images it cannot pull (standins.sh). Everything
# it started (the stack, dockerd, the loopback wheel server) is stopped on exit, failure included.
# Without Docker it skips, except with CI=true, where it fails.
#
# Environment: PYTHON (a Python with pip; default python3), STAR_DEPLOY_CACHE (default
# /var/cache/star-deploy-test for root, else ~/.cache/star-deploy-test: debootstrap's root file
# system, Compose, the torch wheel),
# DEBIAN_MIRROR, TORCH_SPEC (default torch==2.13.0), TORCH_INDEX_URL (where torch is installed from
# when no local wheel is found; default PyTorch's CPU index).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
HERE="$ROOT/tests/deploy/stack"
cd "$ROOT"
PYTHON=${PYTHON:-python3}
if [ "$(id -u)" -eq 0 ]; then CACHE=${STAR_DEPLOY_CACHE:-/var/cache/star-deploy-test}
else CACHE=${STAR_DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/star-deploy-test}; fi
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PROJECT=star-deploytest
WORK=$(mktemp -d /tmp/star-deploytest.XXXXXX)
STARTED_PIDS=()
COMPOSE=()
CANNOT=""
STACK_UP=""
T0=$SECONDS

# shellcheck source=tests/deploy/stack/docker-setup.sh
source "$HERE/docker-setup.sh"
# shellcheck source=tests/deploy/stack/standins.sh
source "$HERE/standins.sh"

phase() { echo "== [$((SECONDS - T0))s] $*"; }

stack() {
    "${COMPOSE[@]}" --project-name "$PROJECT" --project-directory "$ROOT" --env-file "$WORK/env" \
        -f docker-compose.yml -f deploy/compose.cpu.yml -f tests/deploy/stack/compose.test.yml "$@"
}

cleanup() {
    local rc=$? pid i
    set +e
    if [ -n "$STACK_UP" ]; then
        if [ "$rc" -ne 0 ]; then stack logs --no-color --tail 40 >&2; fi
        stack down -v --remove-orphans --timeout 30 >/dev/null 2>&1
    fi
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${STARTED_PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -rf "$WORK"
    echo "== test-deploy took $((SECONDS - T0)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

no_docker() {
    if [ "${CI:-}" = true ]; then
        echo "test-deploy: FAILED: $CANNOT (CI=true: the deployment test needs Docker)" >&2
        exit 1
    fi
    echo "test-deploy: SKIPPED: $CANNOT"
    exit 0
}

free_port() { "$PYTHON" -c 'from socket import socket; s = socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_free() { "$PYTHON" -c "from socket import socket; socket().bind(('127.0.0.1', $1))" 2>/dev/null; }

# Torch for the CPU worker image: the wheel pip would install here (pip's find-links, e.g. a local
# CPU build), served on loopback to the build (host network). A fixed port keeps the build arg, and
# so the torch layer, cached from run to run. No local wheel: TORCH_INDEX_URL as the user would.
serve_torch_wheel() {
    local dir="$CACHE/wheels" port=18765
    mkdir -p "$dir"
    if ! "$PYTHON" -m pip download --quiet --no-index --no-deps --dest "$dir" "$TORCH_SPEC" 2>/dev/null; then
        echo "== no local wheel for $TORCH_SPEC: the worker image installs it from the index"
        return 0
    fi
    port_free "$port" || port=$(free_port)
    "$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$dir" >"$WORK/wheels.log" 2>&1 &
    STARTED_PIDS+=("$!")
    TORCH_FIND_LINKS="http://127.0.0.1:$port/"
    TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}   # torch's own dependencies
    echo "== torch from $(ls "$dir") served at $TORCH_FIND_LINKS"
}

write_env() {
    PUBLIC_PORT=$(free_port)
    PROMETHEUS_PORT=$(free_port)
    { cat deploy/env.example
      echo "# test-deploy"
      echo "DEPLOY_ENV_FILE=$WORK/env"
      echo "PUBLIC_PORT=$PUBLIC_PORT"
      echo "PROMETHEUS_PORT=$PROMETHEUS_PORT"
      echo "IMAGE_TAG=deploytest"
      echo "STAR_PUBLIC_BASE_URL=http://127.0.0.1:$PUBLIC_PORT"
      echo "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
      echo "TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-}"
    } >"$WORK/env"
}

phase "Docker"
ensure_docker || no_docker
ensure_compose || no_docker
ensure_dockerd || no_docker
mkdir -p "$CACHE"
docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'
"${COMPOSE[@]}" version

phase "base images"
serve_torch_wheel
write_env
stack down -v --remove-orphans >/dev/null 2>&1 || true   # leftovers of an interrupted run
STACK_UP=1
base_images=$(sed -n 's/^ARG \(PYTHON_IMAGE\|WORKER_BASE\)=//p' Dockerfile | grep -v '^pytorch/' || true)
base_images+=" $(sed -n 's/^ *WORKER_BASE: *//p' deploy/compose.cpu.yml)"
base_images+=" $(stack config --images | grep -v '^star-')"
for image in $(echo "$base_images" | tr ' ' '\n' | sort -u); do
    ensure_image "$image"
done

phase "build (api, worker-0)"
stack build api worker-0

phase "up"
stack up -d --no-build
phase "checks"
STACK_URL="http://127.0.0.1:$PUBLIC_PORT" PROMETHEUS_URL="http://127.0.0.1:$PROMETHEUS_PORT" \
STACK_COMPOSE="$(printf '%q ' "${COMPOSE[@]}") --project-name $PROJECT --project-directory $ROOT \
--env-file $WORK/env -f docker-compose.yml -f deploy/compose.cpu.yml -f tests/deploy/stack/compose.test.yml" \
    "$PYTHON" "$HERE/checks.py"
STACK_UP=""
