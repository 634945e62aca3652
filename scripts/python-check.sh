#!/usr/bin/env bash
# The Python package's test suite (called by .ci/run): builds `memsteer` in debug mode into a venv
# with pinned numpy, pandas, polars, pyarrow and pytest, then runs crates/memsteer-py/tests against the
# debug `memsteer` binary (the parity tests compare with the command line's files).
# Usage: scripts/python-check.sh [VENV_DIR]   (default: target/python-venv)
set -euo pipefail
cd "$(dirname "$0")/.."

target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
venv="${1:-$target/python-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pytest, maturin, pandas, polars, pyarrow' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    maturin==1.16.0 numpy==2.4.6 pandas==3.1.1 polars==2.1.0 pyarrow==26.0.1 pytest==9.2.0
fi
cargo build -q -p memsteer-cli
VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --quiet -m crates/memsteer-py/Cargo.toml
MEMSTEER_BIN="$target/debug/memsteer" "$venv/bin/python" -m pytest crates/memsteer-py/tests -q
