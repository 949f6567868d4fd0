"""ComfyUI imported into this process the way the tests, benchmarks and demo run it: the embedded
runtime (or COMFYUI_PATH), CPU, PyTorch SDPA attention as on GPUs, and the pack importable as
package `freevideo`."""

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY = Path(os.environ.get("COMFYUI_PATH", ROOT / ".runtime" / "ComfyUI"))


def setup(cpu: bool | None = None):
    """Idempotent; must run before anything imports comfy.model_management. cpu=False leaves the
    device choice to ComfyUI (GPU scripts); None reads FREEVIDEO_DEVICE ("gpu" for ComfyUI's choice,
    default "cpu")."""
    if cpu is None:
        cpu = os.environ.get("FREEVIDEO_DEVICE", "cpu") != "gpu"
    if "freevideo" in sys.modules:
        return sys.modules["freevideo"]
    if not (COMFY / "comfy").is_dir():
        raise RuntimeError(f"No ComfyUI at {COMFY}: run scripts/setup_runtime.sh or set COMFYUI_PATH")
    if str(COMFY) not in sys.path:
        sys.path.insert(0, str(COMFY))
    from comfy.cli_args import args
    args.cpu = cpu
    args.use_pytorch_cross_attention = True
    spec = importlib.util.spec_from_file_location("freevideo", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["freevideo"] = pack
    spec.loader.exec_module(pack)
    return pack
