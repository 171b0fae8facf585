#!/usr/bin/env bash
# Runs mergekit 0.1.5's own test suite with the mergekit-wudi plugin installed, so that its
# generic checks over every registered merge method also cover ours.
#
# Usage (from anywhere, with the project's venv activated):
#   tests/mergekit_upstream/run.sh [extra pytest args...]
# Uses whatever `python` is on PATH. Set MERGEKIT_SDIST_CACHE to a directory to cache the
# downloaded sdist (otherwise it is downloaded into a temporary directory). Needs PyPI access
# unless the cache already holds mergekit-0.1.5.tar.gz.
set -euo pipefail

VERSION=0.1.5
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# 1. The plugin must be active in this interpreter, or the run would not cover it.
"$PYTHON" - <<PY
import importlib.metadata as md
from mergekit import merge_methods
assert md.version("mergekit") == "$VERSION", "mergekit $VERSION required, got " + md.version("mergekit")
merge_methods.get("wudi")  # raises if the plugin did not register its methods
print("mergekit", md.version("mergekit"), "with mergekit-wudi", md.version("mergekit-wudi"), ": wudi registered")
PY

# 2. Fetch and extract the sdist.
CACHE="${MERGEKIT_SDIST_CACHE:-$WORK/dl}"
mkdir -p "$CACHE"
SDIST="$CACHE/mergekit-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: --dest "$CACHE" "mergekit==$VERSION"
fi
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/mergekit-$VERSION"
[ -d "$SRC/tests" ] || { echo "sdist has no tests/" >&2; exit 1; }
cp "$HERE/common.py" "$SRC/tests/common.py"
# Import mergekit from the installed package (where the plugin hooks in), not the sdist copy.
rm -rf "$SRC/mergekit"

# 3. Run the suite from the sdist root (`python -m pytest` puts it on sys.path for `tests.*`).
cd "$SRC"
"$PYTHON" -m pytest -q -p no:cacheprovider tests "$@"
