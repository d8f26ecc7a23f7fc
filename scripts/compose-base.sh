#!/usr/bin/env bash
# Local base images for compose.yaml on a host that reaches no container registry, only
# the Debian mirror (root; called by `make compose-check`, safe to run again):
#   is-base:bookworm   Debian 12 minbase + python3.11 + venv, made with debootstrap
#   is-redis:bookworm  Debian's redis-server on that base (docker/redis.Dockerfile)
# and copies the host's extra CA certificates for the `is` image's build stage.
# An image that already exists is kept; IS_BASE_REBUILD=1 makes both again.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${IS_BASE_IMAGE:-is-base:bookworm}
REDIS_IMAGE=${IS_REDIS_IMAGE:-is-redis:bookworm}
MIRROR=${IS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${IS_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
SUITE=bookworm
DOCKER=${DOCKER:-docker}

# The host's extra CAs (a TLS-inspecting proxy between it and PyPI) for the build stage
# of the `is` image: docker/ca-certificates/README.md.
CA_DIR=${IS_BUILD_CA_DIR:-/usr/local/share/ca-certificates}
rm -f docker/ca-certificates/*.crt
for ca in "$CA_DIR"/*.crt; do
    [ -f "$ca" ] && install -m 0644 "$ca" docker/ca-certificates/
done

have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

if [ "${IS_BASE_REBUILD:-0}" = 1 ]; then
    "$DOCKER" image rm -f "$REDIS_IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
fi

if ! have_image "$BASE_IMAGE"; then
    command -v debootstrap >/dev/null || {
        echo "compose-base: debootstrap missing (apt-get install debootstrap)" >&2
        exit 1
    }
    work=$(mktemp -d /var/tmp/is-base.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    echo "compose-base: debootstrap $SUITE (minbase + python3.11 + venv) from $MIRROR"
    # python3-venv brings ensurepip's wheels: `python3 -m venv` works as in the public image.
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
        tail -30 "$work/debootstrap.log" >&2
        exit 1
    }
    root=$work/rootfs
    # Security and point-release updates for every apt-get run in the images' builds.
    cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
    # What an image does not need: package caches, docs, man pages, locales.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/var/log/*.log "$root"/var/cache/debconf/*-old "$root"/dev/*
    # As the official Debian images do: no docs or caches from later apt-get installs.
    cat >"$root/etc/dpkg/dpkg.cfg.d/is-docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/90is-no-recommends"
    # No package caches of apt-get update in any layer (as the official Debian images).
    printf 'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n' \
        >"$root/etc/apt/apt.conf.d/90is-no-pkgcache"
    rm -f "$root"/var/cache/apt/*.bin
    echo "compose-base: importing $BASE_IMAGE"
    tar --numeric-owner -C "$root" -c . | "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null
fi

if ! have_image "$REDIS_IMAGE"; then
    echo "compose-base: building $REDIS_IMAGE (Debian's redis-server on $BASE_IMAGE)"
    "$DOCKER" build -q -t "$REDIS_IMAGE" --build-arg "BASE=$BASE_IMAGE" \
        -f docker/redis.Dockerfile docker >/dev/null
fi
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$BASE_IMAGE"
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$REDIS_IMAGE"
