# Sourced by scripts/demo and scripts/test: make ./.venv (Python >= 3.11) from the committed uv.lock.
#   ensure_venv EXTRA [--exact]   install the project with EXTRA exactly as uv.lock pins it
#   ensure_latest_venv EXTRA      ./.venv-latest with the newest versions pyproject's ranges allow
# uv itself comes from PyPI (pinned below) into .cache/uv; it never downloads a Python: the
# machine's python3 (or $PYTHON) is used.
set -euo pipefail

LOOM_HA_UV_VERSION="0.13.9"

_repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

ensure_uv() {
    local root python
    root="$(_repo_root)"
    python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "loom-ha needs Python >= 3.11 (found: $("$python" --version 2>&1 || echo none))" >&2
        exit 1
    fi
    UV="$root/.cache/uv/bin/uv"
    mkdir -p "$root/.cache"
    if ! [ -x "$UV" ] || [ "$("$UV" --version 2>/dev/null)" != "uv $LOOM_HA_UV_VERSION"* ]; then
        rm -rf "$root/.cache/uv"
        "$python" -m pip install -q --disable-pip-version-check --no-warn-script-location \
            --target "$root/.cache/uv" "uv==$LOOM_HA_UV_VERSION" 2>"$root/.cache/uv-install.log" \
            || { cat "$root/.cache/uv-install.log" >&2; exit 1; }
    fi
    export UV_PYTHON="$python" UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1
    export UV_PROJECT_ENVIRONMENT="$root/.venv"
}

# The demo installs what it needs without removing anything (--inexact); the tests get the
# environment exactly as locked (extra packages removed), so what passed here passes on a fresh clone.
ensure_venv() {
    local root extra mode
    root="$(_repo_root)"
    extra="$1"
    mode="${2:---inexact}"
    ensure_uv
    if ! (cd "$root" && "$UV" sync --locked --extra "$extra" "$mode") \
        >"$root/.cache/uv-sync.log" 2>&1; then
        cat "$root/.cache/uv-sync.log" >&2
        echo "uv.lock does not match pyproject.toml? Refresh it: .cache/uv/bin/uv lock" >&2
        exit 1
    fi
}

ensure_latest_venv() {
    local root extra
    root="$(_repo_root)"
    extra="$1"
    ensure_uv
    export UV_PROJECT_ENVIRONMENT="$root/.venv-latest"
    [ -x "$root/.venv-latest/bin/python" ] || "$UV" venv -q "$root/.venv-latest"
    (cd "$root" && VIRTUAL_ENV="$root/.venv-latest" "$UV" pip install -q --upgrade \
        --python "$root/.venv-latest/bin/python" -e ".[$extra]")
}
