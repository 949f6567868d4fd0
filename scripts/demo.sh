#!/usr/bin/env bash
# The demo command: sets up the embedded runtime (idempotent), then runs every node of the pack on
# the tiny video models trained by scripts/train_demo_models.py (committed in demo_models/; training
# never runs here): the Enhance-A-Video workflow through ComfyUI's server, then each node plain vs
# patched over 8 seeds, with videos, frame strips and a metrics report under output/.
# Arguments go to scripts/demo.py (--seeds N, --skip-server, --threads N).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_runtime.sh"
source "${FREEVIDEO_RUNTIME:-$ROOT/.runtime}/env.sh"
"$FREEVIDEO_PYTHON" "$ROOT/scripts/demo.py" "$@"
