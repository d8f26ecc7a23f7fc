#!/usr/bin/env bash
# A container engine and a Compose tool for `make compose-check` (root, Debian/Ubuntu;
# safe to run again). Installs what is missing from the Debian mirror: docker.io (dockerd
# and its client), docker-compose (Compose 1.29, Python) and debootstrap (for
# scripts/compose-base.sh). Starts the engine when it is not running: through systemd
# where systemd runs, else dockerd in the background (log: /var/log/is-dockerd.log),
# with the storage driver it picks itself (overlay2 where the kernel allows it).
set -euo pipefail

need=""
command -v dockerd >/dev/null || need="$need docker.io"
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need="$need docker-compose"
command -v debootstrap >/dev/null || need="$need debootstrap"
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "compose-engine: missing:$need (install them as root)" >&2
        exit 1
    fi
    echo "compose-engine: installing$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq $need >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    if [ -d /run/systemd/system ]; then
        systemctl start docker
    else
        echo "compose-engine: starting dockerd (log /var/log/is-dockerd.log)"
        nohup dockerd >>/var/log/is-dockerd.log 2>&1 &
    fi
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
fi
docker info --format 'compose-engine: dockerd {{.ServerVersion}}, storage {{.Driver}}, cgroup {{.CgroupDriver}} v{{.CgroupVersion}}'
