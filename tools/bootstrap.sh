#!/usr/bin/env bash
# Create the project's virtual environment from nothing and install the pinned dependencies.
#
# FFCV builds from source against OpenCV and libjpeg-turbo: when those system libraries are missing and we
# are root, apt installs them; otherwise FFCV is skipped with a warning (its tests then skip, saying why).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# pip's global config on this machine points at local indexes that do not exist; hide that noise only.
quiet_pip() { "$VENV/bin/pip" install --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }

ffcv_libs_present() { command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg; }

if ! ffcv_libs_present; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing FFCV's system libraries with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      pkg-config libturbojpeg0-dev libopencv-dev >/dev/null
  else
    echo "bootstrap: warning: FFCV needs pkg-config libturbojpeg0-dev libopencv-dev (apt, as root); skipping FFCV" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
echo "bootstrap: installing requirements/pinned.txt (torch installs from local disk: about 1.5 min)"
DS_BUILD_OPS=0 quiet_pip -q -r requirements/pinned.txt
if ffcv_libs_present; then
  echo "bootstrap: installing FFCV (requirements/ffcv.txt)"
  quiet_pip -q -r requirements/ffcv.txt || echo "bootstrap: warning: FFCV failed to install; its tests will skip" >&2
fi
quiet_pip -q --no-deps -r requirements/test-nodeps.txt
quiet_pip -q --no-deps --no-build-isolation -e .
echo "bootstrap: done ($VENV)"
