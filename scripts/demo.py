"""The demo: runs workflows/wan21_t2v_enhance_a_video.json through ComfyUI's own server, with tiny
stand-ins for the real model files (no weights are downloaded), and writes the enhanced video and a
plain | enhanced side-by-side video under output/.

The workflow file is the one users drag into ComfyUI; the demo changes only what a machine without
the real models needs: file names point at tiny generated models, the text encoder is replaced by
seeded embeddings, and the size and step count are small.
"""

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
import in_process  # noqa: E402  (tiny models are built with ComfyUI's classes in this process)

in_process.setup()

import tiny_models  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402
from workflow_api import to_api  # noqa: E402

WORKFLOW = ROOT / "workflows" / "wan21_t2v_enhance_a_video.json"
OUTPUT = ROOT / "output"


def tiny_prompt(prompt: dict, unet: str, vae: str) -> dict:
    """Point the workflow at tiny models: same graph, small sizes."""
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = unet
        elif kind == "VAELoader":
            inputs["vae_name"] = vae
        elif kind == "CLIPLoader":
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            node["class_type"] = "FreeVideoTestTextConditioning"
            node["inputs"] = {"text": inputs["text"], "tokens": 8, "dim": 4096}
        elif kind == "EmptyHunyuanLatentVideo":
            inputs.update(width=128, height=128, length=17)
        elif kind == "KSampler":
            inputs["steps"] = 6
    return prompt


def main():
    started = time.time()
    unet, vae = tiny_models.wan21_t2v(), tiny_models.wan21_vae()
    OUTPUT.mkdir(exist_ok=True)
    base = ROOT / ".runtime" / "demo"
    shutil.rmtree(base, ignore_errors=True)
    with ComfyServer(base, models={"diffusion_models": [unet], "vae": [vae]}, output_dir=OUTPUT / "comfy") as server:
        prompt = tiny_prompt(to_api(json.loads(WORKFLOW.read_text()), server.get("/object_info")), unet.name, vae.name)
        entry = server.run(prompt, timeout=600)
        files = server.output_files(entry)
    print(f"[demo] ran {WORKFLOW.relative_to(ROOT)} through ComfyUI's server in {time.time() - started:.0f} s")
    for f in files:
        print(f"[demo] wrote {f.relative_to(ROOT)} ({f.stat().st_size} bytes)")
    if not any("side_by_side" in f.name for f in files):
        raise SystemExit("[demo] the side-by-side video is missing")


if __name__ == "__main__":
    main()
