#!/usr/bin/env bash
# The demo command: sets up the embedded runtime (idempotent), generates the tiny models and runs
# the Enhance-A-Video workflow through ComfyUI's server; results land in output/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_runtime.sh"
source "${FREEVIDEO_RUNTIME:-$ROOT/.runtime}/env.sh"
"$FREEVIDEO_PYTHON" "$ROOT/scripts/demo.py"
