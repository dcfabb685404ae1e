# Sourced by scripts/serve and scripts/test: make .venv and install the project into it.
# Re-installs only when pyproject.toml changed since the last install of that kind.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

pip_quiet() {  # pip, minus the warnings about unused local index folders
    .venv/bin/python -m pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
    return "${PIPESTATUS[0]}"
}

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=".venv/.broadprop-installed-$1"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    pip_quiet --upgrade pip
    if [ "$1" = dev ]; then pip_quiet -e ".[dev]"; else pip_quiet -e .; fi
    touch "$STAMP"
fi
