"""Test set-up: a real ComfyUI (COMFYUI_PATH, default the embedded .runtime/ComfyUI) imported in
process, CPU and PyTorch SDPA attention as on GPUs, and the pack imported as package `freevideo`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import in_process  # noqa: E402

in_process.setup()


@pytest.fixture(scope="session")
def wan21():
    import tiny_models
    return tiny_models.load_diffusion_model(tiny_models.wan21_t2v())
