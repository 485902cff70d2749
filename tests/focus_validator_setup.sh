#!/usr/bin/env bash
# Install the FinOps Foundation's focus-validator 2.2.1 into .venv-focus/ for
# tests/integration/test_focus_validator.py.
#
# focus-validator 2.2.1 needs Python >= 3.12 (pip on 3.11 only finds 1.0.0), and the
# project's venv is 3.11, so the validator gets a venv of its own. Idempotent: a second
# run with the validator already in place does nothing. Never fails the build: when no
# Python >= 3.12 or no package can be had it prints one line saying so and exits 0, and
# the integration test skips with the same advice.
#
# Where Python >= 3.12 comes from, first found wins:
#   $GPULEDGER_FOCUS_PYTHON, python3.13 / python3.12 on PATH, pyenv's versions
#   (this project's machine image ships 3.12 and 3.13 under ~/.pyenv/versions), and
#   Debian's python3.12 / python3.13 packages when apt has them (Debian 12 does not).
#
# Pins: pyarrow==21.0.0 because focus-validator 2.2.1 requires numpy<2 but leaves pyarrow
# open, and pyarrow >= 22 refuses to import beside numpy 1.x.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GPULEDGER_FOCUS_VENV:-$ROOT/.venv-focus}"
VERSION="2.2.1"
PINS=("focus-validator==$VERSION" "pyarrow==21.0.0")

say() { echo "focus-validator setup: $*"; }

installed_ok() {
    [ -x "$VENV/bin/focus-validator" ] &&
        "$VENV/bin/python" - "$VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import focus_validator.main  # noqa: F401  (imports pyarrow/numpy: proves they fit)
import pyarrow  # noqa: F401
sys.exit(version("focus_validator") != sys.argv[1])
EOF
}

is_py312() {  # $1: a candidate interpreter; true when it runs and is >= 3.12 with venv
    [ -n "$1" ] && "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 12))' \
        >/dev/null 2>&1
}

find_python() {
    local candidate
    for candidate in "${GPULEDGER_FOCUS_PYTHON:-}" \
        "$(command -v python3.13 2>/dev/null)" "$(command -v python3.12 2>/dev/null)" \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 \
        /usr/bin/python3.1[2-9] /usr/local/bin/python3.1[2-9]; do
        if is_py312 "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if installed_ok; then
    say "focus-validator $VERSION already in $VENV"
    exit 0
fi

start=$(date +%s)
PY="$(find_python)"
if [ -z "$PY" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    for pkg in python3.13 python3.12; do
        if apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            apt-get install -y -qq "$pkg" "$pkg-venv" >/dev/null 2>&1 || true
        fi
    done
    PY="$(find_python)"
fi
if [ -z "$PY" ]; then
    say "no Python >= 3.12 found (set GPULEDGER_FOCUS_PYTHON to one); FOCUS validator tests will skip"
    exit 0
fi

rm -rf "$VENV"
if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    say "could not create a venv with $PY; FOCUS validator tests will skip"
    rm -rf "$VENV"
    exit 0
fi
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}" \
    >"$VENV/install.log" 2>&1; then
    say "pip install ${PINS[*]} failed (see $VENV/install.log); FOCUS validator tests will skip"
    exit 0
fi
if ! installed_ok; then
    say "focus-validator $VERSION installed but does not import (see $VENV/install.log); tests will skip"
    exit 0
fi
say "focus-validator $VERSION installed in $VENV with $("$PY" -V 2>&1) in $(($(date +%s) - start)) s"
