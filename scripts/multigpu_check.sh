#!/usr/bin/env bash
# Our nodes under ComfyUI's multi-GPU work units on two real GPUs (needs ComfyUI 0.33 or newer:
# COMFYUI_PATH=/path/to/ComfyUI). Sets up the runtime like the tests, then runs the check.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_runtime.sh"
source "${FREEVIDEO_RUNTIME:-$ROOT/.runtime}/env.sh"
cd "$ROOT"
"$FREEVIDEO_PYTHON" scripts/multigpu_check.py
