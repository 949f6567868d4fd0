"""Test set-up: a real ComfyUI (COMFYUI_PATH, default the embedded .runtime/ComfyUI) imported in
process, CPU and PyTorch SDPA attention as on GPUs, and the pack imported as package `freevideo`."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMFY = Path(os.environ.get("COMFYUI_PATH", ROOT / ".runtime" / "ComfyUI"))
if not (COMFY / "comfy").is_dir():
    raise RuntimeError(f"No ComfyUI at {COMFY}: run scripts/setup_runtime.sh or set COMFYUI_PATH")
sys.path.insert(0, str(COMFY))
sys.path.insert(0, str(ROOT / "tests"))

from comfy.cli_args import args  # noqa: E402  (must be set before comfy.model_management loads)

args.cpu = True
args.use_pytorch_cross_attention = True


def _import_pack():
    spec = importlib.util.spec_from_file_location("freevideo", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["freevideo"] = module
    spec.loader.exec_module(module)
    return module


_import_pack()


@pytest.fixture(scope="session")
def wan21():
    import tiny_models
    return tiny_models.load_diffusion_model(tiny_models.wan21_t2v())
