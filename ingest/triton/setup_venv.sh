#!/usr/bin/env bash
# Install the Triton Inference Server (the `tritonserver` 2.51 binary shipped in PyPI's
# nvidia-pytriton 0.7.0) into .venv-triton/, for ingest/triton/server.py.
#
# Why a venv of its own: nvidia-pytriton pins numpy < 2 and the project's venv pins
# numpy 2.x. The server's Python-backend stub runs the demo model with this venv's
# python, so the venv must be made by the same Python 3.11 that made .venv (the stub
# links libpython3.11.so.1.0 from that Python's LIBDIR; see DESIGN.md, "Triton").
#
# Idempotent and fast when done: a stamp file records the pins and the interpreter, and
# a second run with the same stamp only re-checks that libpython3.11 is present.
# Exits non-zero, with one line saying why, when the server cannot be installed.
#
# Environment: GPULEDGER_TRITON_VENV (where the venv goes, default <repo>/.venv-triton),
# GPULEDGER_TRITON_PYTHON (the Python 3.11 to use, default the base of <repo>/.venv,
# else python3.11 on PATH).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${GPULEDGER_TRITON_VENV:-$ROOT/.venv-triton}"
PINS=("nvidia-pytriton==0.7.0")
STAMP="$VENV/.installed"
SUDO=""
[ "$(id -u)" = "0" ] || SUDO="sudo"

say() { echo "triton setup: $*"; }
fail() {
    say "$*" >&2
    exit 1
}

find_python() {
    local base candidate
    if [ -n "${GPULEDGER_TRITON_PYTHON:-}" ]; then
        echo "$GPULEDGER_TRITON_PYTHON"
        return 0
    fi
    if [ -x "$ROOT/.venv/bin/python" ]; then
        base="$("$ROOT/.venv/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null)"
        for candidate in "$base/bin/python3.11" "$base/bin/python3"; do
            if [ -x "$candidate" ]; then
                echo "$candidate"
                return 0
            fi
        done
    fi
    command -v python3.11
}

# The stub needs libpython3.11.so.1.0: in the interpreter's LIBDIR (pyenv, built with
# --enable-shared) or on the system path (Debian: package libpython3.11).
ensure_libpython() {
    local py="$1" libdir soname
    libdir="$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
    soname="libpython3.11.so.1.0"
    if [ -e "$libdir/$soname" ] || ldconfig -p 2>/dev/null | grep -q "$soname"; then
        return 0
    fi
    say "$soname not in $libdir nor the system path: installing Debian package libpython3.11"
    $SUDO apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            libpython3.11 >/dev/null ||
        fail "apt-get install libpython3.11 failed; Triton's Python backend needs $soname"
}

PY="$(find_python)" || fail "no python3.11 found (set GPULEDGER_TRITON_PYTHON to one)"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null ||
    fail "$PY is not Python 3.11 (the pytriton backend stub is built for 3.11)"
PY_REAL="$("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
WANT="${PINS[*]} | $PY_REAL"

ensure_libpython "$PY"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
    say "${PINS[*]} already in $VENV"
    exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV" || fail "could not create a venv in $VENV with $PY"
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}" \
    >"$VENV/install.log" 2>&1; then
    fail "pip install ${PINS[*]} failed (see $VENV/install.log)"
fi
# Prove the install is usable: the binary, the 3.11 backend stub, numpy for the model.
"$VENV/bin/python" - <<'PYEOF' >>"$VENV/install.log" 2>&1 ||
import sys
from pathlib import Path

import numpy  # noqa: F401  (the demo model's only dependency)
import pytriton

root = Path(pytriton.__file__).parent / "tritonserver"
for path in (root / "bin/tritonserver", root / "python_backend_stubs/3.11/triton_python_backend_stub"):
    if not path.is_file():
        sys.exit(f"missing {path}")
PYEOF
    fail "nvidia-pytriton installed but incomplete (see $VENV/install.log)"
echo "$WANT" >"$STAMP"
say "${PINS[*]} installed in $VENV with $("$PY" -V 2>&1) in $(($(date +%s) - start)) s"
