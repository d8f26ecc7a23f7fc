# Image of every `is` Python service (bridge, supervisor + workers, Flower); compose.yaml
# builds it once and picks the command per service. Same install as scripts/bootstrap.sh:
# the package with its dependencies, then Pillow-SIMD in place of Pillow.
#
# BASE: any Debian 12 image with Python 3.11 and venv: the public python image where a
# registry is reachable (default), or the debootstrap-made is-base:bookworm
# (scripts/compose-base.sh, `make compose-check`) where only the Debian mirror is.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# Pillow-SIMD is published as source only: it needs a compiler, the libjpeg/zlib headers
# and Python's own headers (in the public image already; python3-dev on Debian's Python).
RUN pkgs="build-essential libjpeg-dev zlib1g-dev libfreetype-dev" \
 && inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])') \
 && { [ -f "$inc/Python.h" ] || pkgs="$pkgs python3-dev"; } \
 && apt-get update \
 && apt-get install -y --no-install-recommends $pkgs \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# The site's extra CAs, if its HTTPS goes through an inspecting proxy (build stage only).
COPY docker/ca-certificates/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
# Dependencies first, from pyproject.toml alone: this layer (the slow one) stays cached
# while only the code changes.
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
RUN python3 -m venv /opt/is/.venv \
 && /opt/is/.venv/bin/pip install --upgrade pip setuptools wheel \
 && /opt/is/.venv/bin/python -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(d["project"]["dependencies"]))' > /tmp/requirements.txt \
 && /opt/is/.venv/bin/pip install -r /tmp/requirements.txt \
 && /opt/is/.venv/bin/pip uninstall -y pillow \
 && /opt/is/.venv/bin/pip install --no-deps --force-reinstall 'pillow-simd>=10.4' \
 && /opt/is/.venv/bin/python -c 'from PIL import features; assert features.check("jpg"), "no JPEG"'
COPY istasks ./istasks
COPY bridge ./bridge
COPY queues ./queues
COPY ops ./ops
# The package itself (its dependencies are in already), compiled once here: the
# containers run read-only and could not write __pycache__. hdf5plugin's filters come
# with their debugging symbols (185 MB; 20 MB stripped, the exported symbols stay).
RUN /opt/is/.venv/bin/pip install --no-deps . \
 && strip --strip-unneeded /opt/is/.venv/lib/python3*/site-packages/hdf5plugin/plugins/*.so \
 && /opt/is/.venv/bin/pip uninstall -y pip setuptools wheel \
 && find /opt/is/.venv -name 'tests' -type d -path '*/site-packages/*/tests' -prune -exec rm -rf {} + \
 && /opt/is/.venv/bin/python -m compileall -q /opt/is/.venv

FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
# Runtime libraries of Pillow-SIMD only; no compiler in the final image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjpeg62-turbo zlib1g libfreetype6 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# Fixed ids: compose.yaml runs the services by number (the hosts' passwd and group files
# may be bind-mounted over the image's), and host files (secrets) are given to gid 999.
RUN groupadd --system --gid 999 is \
 && useradd --system --uid 999 --gid is --no-create-home --home-dir / --shell /usr/sbin/nologin is \
 && install -d -m 0750 -o root -g is /run/is
COPY --from=build /opt/is/.venv /opt/is/.venv
ENV PATH=/opt/is/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IS_SUPERVISOR_SOCKET=/run/is/supervisor.sock
# The bridge and Flower run as this unprivileged user; compose runs only the supervisor
# as root (group is) with CAP_SETUID, CAP_SETGID and CAP_KILL.
USER 999:999
CMD ["is-bridge"]
