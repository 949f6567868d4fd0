"""End to end, as users run it: ComfyUI's own server with the pack installed, API-format prompts
posted to /prompt, results read from /history and the output folder."""

import re

import pytest
import torch
from safetensors.torch import load_file

from support import tiny_models

pytestmark = pytest.mark.server


def wan_prompt(enhance_weight: float | None, prefix: str) -> dict:
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_models.wan21_t2v().name, "weight_dtype": "default"}},
        "2": {"class_type": "FreeVideoTestTextConditioning", "inputs": {"text": "a red fox runs through snow", "tokens": 8, "dim": 4096}},
        "3": {"class_type": "FreeVideoTestTextConditioning", "inputs": {"text": "blurry", "tokens": 8, "dim": 4096}},
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 128, "height": 128, "length": 17, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }
    if enhance_weight is not None:
        prompt["7"] = {"class_type": "FreeVideoEnhanceAVideo", "inputs": {
            "model": ["1", 0], "weight": enhance_weight, "start_percent": 0.0, "end_percent": 1.0, "layers": "all"}}
        prompt["5"]["inputs"]["model"] = ["7", 0]
    return prompt


@pytest.fixture(scope="module")
def server(comfy_server):
    return comfy_server


def saved_latent(server, entry):
    (path,) = [p for p in server.output_files(entry) if p.suffix == ".latent"]
    return load_file(str(path))["latent_tensor"]


def test_pack_loads_without_import_errors(server):
    log = server.log()
    assert re.search(r"custom_nodes/ComfyUI-FreeVideo\s*$", log, re.M), log[-3000:]
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]


def test_every_node_input_has_a_tooltip(server):
    info = server.get("/object_info")
    ours = {name: spec for name, spec in info.items() if spec.get("python_module", "").endswith("ComfyUI-FreeVideo")}
    assert "FreeVideoEnhanceAVideo" in ours
    for name, spec in ours.items():
        assert spec.get("description"), name
        for section in ("required", "optional"):
            for input_name, declared in spec["input"].get(section, {}).items():
                options = declared[1] if len(declared) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_enhance_a_video_through_the_server(server):
    plain = saved_latent(server, server.run(wan_prompt(None, "plain")))
    enhanced = saved_latent(server, server.run(wan_prompt(4.0, "enhanced")))
    # weight 0 returns a plain clone of the same loaded model, sampled after the enhanced run: it
    # must match the first run exactly (ComfyUI's cache cannot serve it: the node inputs differ).
    off = saved_latent(server, server.run(wan_prompt(0.0, "off")))
    assert plain.shape == (1, 16, 5, 16, 16)
    assert torch.isfinite(enhanced).all()
    assert not torch.equal(plain, enhanced)
    assert torch.equal(plain, off), "the model the user loaded must stay untouched"


def test_bad_input_is_reported_before_sampling(server):
    prompt = wan_prompt(4.0, "bad")
    prompt["7"]["inputs"]["layers"] = "0-99"
    with pytest.raises(RuntimeError, match="layers: layer 99 does not exist"):
        server.run(prompt)


# Node packs that the paper-setting workflows use and that this test server does not install.
THIRD_PARTY_PREFIXES = ("ADE_", "VHS_")
# Workflows of families that only newer ComfyUI has (0.33 has both), and the module of each: checked
# where the running ComfyUI has it (tests/test_browser.py loads them in the page everywhere).
NEWER_FAMILY_WORKFLOWS = {"ltx2_t2v_enhance_a_video": "comfy.ldm.lightricks.av_model",
                          "minimax_h3_t2v_enhance_a_video": "comfy.ldm.minimax.model"}


def comfy_has(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_every_workflow_converts_against_the_servers_node_definitions(server):
    """Each workflow in workflows/ uses node types the server knows (or a named third-party pack)
    with widget values that fit each node's inputs."""
    import json
    import sys
    from support.comfy_server import ROOT
    sys.path.insert(0, str(ROOT / "scripts"))
    from workflow_api import to_api

    info = server.get("/object_info")
    workflows = sorted((ROOT / "workflows").glob("*.json"))
    assert workflows
    for path in workflows:
        if path.stem in NEWER_FAMILY_WORKFLOWS and not comfy_has(NEWER_FAMILY_WORKFLOWS[path.stem]):
            continue
        workflow = json.loads(path.read_text())
        # Other packs' nodes are not checked; the rest must convert cleanly.
        workflow["nodes"] = [n for n in workflow["nodes"] if not n["type"].startswith(THIRD_PARTY_PREFIXES)]
        assert to_api(workflow, info), path.name


def test_workflows_are_listed_as_templates_of_the_pack(server):
    from support.comfy_server import PACK_NAME, ROOT
    templates = server.get("/workflow_templates")
    listed = set(templates.get(PACK_NAME, []))
    assert {p.stem for p in (ROOT / "workflows").glob("*.json")} <= listed, templates
