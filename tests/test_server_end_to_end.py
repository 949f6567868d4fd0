"""End to end, as users run it: ComfyUI's own server with the pack installed, API-format prompts
posted to /prompt, results read from /history and the output folder. Every test here shares one
server (the session's `comfy_server`), so that the test processes start it once."""

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from support import tiny_models
from support.comfy_server import PACK_NAME, ROOT
from support.families import BY_ID, NEWER_FAMILY_WORKFLOWS, comfy_has

sys.path.insert(0, str(ROOT / "scripts"))
from workflow_api import to_api  # noqa: E402

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


def test_every_workflow_converts_against_the_servers_node_definitions(server):
    """Each workflow in workflows/ uses node types the server knows (or a named third-party pack)
    with widget values that fit each node's inputs."""
    info = server.get("/object_info")
    workflows = sorted((ROOT / "workflows").glob("*.json"))
    assert workflows
    for path in workflows:
        newer = NEWER_FAMILY_WORKFLOWS.get(path.stem)  # checked where this ComfyUI has the family (the page loads it everywhere)
        if newer is not None and not comfy_has(BY_ID[newer[1]].requires):
            continue
        workflow = json.loads(path.read_text())
        # Other packs' nodes are not checked; the rest must convert cleanly.
        workflow["nodes"] = [n for n in workflow["nodes"] if not n["type"].startswith(THIRD_PARTY_PREFIXES)]
        assert to_api(workflow, info), path.name


def test_workflows_are_listed_as_templates_of_the_pack(server):
    templates = server.get("/workflow_templates")
    listed = set(templates.get(PACK_NAME, []))
    assert {p.stem for p in (ROOT / "workflows").glob("*.json")} <= listed, templates


# --- the EVS Sampler ---------------------------------------------------------------------------

def test_evs_sampler_through_the_server(server):
    """As users run it: ComfyUI's server, API prompt with loaders, Wan 2.1 as both the image and the
    video model (pixel bridge, SFI on), outputs saved; a bad t_T2V is reported before sampling."""
    wan, vae = tiny_models.wan21_t2v(), tiny_models.wan21_vae()
    cond = lambda text: {"class_type": "FreeVideoTestTextConditioning", "inputs": {"text": text, "tokens": 8, "dim": 4096}}
    evs = {"latent": ["5", 0], "image_model": ["1", 0], "image_positive": ["2", 0], "image_negative": ["3", 0],
           "video_model": ["1", 0], "video_positive": ["2", 0], "video_negative": ["3", 0], "seed": 1,
           "image_steps": 10, "image_cfg": 3.0, "image_sampler": "euler", "image_scheduler": "simple", "strength": 0.4,
           "t_T2V": 2, "video_steps": 4, "video_cfg": 3.0, "video_sampler": "euler", "video_scheduler": "simple",
           "t_V": 2, "n_V": 2, "sfi": True, "sfi_gamma": 0.8, "sfi_layers": "2-3",
           "sfi_setting": "custom (sfi_layers, sfi_gamma)", "image_vae": ["6", 0], "video_vae": ["6", 0]}
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": wan.name, "weight_dtype": "default"}},
        "2": cond("a red fox runs through snow"), "3": cond("blurry"),
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": 9, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
              "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": vae.name}},
        "7": {"class_type": "FreeVideoEVSSampler", "inputs": evs},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "evs"}},
        "9": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["7", 1], "filename_prefix": "evs", "fps": 8.0,
              "lossless": False, "quality": 80, "method": "default"}},
    }
    files = server.output_files(server.run(prompt))
    (latent,) = [p for p in files if p.suffix == ".latent"]
    assert load_file(str(latent))["latent_tensor"].shape == (1, 16, 3, 4, 4)
    assert any(p.suffix == ".webp" for p in files)
    prompt["7"]["inputs"]["t_T2V"] = 9
    with pytest.raises(RuntimeError, match="t_T2V: 9 is outside the image run"):
        server.run(prompt)


# --- the inspector's layer lists in a graph -------------------------------------------------------

def tiny_api_prompt(workflow: dict, object_info: dict) -> dict:
    """A workflow file in API format (converted against the server's node definitions, links kept)
    on the tiny models: tiny Wan and VAE, the test conditioning node for each text encoder, a 64x64
    latent of 9 frames, 3 steps; each sampler's latent saved exactly, no video files."""
    prompt = to_api(workflow, object_info)
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind in ("CLIPLoader", "VAEDecode", "CreateVideo", "SaveVideo", "PreviewImage"):
            del prompt[node_id]  # nothing left uses them: the text encoders become test nodes below
        elif kind == "UNETLoader":
            inputs["unet_name"] = tiny_models.wan21_t2v().name
        elif kind == "VAELoader":
            inputs["vae_name"] = tiny_models.wan21_vae().name
        elif kind == "CLIPTextEncode":
            prompt[node_id] = {"class_type": "FreeVideoTestTextConditioning", "inputs": {"text": inputs["text"], "tokens": 8, "dim": 4096}}
        elif kind == "EmptyHunyuanLatentVideo":
            inputs.update(width=64, height=64, length=9)
        elif kind == "KSampler":
            inputs["steps"] = 3
            prompt[f"save{node_id}"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id, 0], "filename_prefix": f"layers/{node_id}"}}
    return prompt


def test_inspector_layer_lists_through_links_drive_guidance_and_skip_layer_guidance(server):
    """workflows/wan21_inspector_layers_to_guidance.json through ComfyUI's server on the tiny Wan: the
    inspector's lists reach IE-Adapt guidance and SkipLayerGuidanceDiT through their links; each
    sampled latent equals the same graph with the lists typed by hand (inspector removed), and another
    layer typed by hand gives another latent (the list is what acts)."""
    workflow = json.loads((ROOT / "workflows" / "wan21_inspector_layers_to_guidance.json").read_text())
    info = server.get("/object_info")
    prompt = tiny_api_prompt(workflow, info)
    (inspector,) = [k for k, n in prompt.items() if n["class_type"] == "FreeVideoAttentionInspector"]
    (guidance,) = [k for k, n in prompt.items() if n["class_type"] == "FreeVideoEntropyGuidance"]
    (slg,) = [k for k, n in prompt.items() if n["class_type"] == "SkipLayerGuidanceDiT"]
    assert prompt[guidance]["inputs"]["layers"] == [inspector, 2]
    assert (prompt[slg]["inputs"]["double_layers"], prompt[slg]["inputs"]["single_layers"]) == ([inspector, 3], [inspector, 4])
    samplers = {name: next(k for k, n in prompt.items() if n["class_type"] == "KSampler" and n["inputs"]["model"] == [src, 0])
                for name, src in (("guided", guidance), ("slg", slg))}
    for slot in (2, 3, 4):
        prompt[f"show{slot}"] = {"class_type": "PreviewAny", "inputs": {"source": [inspector, slot]}}

    def run(p):
        entry = server.run(p)
        files = {f.name.split("_")[0]: f for f in server.output_files(entry) if f.suffix == ".latent"}
        latents = {name: load_file(str(files[k]))["latent_tensor"] for name, k in samplers.items()}
        return entry, latents

    entry, linked = run(prompt)
    layers, double, single = (entry["outputs"][f"show{slot}"]["text"][0] for slot in (2, 3, 4))
    assert len(layers.split(", ")) == 1 and (double, single) == (layers, ""), (layers, double, single)

    def typed(layer_list: str) -> dict:
        p = json.loads(json.dumps(prompt))
        for key in [inspector, "show2", "show3", "show4"] + [k for k, n in p.items() if n["inputs"].get("source") == [inspector, 1]]:
            p.pop(key)
        p[guidance]["inputs"]["layers"] = layer_list
        p[slg]["inputs"].update(double_layers=layer_list, single_layers="")
        return p

    _, by_hand = run(typed(layers))
    other = str((int(layers) + 1) % 4)
    _, other_layer = run(typed(other))
    for name in samplers:
        assert torch.isfinite(linked[name]).all() and linked[name].std() > 0.1
        assert torch.equal(linked[name], by_hand[name]), name
        change = ((other_layer[name] - linked[name]).norm() / linked[name].norm()).item()
        print(f"{name}: layer {layers} from the inspector; layer {other} typed instead changes the latent by {change:.3e} (relative)")
        assert change > 1e-4, (name, change)
