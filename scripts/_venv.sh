# Sourced by scripts/demo and scripts/test: make ./.venv (Python >= 3.11) and install extras "$@".
set -euo pipefail

ensure_venv() {
    local root extras
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    extras="$1"
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "loom-ha needs Python >= 3.11 (found: $("$python" --version 2>&1 || echo none))" >&2
        exit 1
    fi
    if [ ! -x "$root/.venv/bin/python" ]; then
        if ! "$python" -m venv "$root/.venv" 2>/dev/null; then
            # Debian splits venv out of the interpreter package.
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            rm -rf "$root/.venv"
            "$python" -m venv "$root/.venv"
        fi
        "$root/.venv/bin/python" -m pip install -q --upgrade pip
    fi
    # Quiet unless it fails (setuptools' build warnings are noise for a demo).
    mkdir -p "$root/.cache"
    if ! "$root/.venv/bin/python" -m pip install -q --disable-pip-version-check \
        -e "$root[$extras]" >"$root/.cache/pip-install.log" 2>&1; then
        cat "$root/.cache/pip-install.log" >&2
        exit 1
    fi
}
