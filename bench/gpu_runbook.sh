#!/usr/bin/env bash
# Every benchmark on a CUDA machine at real Wan 2.1 1.3B shapes (30 layers, dim 1536, 81 frames at
# 480x832 = 21 x 60 x 104 latent), random weights, ComfyUI's own device and dtype choice (bf16 on
# recent GPUs), SDPA attention. Prints the same tables as on the CPU. Never part of CI.
#   bash bench/gpu_runbook.sh            (COMFYUI_PATH=/path/to/ComfyUI for another ComfyUI)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_runtime.sh"
source "${FREEVIDEO_RUNTIME:-$ROOT/.runtime}/env.sh"
cd "$ROOT"
"$FREEVIDEO_PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this run book is for a GPU machine')"
export FREEVIDEO_DEVICE=gpu
run() { echo; echo "== $*"; "$FREEVIDEO_PYTHON" "$@"; }
run bench/bench_enhance_a_video.py --layers 30 --frames 21 --height 60 --width 104 --steps 4 --repeats 3
run bench/bench_entropy_guidance.py --rounds 3 --steps 4
for script in bench/bench_feature_accumulation.py bench/bench_entropy_editing.py bench/bench_evs.py; do
    [ -f "$script" ] && run "$script"
done
