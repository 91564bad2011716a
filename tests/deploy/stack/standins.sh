# Sourced by tests/deploy/stack/run.sh. TEST-ONLY stand-ins for base images this machine cannot pull.
#
# Machines without Docker Hub (CI here, air-gapped clusters) cannot pull python:3.11-slim, redis,
# nginx or prom/prometheus. For the deployment test only, each missing image is replaced by an image
# of the same name built from Debian 12 packages: one root file system made by debootstrap (Python
# 3.11 with a virtual environment first on PATH, like the slim image's /usr/local; redis-server;
# nginx; prometheus; the host's CA bundle so pip trusts what the host trusts) is imported once as
# star-standin/debian:12, and each stand-in is that image with the entry point of the original.
# Stand-ins carry the label org.star.test-stand-in; `docker images -f label=org.star.test-stand-in`
# lists them and `docker rmi` removes them. They stay cached in the local image store (and the root
# file system in $CACHE) between runs. Never deploy them: they are not the upstream images.

STANDIN_BASE=star-standin/debian:12
STANDIN_LABEL=org.star.test-stand-in
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STANDIN_PACKAGES=python3,python3-venv,redis-server,nginx-light,prometheus

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The Debian 12 root file system as a tar file in the cache (debootstrap on the first run, ~3 min).
standin_rootfs() {
    local tarball="$CACHE/debian-12-standin-rootfs.tar" dir="$CACHE/rootfs.tmp"
    if [ -s "$tarball" ]; then echo "$tarball"; return 0; fi
    command -v debootstrap >/dev/null || {
        echo "== installing debootstrap" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    echo "== debootstrap Debian 12 with $STANDIN_PACKAGES (log: $WORK/debootstrap.log)" >&2
    rm -rf "$dir"
    if ! debootstrap --variant=minbase --include="$STANDIN_PACKAGES" bookworm "$dir" "$DEBIAN_MIRROR" \
            >"$WORK/debootstrap.log" 2>&1; then
        tail -n 20 "$WORK/debootstrap.log" >&2
        return 1
    fi
    chroot "$dir" python3 -m venv /opt/python
    mkdir -p "$dir/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
    cat >"$dir/usr/local/bin/standin-redis" <<'EOF'
#!/bin/sh
# Like the redis image's entry point: without a config file, accept clients from other containers.
if [ "$1" = redis-server ]; then shift; exec redis-server --protected-mode no "$@"; fi
exec "$@"
EOF
    chmod 0755 "$dir/usr/local/bin/standin-redis"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc "$dir"/usr/share/man
    tar -C "$dir" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$dir"
    echo "$tarball"
}

standin_base() {
    have_image "$STANDIN_BASE" && return 0
    local tarball
    tarball=$(standin_rootfs) || return 1
    echo "== importing $STANDIN_BASE"
    docker import \
        --change "LABEL $STANDIN_LABEL=\"test only: Debian 12 packages, see tests/deploy/stack/standins.sh\"" \
        --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        "$tarball" "$STANDIN_BASE" >/dev/null
}

# The Dockerfile changes that make the base image behave like IMAGE (by its repository name).
standin_changes() {
    case "$1" in
        python:*) STANDIN_CHANGES=(--change 'CMD ["python3"]') ;;
        redis:*) STANDIN_CHANGES=(--change 'WORKDIR /data' --change 'ENTRYPOINT ["standin-redis"]'
                                  --change 'CMD ["redis-server"]') ;;
        nginx:*) STANDIN_CHANGES=(--change 'ENTRYPOINT []'
                                  --change 'CMD ["nginx", "-g", "daemon off;"]') ;;
        prometheus:* | */prometheus:*)
            STANDIN_CHANGES=(--change 'WORKDIR /prometheus' --change 'ENTRYPOINT ["/usr/bin/prometheus"]'
                             --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml"]') ;;
        *) return 1 ;;
    esac
}

# Make IMAGE available: already here, pulled, or (test only) a stand-in of the same name.
ensure_image() {
    local image=$1 container
    have_image "$image" && return 0
    if timeout 120 docker pull -q "$image" >/dev/null 2>&1; then return 0; fi
    standin_changes "$image" || { echo "cannot pull $image and no stand-in recipe for it" >&2; return 1; }
    standin_base || return 1
    echo "== $image cannot be pulled: test-only stand-in from Debian packages"
    container=$(docker create "$STANDIN_BASE" true)
    docker commit "${STANDIN_CHANGES[@]}" "$container" "$image" >/dev/null
    docker rm "$container" >/dev/null
}
