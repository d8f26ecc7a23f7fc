# Image of every `is` Python service (bridge, supervisor + workers, Flower); compose.yaml
# builds it once and picks the command per service. Same install as scripts/bootstrap.sh:
# the package with its dependencies, then Pillow-SIMD in place of Pillow.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Pillow-SIMD is published as source only: it needs a compiler and the libjpeg/zlib headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libjpeg-dev zlib1g-dev libfreetype-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY istasks ./istasks
COPY bridge ./bridge
COPY queues ./queues
COPY ops ./ops
RUN python -m venv /opt/is/.venv \
 && /opt/is/.venv/bin/pip install --upgrade pip setuptools wheel \
 && /opt/is/.venv/bin/pip install . \
 && /opt/is/.venv/bin/pip uninstall -y pillow \
 && /opt/is/.venv/bin/pip install --no-deps --force-reinstall 'pillow-simd>=10.4' \
 && /opt/is/.venv/bin/python -c 'from PIL import features; assert features.check("jpg"), "no JPEG"'

FROM python:3.11-slim-bookworm
# Runtime libraries of Pillow-SIMD only; no compiler in the final image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjpeg62-turbo zlib1g libfreetype6 \
 && rm -rf /var/lib/apt/lists/*
# Fixed ids so host files (secrets, the /run/is volume) can be given to them.
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
USER is
CMD ["is-bridge"]
