#!/usr/bin/env bash
# The wheel as an inference node installs it: build it, install it (not editable) into a fresh venv,
# and run every command from a folder outside the source tree, so nothing can come from the checkout.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/flux2-wheel-XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$python" -m pip wheel -q --no-deps --wheel-dir "$work/dist" "$repo"
wheel="$(ls "$work"/dist/flux2_trt-*.whl)"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q torch==2.13.0   # the pinned CPU build, as `make setup`
"$work/venv/bin/pip" install -q "$wheel"
"$python" -c "import sys, zipfile; print(f'wheel-smoke: {sys.argv[1]}: {len(zipfile.ZipFile(sys.argv[1]).namelist())} files')" "$wheel"

cd "$work"   # no checkout on sys.path from here on
export FLUX2_TRT_CACHE="$work/cache"
bin="$work/venv/bin"
"$bin/python" - <<'PY'
import importlib.util, pathlib, sys
for name in ("common", "export", "export.fp8", "engines", "runtime", "runtime.backends.ort", "flux2_tiny"):
    origin = pathlib.Path(importlib.util.find_spec(name).origin)
    assert "site-packages" in origin.parts, f"{name} imported from {origin}, not the installed wheel"
print("wheel-smoke: every package imports from site-packages")
PY
for script in flux2-export flux2-engines-check flux2-engines-build flux2-generate flux2-check; do
    "$bin/$script" --help > /dev/null
done
for module in export engines.check engines.build runtime.generate runtime.check flux2_tiny; do
    "$bin/python" -m "$module" --help > /dev/null
done
echo "wheel-smoke: --help of every command and module"
if "$bin/flux2-generate" --artifacts "$work/no-such-folder" --prompt x 2> "$work/error.txt"; then
    echo "wheel-smoke: flux2-generate accepted a missing artifacts folder" >&2; exit 1
fi
if [ "$(wc -l < "$work/error.txt")" -ne 1 ] || grep -q Traceback "$work/error.txt"; then
    echo "wheel-smoke: a user error was not one line:" >&2; cat "$work/error.txt" >&2; exit 1
fi
echo "wheel-smoke: a user error from a console script is one line: $(cat "$work/error.txt")"
"$bin/flux2-export" --model tiny --out "$work/artifacts" --height 128 --width 128 --max-sequence-length 128
"$bin/python" -m engines.check "$work/artifacts"
"$bin/flux2-generate" --artifacts "$work/artifacts" --prompt "a red fox in the snow" --steps 2 --out "$work/images"
ls "$work"/images/*.png > /dev/null
echo "wheel-smoke: export, engines.check and generate ran from the installed wheel"
