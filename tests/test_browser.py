"""The workflow files in ComfyUI's real frontend, the way a user uses them: ComfyUI's own server
serves its own frontend package to headless Chromium; each file in workflows/ is dropped onto the
canvas; the page must know every node type (except a named third-party pack's, when that pack is not
installed) and show every FreeVideo widget with the value the file means, valid for its input.
Variants of the Wan workflows that point at tiny models are queued with the page's Run button and
their outputs checked.

Needs Chromium (installed with apt-get when missing and running as root) and Playwright; skipped,
with the reason, where either is missing. The AnimateDiff-Evolved snapshot comes from
FREEVIDEO_PEERS (default ../shared/peers beside the repository); without it that pack's nodes may be
unknown to the page, and the workflow's note and the README must name the pack.

FREEVIDEO_UPDATE_SCREENSHOTS=1 writes the screenshots of the loaded graphs to
docs/images/workflows/<name>.png and the template thumbnails to workflows/<name>.jpg; otherwise
they go to a temporary folder and are only checked.
"""

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from support import browser_page, families, tiny_models
from support.comfy_server import PACK_NAME, ComfyServer
from support.families import comfy_has
from support.sampling import relative_l2
from support.in_process import COMFY, ROOT

pytestmark = [pytest.mark.browser, pytest.mark.server]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SCREENSHOTS = ROOT / "docs" / "images" / "workflows"
UPDATE_SCREENSHOTS = os.environ.get("FREEVIDEO_UPDATE_SCREENSHOTS") == "1"
PEERS = Path(os.environ.get("FREEVIDEO_PEERS", ROOT.parent / "shared" / "peers"))

# Third-party packs a workflow may use: node type prefix -> (pack name as the notes and README name
# it, snapshot file prefix in FREEVIDEO_PEERS).
THIRD_PARTY = {"ADE_": ("AnimateDiff-Evolved", "ComfyUI-AnimateDiff-Evolved")}

# Which widget of a loader holds a model file, and the models/ folder ComfyUI reads it from.
MODEL_FILES = {
    "UNETLoader": [(0, "diffusion_models")],
    "CLIPLoader": [(0, "text_encoders")],
    "DualCLIPLoader": [(0, "text_encoders"), (1, "text_encoders")],
    "VAELoader": [(0, "vae")],
    "CheckpointLoaderSimple": [(0, "checkpoints")],
    "ADE_LoadAnimateDiffModel": [(0, "animatediff_models")],
    "LTXAVTextEncoderLoader": [(0, "text_encoders"), (1, "checkpoints")],
    "LTXVAudioVAELoader": [(0, "checkpoints")],
    "LoraLoaderModelOnly": [(0, "loras")],
}
NOTE_TYPES = ("Note", "MarkdownNote")
SEED_CONTROL = ("fixed", "increment", "decrement", "randomize")

PNG_MAX_BYTES = 300_000
THUMBNAIL_MAX_BYTES = 60_000
THUMBNAIL_SIZE = (512, 320)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def model_files(workflow: dict) -> list[tuple[str, str]]:
    """(folder, file name) of every model file the workflow's loaders name."""
    return [(folder, node["widgets_values"][i]) for node in workflow["nodes"]
            for i, folder in MODEL_FILES.get(node["type"], [])]


def note_text(workflow: dict) -> str:
    return "\n".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in NOTE_TYPES)


def peer_snapshot(prefix: str) -> Path | None:
    found = sorted(PEERS.glob(f"{prefix}-*.tar.gz"))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def chromium():
    pytest.importorskip("playwright.sync_api", reason="Playwright for Python is missing: "
                        "pip install -r tests/requirements.txt")
    path, why = browser_page.ensure_chromium()
    if path is None:
        pytest.skip(f"browser test needs Chromium: {why}")
    return path


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    browser_page.write_settings(base)
    # Empty stand-ins named like the real model files, so the loaders' lists hold what the
    # workflows name (as on a user's machine); the tiny models are what the runs load.
    for path in WORKFLOWS:
        for folder, name in model_files(load(path)):
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (base / "models" / folder / name).touch()
    installed = {}
    for prefix, (pack, snapshot_prefix) in THIRD_PARTY.items():
        snapshot = peer_snapshot(snapshot_prefix)
        if snapshot is None:
            continue
        with tarfile.open(snapshot) as tf:
            tf.extractall(base / "peers", filter="data")
        (base / "custom_nodes").mkdir(exist_ok=True)
        (base / "custom_nodes" / snapshot_prefix).symlink_to(base / "peers" / snapshot_prefix)
        installed[prefix] = pack
    models = {"diffusion_models": [tiny_models.wan21_t2v(), *tiny_wan22_files().values()],
              "vae": [tiny_models.wan21_vae()], "loras": list(tiny_wan22_loras().values())}
    for family, module, family_id in NEWER_FAMILIES.values():
        if comfy_has(module):
            models["diffusion_models"].append(getattr(tiny_models, families.BY_ID[family_id].file)())
    # The image a workflow's LoadImage names, as ComfyUI ships it in its input folder.
    (base / "input").mkdir(exist_ok=True)
    shutil.copy(COMFY / "input" / "example.png", base / "input" / "example.png")
    with ComfyServer(base, models=models) as s:
        s.third_party_installed = installed
        s.object_info = s.get("/object_info")
        yield s


@pytest.fixture(scope="module")
def page(server, chromium):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            # Screenshots for the docs are drawn at twice the resolution and saved at the viewport's:
            # small text stays legible. Otherwise the page draws at the viewport's own resolution:
            # each redraw of the canvas (after every change to the graph) draws a quarter of the
            # pixels, which makes this file about a tenth faster on 2 cores.
            scale = 2 if UPDATE_SCREENSHOTS else 1
            tab = browser.new_page(viewport=browser_page.VIEWPORT, device_scale_factor=scale)
            comfy = browser_page.ComfyPage(tab, server.url)
            comfy.open()
            yield comfy
        finally:
            browser.close()


# --- what a file means ---------------------------------------------------------------------------

def declared_inputs(info: dict) -> list[tuple[str, list]]:
    declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info.get("input_order")
    names = order.get("required", []) + order.get("optional", []) if order else list(declared)
    return [(name, declared[name]) for name in names]


def is_widget(declared: list) -> bool:
    kind = declared[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def has_seed_control(name: str, declared: list) -> bool:
    """Whether the frontend adds a "control after generate" widget after this input: when the
    input asks for one, and for any integer named seed or noise_seed that does not refuse one."""
    control = (declared[1] if len(declared) > 1 else {}).get("control_after_generate")
    if declared[0] == "INT":
        return bool(control if control is not None else name in ("seed", "noise_seed"))
    return bool(control)


def meant_widgets(node: dict, info: dict, complete: bool = True) -> list[tuple[str, object]]:
    """The file's widgets_values named by the node's declared widget inputs, in the server's order,
    with the frontend's "control after generate" value after each seed (see has_seed_control).
    complete=False accepts a file without values for trailing inputs (that a newer ComfyUI added to
    one of its own nodes: the page gives them their defaults); an optional input without a value in
    the file (saved before the input existed) means its default, which the page gives it."""
    values = list(node.get("widgets_values", []))
    named = []
    optional = info["input"].get("optional", {})
    for name, declared in declared_inputs(info):
        if not is_widget(declared):
            continue
        if not values and not complete:
            break
        if not values and name in optional and "default" in (declared[1] if len(declared) > 1 else {}):
            # A file saved before an optional input existed: the page gives it its default.
            named.append((name, declared[1]["default"]))
            continue
        assert values, f"node {node['id']} ({node['type']}): no value in the file for widget {name}"
        named.append((name, values.pop(0)))
        if has_seed_control(name, declared):
            assert values, f"node {node['id']} ({node['type']}): no 'control after generate' value after {name}"
            named.append(("control_after_generate", values.pop(0)))
    assert not values, f"node {node['id']} ({node['type']}): values {values} in the file match no widget"
    return named


def invalid(value, declared: list) -> str | None:
    """Why `value` does not fit the declared input, or None."""
    kind = declared[0]
    options = declared[1] if len(declared) > 1 else {}
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        return None if value in choices else f"{value!r} is not one of {choices}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number"
    if kind == "INT" and value != int(value):
        return f"{value!r} is not an integer"
    if "min" in options and value < options["min"]:
        return f"{value} < min {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{value} > max {options['max']}"
    return None


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


# --- loading every workflow ----------------------------------------------------------------------

@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_in_the_page(page, server, path, tmp_path):
    workflow = load(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    shown = page.drop_file(path.name, path.read_text())
    assert page.active_workflow_name() == path.stem

    # Node types: all known, except a third-party pack's that this server lacks and that the
    # workflow's note and the README name, and a newer family's that this ComfyUI lacks (see
    # test_newer_family_workflows_name_their_comfyui).
    notes, readme = note_text(workflow), (ROOT / "README.md").read_text()
    unknown = [n["type"] for n in shown if not n["known"]]
    newer = NEWER_FAMILIES.get(path.stem)
    for kind in unknown:
        prefix = next((p for p in THIRD_PARTY if kind.startswith(p)), None)
        if newer is not None and not comfy_has(newer[1]):
            continue
        assert prefix is not None and prefix not in server.third_party_installed, \
            f"{path.name}: node type {kind} is unknown to the page"
    for prefix, (pack, snapshot_prefix) in THIRD_PARTY.items():
        if any(n["type"].startswith(prefix) for n in workflow["nodes"]):
            assert pack in notes and pack in readme, f"{path.name} uses {pack}: its note and the README must name it"
    if unknown:
        why = f"{newer[0]} is not in this ComfyUI" if newer is not None else f"no snapshot in {PEERS}"
        print(f"{path.name}: {sorted(set(unknown))} not installed here ({why}); their widgets are not checked")

    # Every FreeVideo widget, by name: the value the file means, valid for its input.
    ours = [n for n in shown if n["type"].startswith("FreeVideo")]
    assert ours, f"{path.name} has no FreeVideo node"
    for node in ours:
        info = server.object_info[node["type"]]
        declared = dict(declared_inputs(info))
        meant = meant_widgets(nodes[node["id"]], info)
        assert [name for name, _ in node["widgets"]] == [name for name, _ in meant], \
            f"{path.name} node {node['id']} ({node['type']}): the page shows widgets {node['widgets']}, the file means {meant}"
        for (name, value), (_, want) in zip(node["widgets"], meant):
            assert same(value, want), f"{path.name} node {node['id']} {name}: page shows {value!r}, the file means {want!r}"
            if name == "control_after_generate":
                assert value in SEED_CONTROL, f"{path.name} node {node['id']}: control after generate {value!r}"
            else:
                why = invalid(value, declared[name])
                assert why is None, f"{path.name} node {node['id']} ({node['type']}) {name}: {why}"

    # The page's own conversion to an API prompt agrees with the file for our nodes.
    prompt = page.graph_to_prompt()
    for node in ours:
        sent = prompt[str(node["id"])]["inputs"]
        linked = {i["name"] for i in nodes[node["id"]].get("inputs", []) if i.get("link") is not None}
        for name, want in meant_widgets(nodes[node["id"]], server.object_info[node["type"]]):
            if name != "control_after_generate" and name not in linked:  # a linked widget sends its link
                assert same(sent[name], want), f"{path.name} node {node['id']} {name}: page queues {sent[name]!r}, file {want!r}"

    # The note says which model files go where.
    assert notes, f"{path.name} has no note"
    for folder, name in model_files(workflow):
        assert f"models/{folder}/{name}" in notes, f"{path.name}: the note must say models/{folder}/{name}"

    # A screenshot of the whole graph, nothing over it.
    page.tidy()
    page.fit_view()
    shot = page.screenshot(tmp_path / f"{path.stem}.png")
    check_screenshot(shot)
    if UPDATE_SCREENSHOTS and newer is not None and unknown:
        print(f"{path.name}: screenshot not updated (take it on a ComfyUI with {newer[0]})")
    elif UPDATE_SCREENSHOTS:
        assert not unknown, f"{path.name}: install every pack it uses before updating its screenshot"
        save_screenshot(shot, path.stem)


def check_screenshot(path: Path) -> None:
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (browser_page.VIEWPORT["width"], browser_page.VIEWPORT["height"])
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, f"{path.name} looks blank"


def save_screenshot(shot: Path, stem: str) -> None:
    from PIL import Image
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with Image.open(shot) as im:
        im = im.convert("RGB")
        im.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            SCREENSHOTS / f"{stem}.png", optimize=True)
        im.resize(THUMBNAIL_SIZE, Image.Resampling.LANCZOS).save(
            ROOT / "workflows" / f"{stem}.jpg", quality=82, optimize=True)


def test_every_workflow_has_its_screenshot_and_template_thumbnail(server):
    """docs/images/workflows/<name>.png for the README; workflows/<name>.jpg beside each file, the
    name and extension under which ComfyUI's template browser shows a custom node pack's template."""
    from PIL import Image
    import urllib.request
    for path in WORKFLOWS:
        png, jpg = SCREENSHOTS / f"{path.stem}.png", path.with_suffix(".jpg")
        assert png.is_file() and jpg.is_file(), f"run FREEVIDEO_UPDATE_SCREENSHOTS=1 pytest tests/test_browser.py for {path.name}"
        with Image.open(png) as im:
            assert im.size == (browser_page.VIEWPORT["width"], browser_page.VIEWPORT["height"])
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.size == THUMBNAIL_SIZE
        assert png.stat().st_size <= PNG_MAX_BYTES and jpg.stat().st_size <= THUMBNAIL_MAX_BYTES
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_NAME}/{path.stem}.jpg") as r:
            assert r.read() == jpg.read_bytes()


# --- running tiny variants from the page ---------------------------------------------------------

def tiny_variant(workflow: dict) -> dict:
    """The same graph on the tiny models: loaders name the tiny files, each text encoder becomes
    the test conditioning node (same text), a 64x64 latent of 9 frames (3 latent frames), 3 steps."""
    unet, vae = tiny_models.wan21_t2v().name, tiny_models.wan21_vae().name
    workflow = json.loads(json.dumps(workflow))
    dropped = {n["id"] for n in workflow["nodes"] if n["type"] in ("CLIPLoader", "DualCLIPLoader")}
    dropped_links = {link[0] for link in workflow["links"] if link[1] in dropped}
    workflow["nodes"] = [n for n in workflow["nodes"] if n["id"] not in dropped]
    workflow["links"] = [link for link in workflow["links"] if link[0] not in dropped_links]
    for node in workflow["nodes"]:
        kind, values = node["type"], node.get("widgets_values")
        if kind == "UNETLoader":
            values[0] = unet
        elif kind == "VAELoader":
            values[0] = vae
        elif kind == "CLIPTextEncode":
            node["type"] = "FreeVideoTestTextConditioning"
            node["inputs"] = [i for i in node["inputs"] if i["name"] != "clip"]
            node["widgets_values"] = [values[0], 8, 4096]
        elif kind == "EmptyHunyuanLatentVideo":
            values[:3] = [64, 64, 9]
        elif kind == "KSampler":
            values[2] = 3
    return workflow


def save_sampled_latents(workflow: dict) -> dict:
    """Add a SaveLatent after each KSampler ("plain" when its model comes straight from a loader
    chain without a FreeVideo node, else "changed"): exact values to compare, which lossy video
    files are not."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def through_ours(node_id: int) -> bool:
        node = nodes[node_id]
        if node["type"].startswith("FreeVideo"):
            return True
        model = next((i for i in node.get("inputs", []) if i["type"] == "MODEL" and i.get("link") is not None), None)
        return model is not None and through_ours(links[model["link"]][1])

    for sampler in [n for n in workflow["nodes"] if n["type"] == "KSampler"]:
        node_id, link_id = workflow["last_node_id"] + 1, workflow["last_link_id"] + 1
        workflow["last_node_id"], workflow["last_link_id"] = node_id, link_id
        name = "changed" if through_ours(sampler["id"]) else "plain"
        workflow["nodes"].append({
            "id": node_id, "type": "SaveLatent", "pos": [sampler["pos"][0], sampler["pos"][1] - 80], "size": [300, 60],
            "flags": {}, "order": len(workflow["nodes"]), "mode": 0,
            "inputs": [{"name": "samples", "type": "LATENT", "link": link_id}], "outputs": [], "properties": {},
            "widgets_values": [f"latents/{name}"]})
        workflow["links"].append([link_id, sampler["id"], 0, node_id, 0, "LATENT"])
        sampler["outputs"][0].setdefault("links", []).append(link_id)
    return workflow


def video_frames(path: Path) -> np.ndarray:
    import av
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


def saved_latent(path: Path):
    from safetensors.torch import load_file
    return load_file(str(path))["latent_tensor"]


def check_side_by_side(files: dict[str, Path], single: str, pair: str) -> None:
    """Plain and changed (same seed): exact latents that differ; the videos: plain (left) | changed
    (right), both real pictures, and the changed one on its own."""
    import torch
    plain, changed = saved_latent(files["plain"]), saved_latent(files["changed"])
    assert plain.shape == changed.shape == (1, 16, 3, 8, 8), (plain.shape, changed.shape)
    assert torch.isfinite(plain).all() and torch.isfinite(changed).all()
    assert 0.1 < plain.std() < 100 and 0.1 < changed.std() < 100, (plain.std(), changed.std())
    relative = ((changed - plain).norm() / plain.norm()).item()
    assert relative > 1e-3, f"the FreeVideo node changed nothing (relative difference {relative:.2e})"

    sbs, one = video_frames(files[pair]), video_frames(files[single])
    assert one.shape == (9, 64, 64, 3), one.shape
    assert sbs.shape == (9, 64, 64 + 8 + 64, 3), sbs.shape
    left, spacer, right = sbs[:, :, :64], sbs[:, :, 64:72], sbs[:, :, 72:]
    assert spacer[:, :, 2:-2].mean() > 230, "the white spacing between the two videos"
    for video in (left, right, one):
        assert video.std() > 3, "a blank video"
    assert np.abs(left - right).mean() > 0.5, "the two halves of the side-by-side video are the same"


def check_inspector(files: dict[str, Path], texts: list[str]) -> None:
    from PIL import Image
    (chart,) = [p for p in files.values() if p.suffix == ".png"]
    with Image.open(chart) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 10, pixels.shape
    orange = ((pixels[..., 0] > 200) & (pixels[..., 1] > 90) & (pixels[..., 1] < 190) & (pixels[..., 2] < 80)).sum()
    assert orange > 50, "no highlighted (orange) layer in the chart"
    (table,) = texts
    assert table.count("\n") >= 4, table


def check_layer_lists(files: dict[str, Path], texts: list[str]) -> None:
    """The inspector's chart and report (which names the lists it sent), and the two samplers fed by
    its lists: IE-Adapt guidance ("changed") and SkipLayerGuidanceDiT (core, so "plain"), both videos."""
    import torch
    check_inspector(files, texts)
    (table,) = texts
    assert "layers output (FreeVideo nodes' layers inputs): " in table and "SkipLayerGuidanceDiT: double_layers" in table, table
    guided, skipped = saved_latent(files["changed"]), saved_latent(files["plain"])
    assert torch.isfinite(guided).all() and torch.isfinite(skipped).all()
    assert relative_l2(guided, skipped) > 1e-3
    for name in ("wan21_inspector_ie_adapt", "wan21_inspector_slg"):
        check_video(files[name], 9, (64, 64))


RUNS = {
    "wan21_t2v_enhance_a_video": lambda files, texts: check_side_by_side(
        files, "wan21_enhance_a_video", "wan21_enhance_a_video_side_by_side"),
    "wan21_entropy_guidance": lambda files, texts: check_side_by_side(
        files, "wan21_ie_adapt", "wan21_ie_adapt_side_by_side"),
    "wan21_attention_inspector": check_inspector,
    "wan21_inspector_layers_to_guidance": check_layer_lists,
}


def run_from_page(page, server, workflow: dict, file_name: str) -> tuple[dict[str, Path], list[str]]:
    """Drop `workflow` onto the page as `file_name`, press Run, check that the page queued the file's
    graph value for value and that the prompt succeeded; return its output files (by name, without
    the counter) and texts."""
    page.drop_file(file_name, json.dumps(workflow))
    return run_shown_graph(page, server, workflow, file_name)


def run_shown_graph(page, server, workflow: dict, label: str) -> tuple[dict[str, Path], list[str]]:
    """Press Run on the graph the page shows, which must be `workflow` (node modes included); check
    as run_from_page does."""
    page.tidy()
    shown = {n["id"]: n["mode"] for n in page.nodes()}
    assert shown == {n["id"]: n.get("mode", 0) for n in workflow["nodes"]}, f"{label}: node modes in the page {shown}"
    page.start_listening()
    prompt_id, sent = page.press_run()

    # What the page queued is the file's graph, value for value (the page may add inputs that the
    # file leaves at their defaults on newer ComfyUI); bypassed and muted nodes are left out, and
    # a bypassed node's inputs passed on, which ComfyUI's frontend does itself.
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        if node.get("mode", 0) in (MUTED, BYPASSED):
            assert str(node["id"]) not in sent, f"{label}: node {node['id']} ({node['type']}) in mode {node['mode']} was queued"
            continue
        queued = sent[str(node["id"])]
        assert queued["class_type"] == node["type"]
        for i in node.get("inputs", []):
            if i.get("link") is not None and node_mode(workflow, links[i["link"]][1]) != BYPASSED:
                link = links[i["link"]]
                assert queued["inputs"][i["name"]] == [str(link[1]), link[2]], (node["id"], i["name"])
        info = server.object_info[node["type"]]
        if any(d[0] == "COMFY_DYNAMICCOMBO_V3" for _, d in declared_inputs(info)):
            continue  # newer ComfyUI's SaveVideo: format options nest; tests/test_server_end_to_end converts those
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, want in meant_widgets(node, info, complete=node["type"].startswith("FreeVideo")):
            if name != "control_after_generate" and name not in linked:  # checked as a link above
                assert same(queued["inputs"].get(name), want), f"node {node['id']} {name}: {queued['inputs'].get(name)!r} != {want!r}"

    events = page.wait_finished(prompt_id)
    kinds = [e["type"] for e in events]
    errors = [e["detail"] for e in events if e["type"] != "execution_success" and e["type"].startswith("execution_") and e["type"] != "execution_start"]
    assert kinds[-1] == "execution_success" and not errors, json.dumps(errors)[:3000]
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    assert entry["status"]["status_str"] == "success"
    # The page was told about each output node's results, as the server recorded them.
    shown = {e["detail"]["node"] for e in events if e["type"] == "executed"}
    assert shown == set(entry["outputs"]), (shown, set(entry["outputs"]))

    files = {}
    for path in server.output_files(entry):
        assert path.is_file() and path.stat().st_size > 0, path
        files[path.name.rsplit("_", 2)[0] if path.suffix in (".mp4", ".latent") else path.name] = path
    texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    print(f"{label}: ran from the page in {page.elapsed:.1f} s: {sorted(p.name for p in files.values())}")
    return files, texts


# LiteGraph's node modes besides 0 (runs): what Ctrl+M (muted: left out) and Ctrl+B (bypassed: its
# inputs passed on) set in the page.
MUTED, BYPASSED = 2, 4


def node_mode(workflow: dict, node_id: int) -> int:
    return next(n for n in workflow["nodes"] if n["id"] == node_id).get("mode", 0)


@pytest.mark.parametrize("stem", list(RUNS))
def test_tiny_variant_runs_from_the_run_button(page, server, stem):
    workflow = save_sampled_latents(tiny_variant(load(ROOT / "workflows" / f"{stem}.json")))
    files, texts = run_from_page(page, server, workflow, f"{stem}_tiny.json")
    RUNS[stem](files, texts)


# --- the workflows of newer families: Wan 2.2 14B's two experts, LTX-2, MiniMax H3 ----------------
# These are graphs a user starts from: one path through the FreeVideo nodes, no plain copy beside
# it. Their tiny runs compare the graph as it is with the same graph with FreeVideo nodes bypassed
# (what the notes tell a user to do to compare): all of them, and each one alone.

def tiny_wan22_expert(kind: str, expert: str) -> Path:
    """Wan 2.2 14B expert layout, small: 4 blocks of dim 256 (2 heads of 128), T2V with the 16-channel
    latent in, I2V with 36 channels in (latent, mask and image latent, no CLIP-vision embedding) as
    the real experts; ComfyUI's loader detects both as Wan. Each expert has weights of its own."""
    def build():
        import comfy.ops
        from comfy.ldm.wan.model import WanModel
        return WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16 if kind == "t2v" else 36, dim=256,
                        ffn_dim=512, freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=4,
                        operations=comfy.ops.disable_weight_init)
    return tiny_models._cached(f"tiny_wan22_{kind}_14b_{expert}.safetensors", build,
                               seed={"high": 1, "low": 2}[expert])


def tiny_wan22_files() -> dict[str, Path]:
    """The tiny experts by the real file name a Wan 2.2 workflow gives them."""
    return {f"wan2.2_{kind}_{expert}_noise_14B_fp8_scaled.safetensors": tiny_wan22_expert(kind, expert)
            for kind in ("t2v", "i2v") for expert in ("high", "low")}


def tiny_wan22_variant(workflow: dict) -> dict:
    """A Wan 2.2 14B workflow on tiny models: each expert's loader names its tiny expert, the text
    encoder becomes the test conditioning node, a 64x64 latent of 9 frames (3 latent frames), 4 steps
    split at 2 between the experts."""
    workflow = json.loads(json.dumps(workflow))
    drop_nodes(workflow, {n["id"] for n in workflow["nodes"] if n["type"] == "CLIPLoader"})
    tiny = tiny_wan22_files()
    for node in workflow["nodes"]:
        kind, values = node["type"], node.get("widgets_values")
        if kind == "UNETLoader":
            values[0] = tiny[values[0]].name
        elif kind == "VAELoader":
            values[0] = tiny_models.wan21_vae().name
        elif kind == "CLIPTextEncode":
            node["type"] = "FreeVideoTestTextConditioning"
            node["inputs"] = [i for i in node["inputs"] if i["name"] != "clip"]
            node["widgets_values"] = [values[0], 8, 4096]
        elif kind in ("EmptyHunyuanLatentVideo", "WanImageToVideo"):
            values[:3] = [64, 64, 9]
        elif kind == "KSamplerAdvanced":
            first = values[0] == "enable"
            values[3] = 4
            values[7:9] = [0, 2] if first else [2, 10000]
    return workflow


def drop_nodes(workflow: dict, ids: set[int]) -> None:
    """Remove nodes and every link that touches them (the inputs they fed are left unconnected)."""
    gone = {link[0] for link in workflow["links"] if link[1] in ids or link[3] in ids}
    workflow["nodes"] = [n for n in workflow["nodes"] if n["id"] not in ids]
    workflow["links"] = [link for link in workflow["links"] if link[0] not in gone]
    for node in workflow["nodes"]:
        for i in node.get("inputs", []):
            if i.get("link") in gone:
                i["link"] = None
        for o in node.get("outputs", []):
            o["links"] = [x for x in o.get("links") or [] if x not in gone]


def add_save_latent(workflow: dict, source: int, slot: int, name: str) -> None:
    """A SaveLatent of output `slot` of node `source` to output/latents/<name>."""
    node_id, link_id = workflow["last_node_id"] + 1, workflow["last_link_id"] + 1
    workflow["last_node_id"], workflow["last_link_id"] = node_id, link_id
    src = next(n for n in workflow["nodes"] if n["id"] == source)
    workflow["nodes"].append({
        "id": node_id, "type": "SaveLatent", "pos": [src["pos"][0], src["pos"][1] - 80], "size": [300, 60],
        "flags": {}, "order": len(workflow["nodes"]), "mode": 0,
        "inputs": [{"name": "samples", "type": "LATENT", "link": link_id}], "outputs": [], "properties": {},
        "widgets_values": [f"latents/{name}"]})
    workflow["links"].append([link_id, source, slot, node_id, 0, "LATENT"])
    src["outputs"][slot]["links"] = (src["outputs"][slot].get("links") or []) + [link_id]


def with_modes(workflow: dict, modes: dict[int, int]) -> dict:
    """The workflow with the node modes `modes` (node id -> MUTED or BYPASSED)."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["id"] in modes:
            node["mode"] = modes[node["id"]]
    return workflow


def upstream(workflow: dict, ids: set[int]) -> set[int]:
    """Nodes `ids` and every node whose outputs reach them."""
    links = {link[0]: link for link in workflow["links"]}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    found, todo = set(), list(ids)
    while todo:
        node_id = todo.pop()
        if node_id not in found:
            found.add(node_id)
            todo += [links[i["link"]][1] for i in nodes[node_id].get("inputs", []) if i.get("link") is not None]
    return found


def is_pack_node(kind: str) -> bool:
    """A node of this pack (the test conditioning node is installed only into test servers)."""
    return kind.startswith("FreeVideo") and not kind.startswith("FreeVideoTest")


def check_each_node_acts(page, server, stem: str, workflow: dict, final: list[tuple[int, int, str]]) -> dict:
    """Run `workflow` (with a SaveLatent after each `final` output (node, slot, name); the first is
    the video) as it is, with every FreeVideo node bypassed, and, where it has several, with each
    FreeVideo node bypassed alone; each FreeVideo node must change the video. Returns the output
    files of the run as it is.

    The bypassed runs are what the workflows' notes tell a user to do, in the page: select the
    nodes, Ctrl+B, Run. They compare final latents only, so the nodes that feed no final latent
    (decoding and saving the video) are muted first (Ctrl+M)."""
    import torch
    for node, slot, name in final:
        add_save_latent(workflow, node, slot, name)
    ours = sorted(n["id"] for n in workflow["nodes"] if is_pack_node(n["type"]))
    assert ours, f"{stem}: no FreeVideo node"
    files, _ = run_from_page(page, server, workflow, f"{stem}_tiny.json")
    changed = {name: saved_latent(files[name]) for _, _, name in final}

    saves = {n["id"] for n in workflow["nodes"]
             if n["type"] == "SaveLatent" and n["widgets_values"][0] in {f"latents/{name}" for _, _, name in final}}
    needed = upstream(workflow, saves)
    unused = [n["id"] for n in workflow["nodes"] if n["id"] not in needed and n["type"] not in NOTE_TYPES]
    assert not set(ours) - needed, f"{stem}: FreeVideo nodes {sorted(set(ours) - needed)} feed no final latent"
    page.press_on_nodes(unused, "Control+m")
    latents_only = with_modes(workflow, dict.fromkeys(unused, MUTED))

    page.press_on_nodes(ours, "Control+b")
    plain_files, _ = run_shown_graph(page, server, with_modes(latents_only, dict.fromkeys(ours, BYPASSED)),
                                     f"{stem}_tiny with every FreeVideo node bypassed")
    page.press_on_nodes(ours, "Control+b")
    plain = {name: saved_latent(plain_files[name]) for _, _, name in final}
    video = final[0][2]
    for name in changed:
        assert changed[name].shape == plain[name].shape and torch.isfinite(changed[name]).all()
    assert 0.1 < plain[video].std() < 100, plain[video].std()
    whole = relative_l2(changed[video], plain[video])
    assert whole > 1e-3, f"{stem}: the FreeVideo nodes changed nothing (relative difference {whole:.2e})"
    print(f"{stem}: FreeVideo nodes change the final latent by {whole:.3e} (relative); other outputs: "
          + ", ".join(f"{name} {relative_l2(changed[name], plain[name]):.3e}" for name in changed if name != video))
    for node_id in ours if len(ours) > 1 else []:
        page.press_on_nodes([node_id], "Control+b")
        one_files, _ = run_shown_graph(page, server, with_modes(latents_only, {node_id: BYPASSED}),
                                       f"{stem}_tiny with node {node_id} bypassed")
        page.press_on_nodes([node_id], "Control+b")
        without = saved_latent(one_files[video])
        diff = relative_l2(changed[video], without)
        assert diff > 1e-4, f"{stem}: FreeVideo node {node_id} changed nothing (relative difference {diff:.2e})"
        print(f"{stem}: node {node_id} alone changes the final latent by {diff:.3e}")
    return files


def check_video(path: Path, frames: int, size: tuple[int, int]) -> None:
    video = video_frames(path)
    assert video.shape == (frames, size[0], size[1], 3), video.shape
    assert video.std() > 3, "a blank video"


def wan22_experts(workflow: dict) -> tuple[dict, dict]:
    """The two KSamplerAdvanced of a Wan 2.2 14B workflow: (high-noise, low-noise)."""
    samplers = [n for n in workflow["nodes"] if n["type"] == "KSamplerAdvanced"]
    assert len(samplers) == 2, [n["type"] for n in workflow["nodes"]]
    return tuple(sorted(samplers, key=lambda n: n["widgets_values"][7]))


def model_chain(workflow: dict, node: dict) -> list[dict]:
    """The nodes on the MODEL input path of `node`, from it back to the loader."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    chain = []
    while True:
        model = next((i for i in node.get("inputs", []) if i["type"] == "MODEL" and i.get("link") is not None), None)
        if model is None:
            return chain
        node = nodes[links[model["link"]][1]]
        chain.append(node)


WAN22 = ["wan22_t2v_14b_enhance_a_video", "wan22_i2v_14b_enhance_a_video"]


@pytest.mark.parametrize("stem", WAN22)
def test_wan22_workflow_hands_the_latent_from_the_high_to_the_low_noise_expert(stem):
    """As ComfyUI's own Wan 2.2 14B templates: the high-noise expert samples the first steps and
    returns its leftover noise, the low-noise expert adds no noise and finishes the same schedule;
    each expert's model passes through its own Enhance-A-Video node."""
    workflow = load(ROOT / "workflows" / f"{stem}.json")
    high, low = wan22_experts(workflow)
    add_noise, _, _, steps, cfg, sampler, scheduler, start, split, leftover = high["widgets_values"]
    assert (add_noise, start, leftover) == ("enable", 0, "enable") and 0 < split < steps
    l_add_noise, _, _, l_steps, l_cfg, l_sampler, l_scheduler, l_start, l_end, l_leftover = low["widgets_values"]
    assert (l_add_noise, l_leftover) == ("disable", "disable") and l_start == split and l_end >= steps
    assert (l_steps, l_cfg, l_sampler, l_scheduler) == (steps, cfg, sampler, scheduler)
    links = {link[0]: link for link in workflow["links"]}
    latent_in = next(i for i in low["inputs"] if i["name"] == "latent_image")
    assert links[latent_in["link"]][1] == high["id"], "the low-noise expert continues the high-noise expert's latent"
    loaders = []
    for expert, noise in ((high, "high_noise"), (low, "low_noise")):
        chain = model_chain(workflow, expert)
        assert any(n["type"] == "FreeVideoEnhanceAVideo" for n in chain), f"{stem}: no Enhance-A-Video on the {noise} expert"
        assert chain[-1]["type"] == "UNETLoader" and noise in chain[-1]["widgets_values"][0], chain[-1]
        loaders.append(chain[-1]["id"])
    assert loaders[0] != loaders[1]


def wan22_run(page, server, stem: str) -> dict:
    workflow = tiny_wan22_variant(load(ROOT / "workflows" / f"{stem}.json"))
    high, low = wan22_experts(workflow)
    files = check_each_node_acts(page, server, stem, workflow, [(low["id"], 0, "final")])
    (video,) = [p for p in files.values() if p.suffix == ".mp4"]
    check_video(video, 9, (64, 64))
    return files


def test_wan22_t2v_14b_tiny_run_from_the_run_button(page, server):
    wan22_run(page, server, "wan22_t2v_14b_enhance_a_video")


def test_wan22_i2v_14b_tiny_run_from_the_run_button(page, server):
    """The image-to-video graph (LoadImage -> WanImageToVideo, ComfyUI's example.png) samples on the
    tiny experts, decodes, and each Enhance-A-Video node acts."""
    wan22_run(page, server, "wan22_i2v_14b_enhance_a_video")


# --- Wan 2.2 with step-distill LoRAs at CFG 1 ---------------------------------------------------------

DISTILLED = "wan22_distilled_cfg1_entropy_guidance"


def tiny_wan22_loras() -> dict[str, Path]:
    """A rank-4 LoRA for each tiny Wan 2.2 T2V expert (ComfyUI's key format: lora_down / lora_up /
    alpha on the blocks' attention and feed-forward matrices), by the lightx2v LoRA file name that
    the distilled workflow gives it."""
    import torch
    files = {}
    for seed, expert in enumerate(("high", "low")):
        path = tiny_models.CACHE / f"tiny_wan22_t2v_14b_lora_{expert}.safetensors"
        if not path.exists():
            g, tensors = torch.Generator().manual_seed(seed), {}
            for block in range(4):  # the tiny expert: 4 blocks of width 256, feed-forward 512
                for target, (rows, cols) in {"self_attn.q": (256, 256), "self_attn.v": (256, 256), "self_attn.o": (256, 256),
                                             "cross_attn.q": (256, 256), "ffn.0": (512, 256), "ffn.2": (256, 512)}.items():
                    key = f"diffusion_model.blocks.{block}.{target}"
                    tensors[f"{key}.lora_down.weight"] = torch.randn(4, cols, generator=g) / cols ** 0.5
                    tensors[f"{key}.lora_up.weight"] = 0.5 * torch.randn(rows, 4, generator=g) / 4 ** 0.5
                    tensors[f"{key}.alpha"] = torch.tensor(4.0)
            tiny_models.save_tensors(tensors, path)
        files[f"wan2.2_t2v_lightx2v_4steps_lora_v1.1_{expert}_noise.safetensors"] = path
    return files


def test_distilled_workflow_guides_each_expert_after_its_lora_at_cfg_1():
    """Each expert's model passes through its own lightx2v LoRA, then its own IE-Adapt guidance;
    both samplers at CFG 1 with the distilled step count (4 to 8)."""
    workflow = load(ROOT / "workflows" / f"{DISTILLED}.json")
    for expert, noise in zip(wan22_experts(workflow), ("high_noise", "low_noise")):
        steps, cfg = expert["widgets_values"][3:5]
        assert cfg == 1.0 and 4 <= steps <= 8, (noise, steps, cfg)
        chain = model_chain(workflow, expert)  # from the sampler back to the loader
        kinds = [n["type"] for n in chain]
        assert kinds.index("FreeVideoEntropyGuidance") < kinds.index("LoraLoaderModelOnly"), kinds
        lora = chain[kinds.index("LoraLoaderModelOnly")]
        assert lora["widgets_values"][0] in tiny_wan22_loras() and noise in lora["widgets_values"][0], lora
        assert chain[-1]["type"] == "UNETLoader" and noise in chain[-1]["widgets_values"][0], chain[-1]


def test_distilled_cfg1_tiny_run_from_the_run_button(page, server):
    """The graph on the tiny experts, each with its tiny LoRA (stand-ins for the lightx2v files), 4 steps
    at CFG 1 (no unconditional pass): each guidance node changes the video."""
    workflow = tiny_wan22_variant(load(ROOT / "workflows" / f"{DISTILLED}.json"))
    tiny = tiny_wan22_loras()
    for node in workflow["nodes"]:
        if node["type"] == "LoraLoaderModelOnly":
            node["widgets_values"][0] = tiny[node["widgets_values"][0]].name
    high, low = wan22_experts(workflow)
    assert high["widgets_values"][4] == low["widgets_values"][4] == 1.0
    files = check_each_node_acts(page, server, DISTILLED, workflow, [(low["id"], 0, "final")])
    (video,) = [p for p in files.values() if p.suffix == ".mp4"]
    check_video(video, 9, (64, 64))


# LTX-2 and MiniMax H3 exist only in newer ComfyUI (0.33 has both): each workflow's family name, the
# module of the family and the node types its workflow needs from it, and its id in support/families.py.
# On a ComfyUI without them the page shows those node types as missing (its own "missing nodes"
# dialog), which is all such a ComfyUI can do with the file.
NEWER_FAMILIES = {stem: (name, families.BY_ID[family_id].requires, family_id)
                  for stem, (name, family_id) in families.NEWER_FAMILY_WORKFLOWS.items()}


def missing_here(server, stem: str) -> list[str]:
    """Node types of workflow `stem` that this server does not know."""
    return sorted({n["type"] for n in load(ROOT / "workflows" / f"{stem}.json")["nodes"]
                   if n["type"] not in NOTE_TYPES and n["type"] not in server.object_info})


def test_newer_family_workflows_name_their_comfyui(server):
    """Each LTX-2 / MiniMax H3 workflow says in its note that it needs a ComfyUI with the family; where
    this ComfyUI has the family, every node type of the file is known (no misspelt type hides behind
    'needs a newer ComfyUI'), and where it has not, the node types it lacks are ComfyUI's own (the
    family's and nothing of this pack)."""
    for stem, (family, module, _) in NEWER_FAMILIES.items():
        workflow = load(ROOT / "workflows" / f"{stem}.json")
        assert f"Needs a ComfyUI with {family} (0.33 has it)" in note_text(workflow), stem
        missing = missing_here(server, stem)
        if comfy_has(module):
            assert not missing, f"{stem}: node types {missing} unknown to a ComfyUI that has {family}"
        else:
            assert missing and not any(kind.startswith("FreeVideo") for kind in missing), (stem, missing)
            print(f"{stem}: this ComfyUI lacks {module}; the page shows {missing} as missing node types")


def tiny_av_variant(workflow: dict, stem: str, input_dir: Path) -> tuple[dict, list[tuple[int, int, str]]]:
    """An LTX-2 / MiniMax H3 workflow on the family's tiny model: the diffusion model's loader names
    the tiny file, the text encoder becomes the test conditioning node (the family's text width),
    3 sampling steps; the decoders (no tiny audio-video VAEs here) are left out, and the sampled
    latent is split into video and audio (ComfyUI's LTXVSeparateAVLatent, for any AV model) to be
    saved. Returns the variant and the (node, slot, name) of the video and audio latents."""
    workflow = json.loads(json.dumps(workflow))
    by_type = lambda kind: [n for n in workflow["nodes"] if n["type"] == kind]  # noqa: E731
    fam = families.BY_ID[NEWER_FAMILIES[stem][2]]
    model_file = getattr(tiny_models, fam.file)().name
    decoders = ("VAEDecode", "VAEDecodeTiled", "VAEDecodeAudio", "LTXVAudioVAEDecode", "CreateVideo", "SaveVideo",
                "CLIPLoader", "LTXAVTextEncoderLoader", "LTXVAudioVAELoader", "VAELoader")
    drop_nodes(workflow, {n["id"] for n in workflow["nodes"] if n["type"] in decoders})

    def text_node(node: dict, text: str) -> None:
        node["type"] = "FreeVideoTestTextConditioning"
        node["inputs"], node["widgets_values"] = [], [text, 8, fam.text_dim]
        node["outputs"] = [{"name": "CONDITIONING", "type": "CONDITIONING", "links": node["outputs"][0]["links"], "slot_index": 0}]

    for node in workflow["nodes"]:
        kind, values = node["type"], node.get("widgets_values")
        if kind == "CheckpointLoaderSimple":  # LTX-2: the model alone, from the diffusion-model loader
            node["type"], node["widgets_values"] = "UNETLoader", [model_file, "default"]
            node["outputs"] = node["outputs"][:1]
        elif kind == "UNETLoader":
            values[0] = model_file
        elif kind == "CLIPTextEncode":
            text_node(node, values[0])
        elif kind == "EmptyLTXVLatentVideo":
            values[:3] = [fam.size * 32, fam.size * 32, 17]  # 3 latent frames of size x size
        elif kind == "LTXVEmptyLatentAudio":
            # Its audio VAE only tells the latent's shape: the family's empty audio latent, from a file.
            node["type"], node["inputs"], node["widgets_values"] = "LoadLatent", [], [tiny_audio_latent(fam, input_dir)]
            node["outputs"] = [{"name": "LATENT", "type": "LATENT", "links": node["outputs"][0]["links"], "slot_index": 0}]
        elif kind == "LTXVScheduler":
            values[0] = 3
        elif kind == "BasicScheduler":
            values[1] = 3
        elif kind == "MiniMaxH3ImageToVideo":
            # Conditioning from the test node, the latent from H3's own empty-latent node.
            links = {link[0]: link for link in workflow["links"]}
            cond_links, latent_links = node["outputs"][0]["links"], node["outputs"][1]["links"]
            text_node(node, values[0])
            node["outputs"][0]["links"] = cond_links
            latent_id = workflow["last_node_id"] = workflow["last_node_id"] + 1
            workflow["nodes"].append({
                "id": latent_id, "type": "EmptyMiniMaxH3LatentAV", "pos": [node["pos"][0], node["pos"][1] + 340],
                "size": [315, 106], "flags": {}, "order": len(workflow["nodes"]), "mode": 0, "inputs": [],
                "outputs": [{"name": "LATENT", "type": "LATENT", "links": latent_links, "slot_index": 0}],
                "properties": {}, "widgets_values": [fam.size * 16, fam.size * 16, 22]})  # 7 latent frames of size x size
            for link_id in latent_links:
                links[link_id][1], links[link_id][2] = latent_id, 0
    (sampler,) = by_type("SamplerCustomAdvanced")
    separate = by_type("LTXVSeparateAVLatent")
    if not separate:
        split_id = workflow["last_node_id"] = workflow["last_node_id"] + 1
        link_id = workflow["last_link_id"] = workflow["last_link_id"] + 1
        workflow["nodes"].append({
            "id": split_id, "type": "LTXVSeparateAVLatent", "pos": [sampler["pos"][0] + 340, sampler["pos"][1]],
            "size": [250, 66], "flags": {}, "order": len(workflow["nodes"]), "mode": 0,
            "inputs": [{"name": "av_latent", "type": "LATENT", "link": link_id}],
            "outputs": [{"name": "video_latent", "type": "LATENT", "links": [], "slot_index": 0},
                        {"name": "audio_latent", "type": "LATENT", "links": [], "slot_index": 1}],
            "properties": {}, "widgets_values": []})
        workflow["links"].append([link_id, sampler["id"], 0, split_id, 0, "LATENT"])
        sampler["outputs"][0]["links"] = (sampler["outputs"][0].get("links") or []) + [link_id]
        separate = [workflow["nodes"][-1]]
    return workflow, [(separate[0]["id"], 0, "video"), (separate[0]["id"], 1, "audio")]


def tiny_audio_latent(fam, input_dir: Path) -> str:
    """The family's empty audio latent for the tiny video latent, as a .latent file in ComfyUI's
    input folder (what LoadLatent reads); returns its name."""
    import torch
    from safetensors.torch import save_file
    audio = families.latent(fam)["samples"].unbind()[1]
    name = f"tiny_{fam.id}_audio.latent"
    input_dir.mkdir(parents=True, exist_ok=True)
    # The version key tells LoadLatent the values are stored as they are (no SD1 scale).
    save_file({"latent_tensor": audio.contiguous(), "latent_format_version_0": torch.tensor([])}, str(input_dir / name))
    return name


@pytest.mark.parametrize("stem", list(NEWER_FAMILIES))
def test_newer_family_tiny_run_from_the_run_button(page, server, stem):
    family, module, _ = NEWER_FAMILIES[stem]
    if not comfy_has(module):
        pytest.skip(f"{family} needs a newer ComfyUI (0.33 has it): this one has no {module}")
    workflow, final = tiny_av_variant(load(ROOT / "workflows" / f"{stem}.json"), stem, server.base / "input")
    check_each_node_acts(page, server, stem, workflow, final)


# --- editing inside a mask: a real video, a painted mask, the edit ------------------------------------

MASKED_EDIT = "wan21_masked_entropy_editing"


def test_masked_editing_tiny_run_from_the_run_button(page, server):
    """The masked-editing workflow on tiny Wan: a 9-frame 64x64 source video and a mask image whose
    left half is transparent (what the MaskEditor saves: transparent = painted = edited), Grow Mask at
    0. Outside the mask the sampled latent is the source video's latent up to the sampler's rounding;
    inside, the edit changes it."""
    import av
    import torch
    from PIL import Image
    inputs = server.base / "input"
    y, x = np.mgrid[0:64, 0:64]
    with av.open(str(inputs / "wan21_edit_source.mp4"), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 64, 64, "yuv420p"
        for t in range(9):  # a gradient with a square moving right
            frame = np.stack([x * 3, y * 3, np.full_like(x, 90)], -1)
            frame[20:36, 8 + 4 * t:24 + 4 * t] = (230, 40, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[:, :32] = 0
    Image.fromarray(np.dstack([np.full((64, 64, 3), 128, dtype=np.uint8), alpha]), "RGBA").save(inputs / "wan21_edit_mask.png")

    workflow = tiny_variant(load(ROOT / "workflows" / f"{MASKED_EDIT}.json"))
    for node in workflow["nodes"]:
        if node["type"] == "ImageFromBatch":
            node["widgets_values"] = [0, 9]
        elif node["type"] == "ImageScale":
            node["widgets_values"][1:3] = [64, 64]
        elif node["type"] == "GrowMask":
            node["widgets_values"][0] = 0
    sampler = next(n["id"] for n in workflow["nodes"] if n["type"] == "KSampler")
    encoder = next(n["id"] for n in workflow["nodes"] if n["type"] == "VAEEncode")
    add_save_latent(workflow, sampler, 0, "changed")
    add_save_latent(workflow, encoder, 0, "source")
    files, _ = run_from_page(page, server, workflow, f"{MASKED_EDIT}_tiny.json")
    source, edited = saved_latent(files["source"]), saved_latent(files["changed"])
    assert source.shape == edited.shape == (1, 16, 3, 8, 8) and torch.isfinite(edited).all()
    keep, edit = (Ellipsis, slice(4, None)), (Ellipsis, slice(None, 4))  # latent columns of the mask's right, left half
    outside = float((edited[keep] - source[keep]).abs().max())
    inside = relative_l2(edited[edit], source[edit])
    print(f"{MASKED_EDIT}: outside the mask max |edit - source| {outside:.3g} (peak {float(source.abs().max()):.3g}); "
          f"inside relative change {inside:.3g}")
    assert outside <= 1e-5 * float(source.abs().max())
    assert inside > 1e-2
    check_video(files["wan21_ie_adapt_masked_edit_side_by_side"], 9, (64, 64 + 8 + 64))
