"""Our nodes under ComfyUI's own multi-GPU work units on two real GPUs (ComfyUI 0.33 or newer).

Run with `bash scripts/multigpu_check.sh` on a machine with two or more CUDA GPUs. For each node:
the patched model sampled on one GPU, then through ComfyUI's MultiGPU_WorkUnits node (a deep clone
on the second GPU, work units in a worker thread); prints the largest difference, which should be
float noise, and checks the deep clone's hooked layers hold weights on the second GPU.
"""

import sys
from pathlib import Path

import torch

# The root, for `support`; appended: its nodes/ must not shadow ComfyUI's nodes.py.
sys.path.append(str(Path(__file__).resolve().parent.parent))
from support import in_process  # noqa: E402

if torch.cuda.device_count() < 2:
    sys.exit(f"needs two CUDA GPUs; this machine has {torch.cuda.device_count()}")
in_process.setup(cpu=False)

from comfy_extras.nodes_multigpu import MultiGPUCFGSplitNode  # noqa: E402
from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video  # noqa: E402
from freevideo.enhance_core.methods.entropy_guidance import apply_entropy_guidance  # noqa: E402
from support import tiny_models  # noqa: E402
from support.sampling import ksample, text_conditioning, video_latent  # noqa: E402

NODES = {"Enhance-A-Video": lambda m: apply_enhance_a_video(m, weight=4.0),
         "IE-Adapt guidance": lambda m: apply_entropy_guidance(m, 1.0)}


def main():
    pos, neg = text_conditioning(seed=1), text_conditioning(seed=2)
    failed = False
    for name, node in NODES.items():
        patched = node(tiny_models.load_diffusion_model(tiny_models.wan21_t2v()))
        single = ksample(patched, video_latent(frames=5), pos, neg, steps=4)
        split_model = MultiGPUCFGSplitNode.execute(patched, 2)[0]
        (deep,) = split_model.get_additional_models_with_key("multigpu")
        split = ksample(split_model, video_latent(frames=5), pos, neg, steps=4)
        hooked = [p for p in deep.object_patches.values() if hasattr(p, "_freevideo_arounds")]
        devices = {t.device for p in hooked for t in p.parameters()}
        diff = float((split - single).abs().max())
        ok = diff < 1e-2 and devices == {deep.load_device}
        failed |= not ok
        print(f"{name}: deep clone on {deep.load_device}, hooked-layer weights on {sorted(map(str, devices))}, "
              f"max |split - single| = {diff:.2e} -> {'ok' if ok else 'FAILED'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
