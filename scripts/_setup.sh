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

# The page's Plotly: plotly.js's cartesian bundle (heatmap and scatter; a third of the full
# bundle's size, so the first load parses it ~3x faster), from the npm registry, the same
# plotly.js version as the bundle inside the Python package. Without npm or the network, the
# page serves the Python package's full bundle instead (app/server/assets.py), so nothing fails here.
PLOTLY_JS_VERSION="$(.venv/bin/python -c 'import app.server.assets as a; print(a.bundled_plotly_version())' 2>/dev/null || true)"
CARTESIAN="vendor/plotly-cartesian-${PLOTLY_JS_VERSION}.min.js"
TRIED="vendor/.npm-tried-${PLOTLY_JS_VERSION}"  # one try per version (delete it to try again)
if [ -n "$PLOTLY_JS_VERSION" ] && [ ! -f "$CARTESIAN" ] && [ ! -f "$TRIED" ] && command -v npm >/dev/null 2>&1; then
    mkdir -p vendor
    TMP="$(mktemp -d)"
    if (cd "$TMP" && timeout 60 npm pack --silent "plotly.js-cartesian-dist-min@${PLOTLY_JS_VERSION}" >/dev/null 2>&1) \
        && tar -xzf "$TMP"/plotly.js-cartesian-dist-min-*.tgz -C "$TMP" package/plotly-cartesian.min.js \
        && head -c 300 "$TMP/package/plotly-cartesian.min.js" > "$TMP/head" \
        && grep -q "v${PLOTLY_JS_VERSION}$" "$TMP/head"; then
        mv "$TMP/package/plotly-cartesian.min.js" "$CARTESIAN"
    else
        echo "note: npm could not fetch plotly.js-cartesian-dist-min@${PLOTLY_JS_VERSION}; the page serves the full plotly.min.js" >&2
        touch "$TRIED"
    fi
    rm -rf "$TMP"
fi
